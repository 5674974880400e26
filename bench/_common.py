"""Shared helpers of the benchmark scripts in ``bench/``: models, data, timing and memory probes.

Everything here is measurement plumbing, kept out of the library on purpose: the library must not
depend on sklearn, peft or /proc. The scripts import this module as ``_common`` (``bench/`` is put
on ``sys.path`` by whoever runs them, as ``python bench/x.py`` does).
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

# ---------------------------------------------------------------------------------------------
# Models and data: the demo's pipeline (``ffid.demo``): diffusers' WanTransformer3DModel (the real
# Wan 2.x architecture) on scikit-learn's bundled 8x8 digits, seen as 1-channel one-frame videos,
# with rectified-flow matching and hashed-word "text" conditioning. The bench only adds sizes.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchSize:
    """A named model shape (passed to the demo's ``ModelSpec``)."""

    name: str
    dim: int
    heads: int
    ffn_dim: int
    layers: int
    freq_dim: int = 64

    def spec(self, image_size: int) -> Any:
        from ffid.demo.model import ModelSpec

        return ModelSpec(
            dim=self.dim,
            heads=self.heads,
            layers=self.layers,
            ffn_dim=self.ffn_dim,
            freq_dim=self.freq_dim,
            image_size=image_size,
        )


SIZES: dict[str, BenchSize] = {
    s.name: s
    for s in (
        BenchSize("tiny", dim=32, heads=2, ffn_dim=64, layers=2, freq_dim=16),
        BenchSize("s", dim=128, heads=4, ffn_dim=512, layers=4),
        BenchSize("m", dim=256, heads=4, ffn_dim=1024, layers=6),
        BenchSize("l", dim=512, heads=8, ffn_dim=2048, layers=8),
        # For a lent GPU: ~0.4B parameters, still a toy next to Wan 14B (dim 5120, 40 layers).
        BenchSize("xl", dim=1536, heads=12, ffn_dim=6144, layers=12, freq_dim=256),
    )
}


def build_model(size: BenchSize, image_size: int, seed: int = 0) -> torch.nn.Module:
    """A freshly initialised Wan DiT of ``size`` (deterministic for a seed), fp32 on CPU."""
    from ffid.demo.model import build_model as demo_build

    return demo_build(size.spec(image_size), seed=seed)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def class_text() -> torch.Tensor:
    """``[10, tokens, text_dim]``: the demo's embedding of the prompt "a digit <word>" per class."""
    from ffid.demo.data import DIGIT_WORDS, class_prompt, encode_prompt

    return torch.stack([encode_prompt(class_prompt(w)) for w in DIGIT_WORDS])


def load_digits(image_size: int, mirror: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [N, 1, 1, S, S] in [-1, 1], labels [N])``; ``mirror`` flips them left-right.

    The mirrored digits are the finetuning task: a real shift of the whole image distribution
    away from what the base was pretrained on, under the same prompts.
    """
    from ffid.demo.data import load_digit_images

    x, y = load_digit_images(image_size)
    return (x.flip(-1).contiguous() if mirror else x), y


class FlowBatches:
    """A deterministic stream of flow-matching batches: same seed, same batches, any method."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, batch: int, seed: int):
        self.images, self.labels, self.text = images, labels, text
        self.batch = batch
        self.g = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x0, text, noise, t)`` on CPU in fp32."""
        idx = torch.randint(0, len(self.images), (self.batch,), generator=self.g)
        x0 = self.images[idx]
        noise = torch.randn(x0.shape, generator=self.g)
        t = torch.rand(self.batch, generator=self.g)
        return x0, self.text[self.labels[idx]], noise, t


def flow_loss(
    model: torch.nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    device: str,
    dtype: torch.dtype,
    input_grad: bool = False,
) -> torch.Tensor:
    """The demo's rectified-flow loss on ``batch`` (inputs cast to the model dtype; t stays fp32).

    ``input_grad`` makes the clean latents require a gradient, so that a backward pass runs
    through every layer even when no weight is trainable (the floor of the comparison).
    """
    from ffid.demo.model import flow_matching_loss

    x0, text, noise, t = batch
    x0 = x0.to(device, dtype)
    if input_grad:
        x0.requires_grad_(True)
    # t in the model dtype too, as the demo's sampler does: fp32 t would promote x_t to fp32.
    return flow_matching_loss(model, x0, text.to(device, dtype), noise.to(device, dtype), t.to(device, dtype))


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    """Give freed heap pages back to the OS (glibc), so that memory freed while loading is not
    silently reused by the measured phase (its RSS would then not grow)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of this process from ``reset()`` on: CPU resident set size or CUDA allocations.

    CPU: Linux keeps a high-water mark of the RSS (``VmHWM``); writing ``5`` to
    ``/proc/self/clear_refs`` resets it to the current RSS, so ``peak - base`` is what a phase
    added on top of what was already resident. Without /proc (macOS) it falls back to
    ``ru_maxrss``, which cannot be reset: then only the whole-process peak is meaningful.
    CUDA: ``max_memory_allocated`` after ``reset_peak_memory_stats``, tensors only (no allocator
    cache, no CUDA context), the usual PyTorch figure.
    """

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.resettable = self.cuda or self._can_reset()
        self.base = 0

    @staticmethod
    def _can_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return _status_kb("VmHWM") is not None
        except OSError:
            return False

    def current(self) -> int:
        """Bytes in use now (RSS, or CUDA allocated)."""
        if self.cuda:
            return torch.cuda.memory_allocated()
        kb = _status_kb("VmRSS")
        return kb * 1024 if kb is not None else self._maxrss()

    @staticmethod
    def _maxrss() -> int:
        # ru_maxrss is in KiB on Linux (bytes on macOS, where this fallback is the only figure).
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if os.uname().sysname == "Darwin" else r * 1024

    def reset(self) -> None:
        """Start a new phase: the peak is set to what is in use now."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            _malloc_trim()
            if self.resettable:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
        self.base = self.current()

    def peak(self) -> int:
        """Highest memory in use since ``reset()`` (whole process; subtract ``base`` for the phase)."""
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        kb = _status_kb("VmHWM")
        return kb * 1024 if kb is not None else self._maxrss()


def optimizer_state_bytes(opt: torch.optim.Optimizer | None) -> int:
    """Bytes of every tensor in ``optimizer.state`` (moments, step counters)."""
    if opt is None:
        return 0
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total


class StepTimer:
    """Wall time per call of ``fn``; synchronises CUDA so that queued kernels are counted."""

    def __init__(self, device: str):
        self.sync: Callable[[], None] = (
            torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        )
        self.times: list[float] = []

    def __call__(self, fn: Callable[[], Any]) -> Any:
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        self.times.append(time.perf_counter() - t0)
        return out

    def median(self, skip: int) -> float:
        rest = self.times[skip:] or self.times
        return statistics.median(rest)


def file_size(paths: Iterable[str]) -> int:
    """Total bytes of files (a directory counts every file inside it)."""
    total = 0
    for p in paths:
        if os.path.isdir(p):
            for root, _, files in os.walk(p):
                total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        elif os.path.exists(p):
            total += os.path.getsize(p)
    return total


def human_bytes(n: float | None) -> str:
    """``1536`` -> ``"1.5 KiB"``; None -> ``"-"``."""
    if n is None:
        return "-"
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    return f"{sign}{n:.1f} GiB"
