"""Import-time stand-in for torchaudio (tests only).

ComfyUI's core imports torchaudio at module level (audio encoders and the ACE/MMAudio VAEs) but the Wan code
path never calls it. Only CUDA builds of torchaudio are reachable here, and they fail to import
with a CPU torch, so this empty package takes its place. Anything used from it raises.
"""

from . import transforms  # noqa: F401

__version__ = "0.0.0+ffid-test-stub"


def __getattr__(name):
    raise AttributeError(f"torchaudio stub (ffid tests): {name} is not available")
