"""Fixtures shared by the test modules."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread while a module of tiny-model tests runs: with tensors this small, thread
    hand-offs cost more than the math on a shared 2-core machine. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def bench_script() -> Callable[[str], ModuleType]:
    """Imports a ``bench/`` script by its own name, with ``bench/`` on ``sys.path``: as the scripts
    import each other when run (bench/interference.py --stack imports ``stack``)."""

    def load(name: str) -> ModuleType:
        if str(BENCH) not in sys.path:
            sys.path.insert(0, str(BENCH))
        return importlib.import_module(name)

    return load
