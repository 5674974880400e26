"""Import-time stand-in for torchvision (tests only).

ComfyUI's core imports torchvision at module level (cascade and cosmos models) but the Wan code
path never calls it. Only CUDA builds of torchvision are reachable here, and they fail to import
with a CPU torch, so this empty package takes its place. Anything used from it raises.
"""

from . import transforms  # noqa: F401

__version__ = "0.0.0+ffid-test-stub"


def __getattr__(name):
    raise AttributeError(f"torchvision stub (ffid tests): {name} is not available")
