"""What a training run shows and logs: start-up summary, tqdm bar, TensorBoard scalars, loss plot."""

from __future__ import annotations

import json
import os
import sys
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..figures import pyplot, save_figure
from .io import atomic_write_bytes

# The bar's avr_loss is the mean of this many recent steps (kohya shows the epoch mean; a window
# reacts faster on the short runs ffid is used for and is the same on long ones).
AVERAGE_WINDOW = 50


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def peak_memory(device: Any) -> str:
    """Peak memory so far: device memory on CUDA, the process's peak RSS otherwise."""
    import torch

    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        return f"{format_bytes(torch.cuda.max_memory_allocated(device))} GPU peak"
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return f"{format_bytes(rss * (1 if sys.platform == 'darwin' else 1024))} RAM peak (process)"
    except ImportError:  # pragma: no cover - Windows
        return "n/a"


class TrainMonitor:
    """Collects losses; drives the progress bar, TensorBoard and the loss-curve PNG (main process only)."""

    def __init__(
        self,
        total_steps: int,
        start_step: int,
        losses: list[float],
        *,
        logging_dir: str | None,
        enabled: bool,
        progress: bool,
    ):
        self.losses = list(losses)
        self.preserve: list[tuple[int, float]] = []  # (step, preservation distance) of this session
        self.enabled = enabled
        self.window: deque[float] = deque(self.losses[-AVERAGE_WINDOW:], maxlen=AVERAGE_WINDOW)
        self.bar = None
        self.writer = None
        if enabled and progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc="steps",
                dynamic_ncols=True,
                disable=not sys.stderr.isatty() and os.environ.get("FFID_FORCE_BAR") != "1",
            )
        # The writer makes its folder when created: it waits for the first step, so a run refused
        # before training leaves no folder behind.
        self.logging_dir = logging_dir if enabled else None
        if self.logging_dir:
            try:
                import torch.utils.tensorboard  # noqa: F401 - checked now, used at the first step
            except ImportError:
                print(
                    "ffid train: tensorboard is not installed; no TensorBoard logs (pip install tensorboard)",
                    file=sys.stderr,
                )
                self.logging_dir = None

    @property
    def average(self) -> float:
        return sum(self.window) / max(1, len(self.window))

    def step(self, step: int, loss: float, lr: float, extra: Mapping[str, float] | None = None) -> None:
        """Record one optimizer step; ``extra`` scalars (e.g. ``preserve/<prompt>``) go to
        TensorBoard, and ``preserve/distance`` to the progress bar as ``keep``."""
        self.losses.append(loss)
        self.window.append(loss)
        extra = dict(extra or {})
        if "preserve/distance" in extra:
            self.preserve.append((step, extra["preserve/distance"]))
        if self.bar is not None:
            self.bar.update(1)
            post = {"avr_loss": f"{self.average:.4g}", "lr": f"{lr:.3g}"}
            if "preserve/distance" in extra:
                post["keep"] = f"{extra['preserve/distance']:.3g}"
            self.bar.set_postfix(post, refresh=False)
        if self.writer is None and self.logging_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(self.logging_dir)
        if self.writer is not None:
            self.writer.add_scalar("loss/current", loss, step)
            self.writer.add_scalar("loss/average", self.average, step)
            self.writer.add_scalar("lr", lr, step)
            for key, value in extra.items():
                self.writer.add_scalar(key, value, step)

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def plot_losses(losses: list[float], path: Path, title: str) -> Path | None:
    """Write the loss curve (and its running mean) as a PNG; ``None`` without matplotlib."""
    if not losses:
        return None
    try:
        plt = pyplot()
    except ImportError:
        return None

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    mean, acc = [], deque(maxlen=AVERAGE_WINDOW)
    for v in losses:
        acc.append(v)
        mean.append(sum(acc) / len(acc))
    ax.plot(steps, mean, lw=1.6, label=f"mean of last {AVERAGE_WINDOW}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, default=str) + "\n").encode())


__all__ = ["TrainMonitor", "format_bytes", "peak_memory", "plot_losses", "write_json"]
