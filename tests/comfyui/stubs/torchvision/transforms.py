"""Stand-in for torchvision.transforms (tests only); see the package docstring."""


def __getattr__(name):
    raise AttributeError(f"torchvision stub (ffid tests): transforms.{name} is not available")
