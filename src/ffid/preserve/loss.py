"""The preservation loss: keep what earlier ids taught by pulling towards a teacher.

Disjoint ids share no weight, but they share the function: training id 2 moves activations
that id 1's prompts flow through, so a plain run on top of id 1 can wash id 1 out. This method
adds, every ``every`` steps, a second term to the loss,

    weight * mean_i distance(student(x_i), teacher(x_i)),

over *protected inputs* ``x_i``: the prompts earlier runs trained (recorded in their delta
files), the empty prompt (which classifier-free guidance leans on at every sampling step) and
optionally this run's regularisation prompts and the user's own, each at fresh pure-noise
latents and random times for diffusion models, or on the text itself for causal LMs (KL).

The teacher is :meth:`ffid.engine.FfidHandle.teacher`: the same model with this run's slice
at its starting values, which is exactly base + earlier deltas since ids are disjoint. No copy
of the model is made; the price is one extra no-grad forward of the protected items. It is a
trade between the new and the old (a seesaw): :mod:`ffid.preserve.projection` keeps the old by
construction instead.

All randomness comes from the trainer's generator and the items of a step are a function of
the step number, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from ..errors import ConfigError
from .prompts import Protected, describe_protected

if TYPE_CHECKING:
    from torch import nn

# Chosen on `ffid demo` (seed 0): weights 1 / 4 / 16 kept 67% / 89% / 96% of character1's gain
# (docs/preservation.md); checked on seeds 1 and 2. Not measured on a full-size Wan.
DEFAULT_WEIGHT = 16.0


@dataclass(frozen=True)
class PreserveSettings:
    """How strongly and how often preservation pulls towards the teacher."""

    weight: float = DEFAULT_WEIGHT  # multiplier of the distance term
    items: int = 8  # protected inputs per preservation step
    every: int = 1  # preserve on every k-th optimizer step

    def validate(self) -> PreserveSettings:
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and self.weight > 0):
            raise ConfigError(
                f"preserve_weight = {self.weight} must be a positive number such as 16 "
                "(turn preservation off with preserve = 'off')"
            )
        if self.items < 1:
            raise ConfigError(f"preserve_items = {self.items} must be at least 1")
        if self.every < 1:
            raise ConfigError(f"preserve_every = {self.every} must be at least 1")
        return self


@runtime_checkable
class Preservable(Protocol):
    """What a task provides so that its runs can be preserved (see :class:`Preserver`)."""

    def preservation_batch(self, prompts: Sequence[str], generator: torch.Generator) -> dict[str, Any]:
        """One protected input per prompt: for diffusion, pure noise at a random time with that
        prompt's conditioning; randomness from ``generator`` only."""
        ...

    def preservation_outputs(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """The model's outputs for the batch, one row per item (``[n, ...]``)."""
        ...

    def preservation_distance(
        self, student: torch.Tensor, teacher: torch.Tensor, batch: dict[str, Any]
    ) -> torch.Tensor:
        """Per-item distance ``[n]`` between student and teacher outputs (MSE, or KL for LMs)."""
        ...


def mse_per_item(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared difference per item (row) in fp32: the distance for diffusion predictions."""
    return (student.float() - teacher.float()).pow(2).flatten(1).mean(1)


class TextPreservation:
    """:class:`Preservable` for causal LMs: protected texts, KL(teacher || student) per text.

    Texts are tokenized with BOS first (EOS when there is no BOS) and right-padded; the empty
    text is BOS alone, the model's unconditional next-token distribution. No randomness.
    """

    def __init__(self, tokenizer: Any, max_len: int = 512):
        self.tokenizer = tokenizer
        self.max_len = max_len

    def preservation_batch(self, prompts: Sequence[str], generator: torch.Generator) -> dict[str, Any]:
        tok = self.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        rows: list[list[int]] = []
        for text in prompts:
            row = [start] if start is not None else []
            row.extend(tok(text, add_special_tokens=False)["input_ids"][: self.max_len - len(row)])
            if not row:
                raise ConfigError(
                    "the tokenizer has neither a BOS nor an EOS token, so the empty text cannot be "
                    "protected; set preserve_empty = false"
                )
            rows.append(row)
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    @staticmethod
    def preservation_outputs(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return out.logits  # type: ignore[no-any-return]

    @staticmethod
    def preservation_distance(
        student: torch.Tensor, teacher: torch.Tensor, batch: dict[str, Any]
    ) -> torch.Tensor:
        """KL(teacher || student) of the next-token distributions, averaged over each text's tokens."""
        t = torch.log_softmax(teacher.float(), -1)
        s = torch.log_softmax(student.float(), -1)
        kl = (t.exp() * (t - s)).sum(-1)  # [n, L]
        mask = batch["attention_mask"].to(kl.device, kl.dtype)
        return (kl * mask).sum(1) / mask.sum(1).clamp(min=1)


@dataclass
class PreserveStep:
    """One preservation step's result: the weighted loss (with gradient) and per-prompt distances."""

    loss: torch.Tensor
    distance: float  # unweighted mean distance over the items
    per_prompt: dict[str, float]


class Preserver:
    """Computes the preservation term of a step; usable from any training loop.

    ``handle`` is the attached :class:`~ffid.engine.FfidHandle` (its :meth:`teacher` gives the
    targets), ``task`` a :class:`Preservable`, ``protected`` the prompts (at least one).
    ``eval_mode`` runs both forwards in eval mode (no dropout); turn it off for a model without
    dropout whose gradient checkpointing is tied to training mode.
    In a custom loop::

        preserver = Preserver(handle, task, protected_prompts([delta1]), PreserveSettings())
        for step in range(steps):
            loss = task_loss(...)
            kept = preserver.step(model, step, generator)
            if kept is not None:
                loss = loss + kept.loss
            loss.backward(); optimizer.step(); optimizer.zero_grad()
    """

    def __init__(
        self,
        handle: Any,
        task: Preservable,
        protected: Sequence[Protected],
        settings: PreserveSettings | None = None,
        *,
        eval_mode: bool = True,
    ):
        if not protected:
            raise ConfigError(
                "preservation is on but there is no protected prompt: train on top of base_deltas that "
                "record prompts, or give preserve_prompts = ['...'], or set preserve = 'off'"
            )
        if not isinstance(task, Preservable):
            raise ConfigError(
                f"task {getattr(task, 'name', type(task).__name__)!r} does not support preservation (it "
                "lacks preservation_batch/preservation_outputs/preservation_distance); set preserve = 'off'"
            )
        self.handle = handle
        self.task = task
        self.protected = list(protected)
        self.settings = (settings or PreserveSettings()).validate()
        self.eval_mode = eval_mode

    def due(self, step: int) -> bool:
        """Whether the optimizer step ``step`` (0-based: the step being computed) preserves."""
        return step % self.settings.every == 0

    def chosen(self, step: int) -> list[Protected]:
        """The protected prompts of step ``step``: the next ``items`` of the list, round robin, so
        every prompt gets its turn and a resumed run picks the same ones."""
        n = len(self.protected)
        start = (step // self.settings.every) * self.settings.items
        return [self.protected[(start + i) % n] for i in range(self.settings.items)]

    def step(
        self,
        model: nn.Module,
        step: int,
        generator: torch.Generator,
        *,
        device: torch.device | str | None = None,
        autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> PreserveStep | None:
        """The preservation term of optimizer step ``step`` (``None`` when not :meth:`due`).

        Draws the inputs from ``generator``, runs the teacher (no grad) and the student on them,
        both in eval mode (no dropout), and returns ``weight * mean distance`` with its gradient
        w.r.t. this run's slice.
        """
        if not self.due(step):
            return None
        chosen = self.chosen(step)
        batch = self.task.preservation_batch([p.prompt for p in chosen], generator)
        if device is not None:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        # Both forwards in eval mode: with dropout on, teacher and student would differ by
        # their dropout masks alone, a noise floor that drowns the drift being measured.
        was_training = model.training
        if self.eval_mode:
            model.eval()
        try:
            with autocast():
                with self.handle.teacher():
                    target = self.task.preservation_outputs(model, batch).detach()
                student = self.task.preservation_outputs(model, batch)
                per_item = self.task.preservation_distance(student, target, batch)
        finally:
            model.train(was_training)
        if per_item.dim() != 1 or per_item.shape[0] != len(chosen):
            raise ConfigError(
                f"task {getattr(self.task, 'name', '?')!r}: preservation_distance returned shape "
                f"{tuple(per_item.shape)}, expected ({len(chosen)},)"
            )
        distance = per_item.mean()
        values = per_item.detach().float().cpu().tolist()
        per_prompt: dict[str, list[float]] = {}
        for p, v in zip(chosen, values, strict=True):
            per_prompt.setdefault(p.label, []).append(v)
        return PreserveStep(
            loss=distance * self.settings.weight,
            distance=float(distance.detach()),
            per_prompt={k: sum(v) / len(v) for k, v in per_prompt.items()},
        )

    def describe(self) -> str:
        """One summary line: weight, items, cadence and the prompts protected (with sources)."""
        s = self.settings
        return (
            f"  preservation: weight {s.weight}, {s.items} protected inputs every {s.every} step(s), "
            f"teacher = base + earlier deltas; {describe_protected(self.protected)}"
        )
