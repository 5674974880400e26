"""The version of ffid: one place, imported by every module that stamps files with it."""

__version__ = "0.1.0"
