"""Stand-in for torchaudio.transforms (tests only); see the package docstring."""


def __getattr__(name):
    raise AttributeError(f"torchaudio stub (ffid tests): transforms.{name} is not available")
