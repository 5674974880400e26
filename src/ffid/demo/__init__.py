"""``ffid demo``: a tiny Wan DiT, real handwritten digits, two characters in two disjoint ffid slices.

See :mod:`ffid.demo.run` for the stages and ``docs/demo.md`` for what the report means.
"""

from __future__ import annotations

from .config import DemoConfig, quick_config
from .run import DemoResult, run_demo
from .task import DemoTask, make_task

__all__ = ["DemoConfig", "DemoResult", "DemoTask", "make_task", "quick_config", "run_demo"]
