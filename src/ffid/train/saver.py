"""Writing a run's outputs during training: a delta per save point and, if asked, a resume state."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .state import Position, RunIdentity, rng_state, save_state


class CheckpointSaver:
    """Saves deltas (``{stem}.safetensors``) and states (``{name}-stepNNNNNNNN-state``) of one run.

    Every process must call :meth:`save` (the state gathers each process's RNG); only the main
    process writes. ``metadata(step, epoch)`` gives the keys stored in each delta;
    ``before_first()`` makes the output folder (nothing is written before a save); ``text()``
    gives the text encodings each delta stores.
    """

    def __init__(
        self,
        *,
        out: Path,
        output_name: str,
        accelerator: Any,
        handle: Any,
        identity: RunIdentity,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        generator: torch.Generator,
        metadata: Callable[[int, int], dict[str, str]],
        indices: str = "explicit",
        before_first: Callable[[], None] | None = None,
        text: Callable[[], Mapping[str, torch.Tensor]] | None = None,
    ):
        self.out, self.output_name = out, output_name
        self.accelerator, self.handle, self.identity = accelerator, handle, identity
        self.optimizer, self.scheduler, self.generator = optimizer, scheduler, generator
        self.metadata = metadata
        self.indices = indices  # delta format: explicit (1) or implicit (2)
        self.main = accelerator.is_main_process
        self.saved: list[Path] = []  # deltas written, oldest first
        self.state_path: Path | None = None  # the newest state folder
        self.before_first = before_first  # run once, by the main process, before the first write
        self.text = text  # the run's prompts' text encodings each delta stores (None: none)

    @property
    def last(self) -> Path | None:
        """The newest delta written, if any (named when training has to stop)."""
        return self.saved[-1] if self.saved else None

    def save(self, stem: str, position: Position, losses: list[float], with_state: bool) -> None:
        """Write the delta ``{stem}.safetensors`` and, with ``with_state``, the state at ``position``."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if self.main:
            if self.before_first is not None:
                self.before_first()
                self.before_first = None
            path = self.out / f"{stem}.safetensors"
            self.handle.save_delta(
                path,
                metadata=self.metadata(position.step, position.epoch),
                indices=self.indices,
                text=self.text() if self.text is not None else None,
            )
            self.saved.append(path)
        if with_state:
            folder = self.out / f"{self.output_name}-step{position.step:08d}-state"
            # every process's RNG and gradient paths (each may have forced its own)
            mine = [(rng_state(self.generator), self.handle.grad_paths())]
            gathered = acc.gather_for_metrics(mine) if acc.num_processes > 1 else mine
            rngs = [rng for rng, _ in gathered]
            if self.main:
                save_state(
                    folder,
                    identity=self.identity,
                    position=position,
                    proxies=self.handle.state_dict(),
                    optimizer=self.optimizer,
                    scheduler=self.scheduler,
                    rng=dict(enumerate(rngs)),
                    losses=losses,
                    grad_paths=dict(enumerate(paths for _, paths in gathered)),
                )
                self.state_path = folder
        acc.wait_for_everyone()
