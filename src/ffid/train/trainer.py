"""The training recipe behind ``ffid train``: :class:`TrainRecipe` and :func:`train`.

Read it top to bottom. :meth:`TrainRecipe.setup` runs the named set-up steps in an order chosen
so that bad input never writes anything: check the config, open the data, read the resume state,
build the model, attach the selection, make the optimizer, load the resume state. ``output_dir``
and the config copy are written only with the first saved delta, so a run stopped before it (a
NaN at step 1) writes nothing either. :meth:`TrainRecipe.run` is the loop. The task (``wan``, ``causal-lm``, a
plug-in such as the demo's) gives model, data and loss and never sees this file; accelerate gives
device, autocast and processes; :class:`~ffid.train.saver.CheckpointSaver` writes outputs.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..dtypes import train_dtype
from ..errors import ConfigError, FfidError, ModelFileError, TrainingError
from .config import TrainConfig
from .data import BatchOrder, move_to
from .io import check_output_dir, make_output_dir
from .monitor import TrainMonitor, plot_losses, write_json
from .optim import build_optimizer, build_scheduler
from .preservation import make_preserver, make_projector, stored_text, trained_prompts
from .saver import CheckpointSaver
from .setup import buckets, enable_checkpointing, make_accelerator, place, resume_folder, total_steps
from .state import (
    Position,
    RunIdentity,
    check_identity,
    grad_paths_of,
    load_state,
    read_state_meta,
    set_rng_state,
)
from .summary import delta_metadata, startup_summary
from .swap import attach_block_swap
from .task import Task, check_task_args, get_task

if TYPE_CHECKING:
    from ..selection import Selection


@dataclass
class TrainResult:
    """What a finished run produced. ``handle`` is still attached to ``model`` (detach or merge it)."""

    steps: int
    epochs: float
    losses: list[float]
    output_dir: Path
    final: Path | None
    full: Path | None
    state: Path | None
    saved: list[Path] = field(default_factory=list)
    selection: Selection | None = None
    handle: Any = None
    model: nn.Module | None = None


class TrainRecipe:
    """One training run of ``cfg`` (``task`` defaults to ``cfg.model_type``'s, ``model`` to the
    task's ``build_model``). Call :meth:`setup`, then :meth:`run`; :func:`train` does both."""

    def __init__(self, cfg: TrainConfig, task: Task | None = None, model: nn.Module | None = None):
        self.cfg, self.task, self.model = cfg, task, model

    # -- set-up steps, in order --------------------------------------------------------------------
    def setup(self) -> TrainRecipe:
        """Run the set-up steps in order (each may refuse; nothing is written before the last)."""
        self.setup_config()
        self.setup_data()
        self.setup_resume_read()
        self.setup_model()
        self.setup_selection()
        try:
            self.setup_optimizer()
            self.setup_resume_load()
            self.setup_outputs()
        except BaseException:
            self.handle.detach()  # refused: a model the caller passed in is not left attached
            raise
        return self

    def setup_config(self) -> None:
        """Check every key once; the selection settings are the ones ``ffid plan`` would use."""
        cfg = self.cfg
        cfg.validate()
        check_output_dir(Path(cfg.output_dir), cfg.output_name)
        self.selection_settings = cfg.selection()
        self.task = self.task if self.task is not None else get_task(cfg.model_type)
        check_task_args(self.task, cfg.task_args)

    def setup_data(self) -> None:
        """Open the dataset (and ``rehearsal_datasets``, pooled with it); refuse empty ones."""
        cfg, task = self.cfg, self.task
        assert task is not None
        dataset = task.dataset(cfg)
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise ConfigError(
                f"dataset {cfg.dataset!r} has no items; point dataset at a folder/file with training data"
            )
        self.parts, self.n_rehearsal = [dataset], 0
        if cfg.rehearsal_datasets:
            refusal = getattr(task, "rehearsal_refusal", None)
            if refusal:
                raise ConfigError(f"rehearsal_datasets does not apply to model_type {task.name}: {refusal}")
            # each read by the task exactly as `dataset` is, then taken as one pool of items
            for extra in cfg.rehearsal_datasets:
                part = task.dataset(dataclasses.replace(cfg, dataset=extra))
                if len(part) == 0:  # type: ignore[arg-type]
                    raise ConfigError(f"rehearsal dataset {extra!r} has no items; remove it or fill it")
                self.parts.append(part)
                self.n_rehearsal += len(part)  # type: ignore[arg-type]
            dataset = torch.utils.data.ConcatDataset(self.parts)
        self.dataset = dataset
        self.n_items = len(dataset)  # type: ignore[arg-type]

    def setup_resume_read(self) -> None:
        """Find and read the resume state's metadata (checked against the run after attaching)."""
        self.resume_dir = resume_folder(self.cfg)
        self.resume_meta = read_state_meta(self.resume_dir) if self.resume_dir else None

    def setup_model(self) -> None:
        """Processes, seeds, the model on its device (block swap, checkpointing), earlier deltas."""
        from ..checkpoint import apply_delta

        cfg, task = self.cfg, self.task
        assert task is not None
        self.accelerator = acc = make_accelerator(cfg)
        self.device, self.rank, self.world = acc.device, acc.process_index, acc.num_processes
        torch.manual_seed(cfg.seed + self.rank)
        random.seed(cfg.seed + self.rank)
        model = self.model if self.model is not None else task.build_model(cfg)
        if cfg.gradient_checkpointing:
            enable_checkpointing(model)
        model.train()
        self.swapper = attach_block_swap(model, cfg.blocks_to_swap, self.device)
        place(model, self.device, self.swapper.blocks if self.swapper else [])
        for delta in cfg.base_deltas:
            # Earlier runs' deltas become part of the base (e.g. ffid 2 trained on top of ffid 1).
            apply_delta(model, delta)
        self.model = model

    def setup_selection(self) -> None:
        """Attach the selection; from here on the model trains only its proxies."""
        from ..engine import attach

        self.handle = attach(self.model, self.selection_settings, device=self.device)
        self.sel: Selection = self.handle.selection
        self.params = [p for p in self.handle.parameters() if p.requires_grad]
        if not self.params:
            self.handle.detach()
            raise ConfigError("the selection trains no element; raise ff or loosen include/exclude")

    def setup_optimizer(self) -> None:
        """Optimizer (guarded against NaN), preservation, data order, schedule, the run's identity."""
        cfg, task = self.cfg, self.task
        assert task is not None
        self.optimizer = self.handle.guard(build_optimizer(cfg, self.params))
        self.preserver, self.preserve_line = make_preserver(cfg, task, self.handle, self.parts[0])
        # after the optimizer, whose steps it hooks; refusals here still write nothing
        self.projector, line = make_projector(
            cfg,
            task,
            self.handle,
            self.parts[0],
            self.model,
            self.optimizer,
            device=self.device,
            autocast=self.accelerator.autocast,
        )
        self.preserve_line = line or self.preserve_line
        self.prompts = trained_prompts(task, self.parts[0])
        self.text = stored_text(cfg, task, self.parts[0], self.prompts)  # what each delta carries
        groups = buckets(self.parts) if cfg.batch_size > 1 else None
        self.order = BatchOrder(self.n_items, cfg.batch_size, cfg.seed, self.rank, self.world, groups)
        self.total = total_steps(cfg, self.order)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.total)
        self.generator = torch.Generator().manual_seed(cfg.seed * 7919 + self.rank)
        self.identity = RunIdentity(
            cfg.trajectory_hash(),
            self.sel.fingerprint,
            self.sel.manifest.fingerprint,
            cfg.trajectory_keys(),
            self.world,
        )

    def setup_resume_load(self) -> None:
        """Proxies, optimizer, schedule and RNG from the resume state (refused if it does not fit)."""
        self.position, self.losses = Position(), []
        if self.resume_dir is None or self.resume_meta is None:
            return
        check_identity(self.resume_dir, self.resume_meta, self.identity)
        st = load_state(self.resume_dir, self.rank)
        try:
            self.handle.load_state_dict(st["proxies"])
            self.optimizer.load_state_dict(st["optimizer"])
            self.scheduler.load_state_dict(st["scheduler"])
            set_rng_state(st["rng"], self.generator)
            # the paths the saved run took (exact, but rounding differently), not this process's choice
            self.handle.pin_grad_paths(grad_paths_of(self.resume_meta, self.rank))
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError, AttributeError) as exc:
            if isinstance(exc, FfidError):
                raise
            why = " ".join(str(exc).split())[:160]
            raise ModelFileError(
                f"resume state {str(self.resume_dir)!r} does not fit this run ({why}); "
                "it is damaged or was edited: resume from another state or start a new run"
            ) from None
        meta = self.resume_meta
        self.position = Position(meta["step"], meta["epoch"], meta["index"])
        self.losses = list(meta["losses"])[: self.position.step]

    def setup_outputs(self) -> None:
        """Logging and the saver; ``output_dir`` and the config copy wait for the first save.

        A run refused or stopped before its first save (a NaN at step 1) writes nothing, so it
        never overwrites an earlier run's ``-config.json`` and ``-loss.json`` in the same folder.
        """
        cfg, task, acc = self.cfg, self.task, self.accelerator
        assert task is not None
        self.optimizer = acc.prepare_optimizer(self.optimizer, device_placement=False)
        self.main = acc.is_main_process
        self.out = Path(cfg.output_dir)
        logging_dir = (
            None if (cfg.logging_dir or "").lower() == "none" else (cfg.logging_dir or str(self.out / "logs"))
        )
        self.monitor = TrainMonitor(
            self.total,
            self.position.step,
            self.losses,
            logging_dir=logging_dir and f"{logging_dir}/{cfg.output_name}",
            enabled=self.main,
            progress=cfg.progress,
        )
        swapped = len(self.swapper.blocks) if self.swapper else 0
        summary = startup_summary(
            cfg,
            task,
            self.sel,
            n_items=self.n_items,
            order=self.order,
            total=self.total,
            optimizer=self.optimizer,
            model=self.model,
            accelerator=acc,
            start=self.position,
            swapped=swapped,
            n_rehearsal=self.n_rehearsal,
        )
        self.monitor.note(summary + "\n" + self.preserve_line)
        self.saver = CheckpointSaver(
            out=self.out,
            output_name=cfg.output_name,
            accelerator=acc,
            handle=self.handle,
            identity=self.identity,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            generator=self.generator,
            metadata=lambda step, epoch: delta_metadata(cfg, task, self.sel, step, epoch, self.prompts),
            indices=cfg.delta_indices,
            before_first=self._start_outputs,
            text=self.text,
        )

    def _start_outputs(self) -> None:
        """Create ``output_dir`` and write the config copy (main process, before the first save)."""
        make_output_dir(self.out)
        write_json(self.out / f"{self.cfg.output_name}-config.json", self.cfg.to_dict())

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train to ``total`` steps, saving on the way; returns what was written."""
        cfg, task, acc, saver = self.cfg, self.task, self.accelerator, self.saver
        assert task is not None and self.model is not None
        batches = self.order.iterate(self.position.epoch, self.position.index)
        pos = self.position  # where the next micro-batch comes from, and the optimizer steps done
        finished = False
        try:
            while pos.step < self.total:
                step_loss, epoch_done, pos = self._accumulate(batches, pos)
                kept = self._preserve(pos.step)
                if self.swapper is not None:
                    self.swapper.settle()
                step_loss = self._reduce(step_loss)
                if cfg.max_grad_norm > 0:
                    acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                pos = dataclasses.replace(pos, step=pos.step + 1)
                extra = None
                if kept is not None:
                    extra = {"preserve/distance": kept.distance}
                    extra.update({f"preserve/{k}": v for k, v in kept.per_prompt.items()})
                self.monitor.step(pos.step, step_loss, self.scheduler.get_last_lr()[0], extra)

                more = pos.step < self.total
                if more and cfg.save_every_n_steps and pos.step % cfg.save_every_n_steps == 0:
                    saver.save(
                        f"{cfg.output_name}-step{pos.step:08d}", pos, self.monitor.losses, cfg.save_state
                    )
                if (
                    more
                    and epoch_done
                    and cfg.save_every_n_epochs
                    and pos.epoch % cfg.save_every_n_epochs == 0
                ):
                    saver.save(f"{cfg.output_name}-{pos.epoch:06d}", pos, self.monitor.losses, cfg.save_state)
                if cfg.sample_every_n_steps and pos.step % cfg.sample_every_n_steps == 0:
                    self._sample(pos.step)
            finished = True
        finally:
            self.monitor.close()
            if not finished and self.saver.saved:  # stopped: the losses up to the last save
                self._write_losses()
        return self._finish(pos)

    def _write_losses(self) -> None:
        """The loss curve and ``-loss.json`` (main process; only next to a saved delta)."""
        cfg, task = self.cfg, self.task
        assert task is not None
        if not self.main:
            return
        title = f"{cfg.output_name}: {task.name}"
        plot_losses(self.monitor.losses, self.out / f"{cfg.output_name}-loss.png", title)
        write_json(self.out / f"{cfg.output_name}-loss.json", {"losses": self.monitor.losses})

    def _accumulate(self, batches: Any, pos: Position) -> tuple[float, bool, Position]:
        """Forward and backward ``gradient_accumulation_steps`` micro-batches; the mean loss."""
        cfg, task, acc = self.cfg, self.task, self.accelerator
        assert task is not None
        step_loss, epoch_done = 0.0, False
        for _ in range(cfg.gradient_accumulation_steps):
            epoch, index, ids = next(batches)
            batch = move_to(task.collate([self.dataset[i] for i in ids]), self.device)
            with acc.autocast():
                loss = task.loss(self.model, batch, self.generator)
            value = float(loss.detach())
            if not math.isfinite(value):
                last = self.saver.last
                kept = f"the last good checkpoint is {str(last)!r}" if last else "nothing was saved yet"
                raise TrainingError(
                    f"loss is {value} at step {pos.step + 1} (epoch {epoch + 1}); training "
                    f"stopped, {kept}; lower learning_rate or max_grad_norm, or check the data"
                )
            acc.backward(loss / cfg.gradient_accumulation_steps)
            step_loss += value / cfg.gradient_accumulation_steps
            wrapped = index + 1 >= self.order.batches_per_epoch
            pos = Position(pos.step, epoch + 1 if wrapped else epoch, 0 if wrapped else index + 1)
            epoch_done = epoch_done or wrapped
        return step_loss, epoch_done, pos

    def _preserve(self, step: int) -> Any:
        """The preservation term of this step (backpropagated), or None when it does not run."""
        if self.preserver is None:
            return None
        acc = self.accelerator
        kept = self.preserver.step(
            self.model, step, self.generator, device=self.device, autocast=acc.autocast
        )
        if kept is None:
            return None
        if not math.isfinite(kept.distance):
            raise TrainingError(
                f"preservation distance is {kept.distance} at step {step + 1}; training stopped; "
                "lower learning_rate or preserve_weight"
            )
        acc.backward(kept.loss)
        return kept

    def _reduce(self, step_loss: float) -> float:
        """Average gradients and the loss over processes (one process: unchanged)."""
        if self.world == 1:
            return step_loss
        acc = self.accelerator
        for p in self.params:
            if p.grad is not None:
                p.grad = acc.reduce(p.grad, reduction="mean")
        return float(acc.reduce(torch.tensor(step_loss, device=self.device), reduction="mean"))

    def _sample(self, step: int) -> None:
        task, model = self.task, self.model
        if not self.main or not hasattr(task, "sample"):
            return
        assert model is not None
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                task.sample(model, step, self.out / "sample")  # type: ignore[union-attr]
        finally:
            model.train(was_training)

    def _finish(self, pos: Position) -> TrainResult:
        """Final delta (and state), the full model if asked, the last sample; leave the group."""
        cfg, task, acc = self.cfg, self.task, self.accelerator
        assert task is not None
        if self.swapper is not None:
            self.swapper.remove(self.device)
        self.saver.save(cfg.output_name, pos, self.monitor.losses, cfg.save_state)
        self._write_losses()
        full = None
        if cfg.save_full and self.main:
            full = self.out / f"{cfg.output_name}-full.safetensors"
            self.handle.save_full(
                full,
                dtype=train_dtype(cfg.save_precision),
                metadata=delta_metadata(cfg, task, self.sel, pos.step, pos.epoch, self.prompts),
            )
        if cfg.sample_every_n_steps and pos.step % cfg.sample_every_n_steps:
            self._sample(pos.step)
        acc.wait_for_everyone()
        if self.world > 1:
            # leave the process group before the interpreter shuts down: gloo can abort a process
            # whose group is torn down during finalisation
            acc.end_training()
        final = self.out / f"{cfg.output_name}.safetensors"
        self.monitor.note(f"ffid train: done, {pos.step} steps; delta {final}")
        return TrainResult(
            steps=pos.step,
            epochs=pos.step * cfg.gradient_accumulation_steps / self.order.batches_per_epoch,
            losses=list(self.monitor.losses),
            output_dir=self.out,
            final=final if self.main else None,
            full=full,
            state=self.saver.state_path,
            saved=self.saver.saved,
            selection=self.sel,
            handle=self.handle,
            model=self.model,
        )


def train(cfg: TrainConfig, task: Task | None = None, model: nn.Module | None = None) -> TrainResult:
    """Train ``cfg.ff`` of the model's weights (selection ``cfg.ffid``) and save deltas/states.

    ``task`` defaults to the one named by ``cfg.model_type``; ``model`` defaults to
    ``task.build_model(cfg)`` (pass one to train a model you already hold, e.g. a merged base).
    Raises :class:`~ffid.errors.FfidError` subclasses for bad input before writing anything, and
    :class:`~ffid.errors.TrainingError` when the loss stops being finite.
    """
    return TrainRecipe(cfg, task, model).setup().run()


__all__ = ["TrainRecipe", "TrainResult", "train"]
