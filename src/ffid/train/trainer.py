"""The training loop behind ``ffid train``: one function, :func:`train`.

It wires the pieces together: the task gives model, data and loss; :func:`ffid.attach`
decides and hooks the trained elements; accelerate gives device, autocast and processes.
Everything else (data order, accumulation, clipping, schedule, saving, resume, logging) is here.

Order of work, chosen so that bad input never writes anything: validate the config, open the
dataset (missing/empty -> error), read and check the resume state, build and attach the model,
and only then create ``output_dir``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ConfigError, FfidError, ModelFileError, TrainingError
from ..estimate.optimizer import optimizer_state_bytes
from ..preserve import Preservable, Preserver, PreserveSettings, prompt_metadata, protected_prompts
from .config import TrainConfig
from .data import BatchOrder, move_to
from .io import make_output_dir
from .monitor import TrainMonitor, format_bytes, peak_memory, plot_losses, write_json
from .optim import build_optimizer, build_scheduler
from .state import (
    Position,
    RunIdentity,
    check_identity,
    latest_state,
    load_state,
    read_state_meta,
    rng_state,
    save_state,
    set_rng_state,
)
from .swap import attach_block_swap
from .task import Task, check_task_args, get_task

if TYPE_CHECKING:
    from ..selection import Selection

DEFAULT_MAX_STEPS = 1600  # kohya's default when neither steps nor epochs are given


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


def _dtype(name: str) -> torch.dtype | None:
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(name)


def model_dtype(cfg: TrainConfig) -> torch.dtype | None:
    """The dtype the task should load base weights in (``None``: keep the file's)."""
    return _dtype(cfg.model_dtype)


def _accelerator(cfg: TrainConfig) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        # accelerate keeps one process-wide state; a second run in the same process (tests, the
        # demo's two stages) may want another mixed precision, which needs a fresh state.
        AcceleratorState._reset_state(True)
        PartialState._reset_state()
    try:
        # Without cpu=True, accelerate treats a multi-process launch on a machine with no GPU as
        # one process per copy (each would train alone and write the same files); with it, the
        # processes form a gloo group like they form an NCCL one on GPUs.
        cpu = world > 1 and not torch.cuda.is_available()
        return Accelerator(mixed_precision=cfg.mixed_precision, cpu=cpu)
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"mixed_precision {cfg.mixed_precision!r} is not usable here: {exc}") from None


def _enable_checkpointing(model: nn.Module) -> None:
    if hasattr(model, "gradient_checkpointing_enable"):  # transformers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "enable_gradient_checkpointing"):  # diffusers
        model.enable_gradient_checkpointing()
    else:
        raise ConfigError(
            f"gradient_checkpointing: {type(model).__name__} has no gradient checkpointing switch; "
            "turn the key off"
        )


def _place(model: nn.Module, device: torch.device, keep: list[nn.Module]) -> None:
    """Move the model to ``device`` except the modules in ``keep`` (blocks parked by block swap)."""
    skip = {id(t) for m in keep for t in [*m.parameters(), *m.buffers()]}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in skip and t.device != device:
            t.data = t.data.to(device)


def _resume_folder(cfg: TrainConfig) -> Path | None:
    if not cfg.resume:
        return None
    if cfg.resume == "latest":
        found = latest_state(Path(cfg.output_dir), cfg.output_name)
        if found is None:
            raise ConfigError(
                f"resume = 'latest' but {cfg.output_dir!r} holds no '{cfg.output_name}*-state' "
                "folder; train with save_state = true first or name a state folder"
            )
        return found
    return Path(cfg.resume)


def _total_steps(cfg: TrainConfig, order: BatchOrder) -> int:
    if cfg.max_train_epochs:
        return max(
            1, math.ceil(cfg.max_train_epochs * order.batches_per_epoch / cfg.gradient_accumulation_steps)
        )
    return cfg.max_train_steps or DEFAULT_MAX_STEPS


def _metadata(
    cfg: TrainConfig, task: Task, sel: Selection, step: int, epoch: int, prompts: list[str]
) -> dict[str, str]:
    """kohya ``ss_*`` training keys and the prompts this run trained (for later runs to protect);
    the checkpoint writer adds the selection and model-spec keys."""
    return {
        **prompt_metadata(prompts, cfg.trigger_words),
        "ss_learning_rate": str(cfg.learning_rate),
        "ss_optimizer": cfg.optimizer_type
        + (f"({','.join(cfg.optimizer_args)})" if cfg.optimizer_args else ""),
        "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_mixed_precision": cfg.mixed_precision,
        "ss_seed": str(cfg.seed),
        "ss_steps": str(step),
        "ss_epoch": str(epoch),
        "ss_batch_size": str(cfg.batch_size),
        "ss_gradient_accumulation_steps": str(cfg.gradient_accumulation_steps),
        "ss_max_grad_norm": str(cfg.max_grad_norm),
        "ss_base_model_version": str(task.name),
        "ss_dataset": Path(cfg.dataset).name if cfg.dataset else "",
    }


def _buckets(parts: list[Any]) -> tuple[int, ...] | None:
    """A bucket id per item when the datasets tell item shapes (``bucket_keys``) and they differ:
    batches then never mix shapes. ``None`` when there is one shape or the datasets do not say."""
    keys: list[Any] = []
    for part in parts:
        part_keys = getattr(part, "bucket_keys", None)
        if part_keys is None:
            return None
        keys.extend(part_keys)
    distinct = sorted(set(keys))
    if len(distinct) < 2:
        return None
    ids = {k: i for i, k in enumerate(distinct)}
    return tuple(ids[k] for k in keys)


def _trained_prompts(task: Task, dataset: Any) -> list[str]:
    """The prompts/captions of this run's own data (not rehearsal), as the task reports them."""
    fn = getattr(task, "trained_prompts", None)
    return [p for p in fn(dataset) if p] if callable(fn) else []


def _preserver(cfg: TrainConfig, task: Task, handle: Any, dataset: Any) -> tuple[Preserver | None, str]:
    """The run's :class:`Preserver` (or None) and a line for the start-up summary.

    ``preserve = auto`` turns it on for runs on top of ``base_deltas``; every bad setting is
    refused here, before anything is written.
    """
    if cfg.preserve == "off" or (cfg.preserve == "auto" and not cfg.base_deltas):
        why = "preserve = off" if cfg.preserve == "off" else "no base_deltas"
        return None, f"  preservation: off ({why})"
    if not isinstance(task, Preservable):
        if cfg.preserve == "on":
            raise ConfigError(
                f"preserve = on, but task {task.name!r} does not support preservation (it lacks "
                "preservation_batch/preservation_outputs/preservation_distance); set preserve = 'off'"
            )
        return None, f"  preservation: off (task {task.name!r} does not support it)"
    regularisation: list[str] = []
    if cfg.preserve_regularisation and callable(getattr(task, "regularisation_prompts", None)):
        regularisation = list(task.regularisation_prompts(dataset))  # type: ignore[attr-defined]
    protected = protected_prompts(
        cfg.base_deltas, empty=cfg.preserve_empty, regularisation=regularisation, extra=cfg.preserve_prompts
    )
    notes: list[str] = []
    prepare = getattr(task, "prepare_preservation", None)
    if callable(prepare):
        # e.g. the wan task finds each prompt's text encoding in the caches (or refuses)
        protected, notes = prepare(protected, cfg, dataset)
    items = cfg.preserve_items or max(1, cfg.batch_size // 4)
    preserver = Preserver(
        handle, task, protected, PreserveSettings(cfg.preserve_weight, items, cfg.preserve_every)
    )
    return preserver, "\n".join([preserver.describe(), *(f"  preservation: {n}" for n in notes)])


def _summary(
    cfg: TrainConfig,
    task: Task,
    sel: Selection,
    n_items: int,
    order: BatchOrder,
    total: int,
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    accelerator: Any,
    start: Position,
    swapped: int,
    n_rehearsal: int = 0,
) -> str:
    proxies = sum(p.numel() * p.element_size() for g in optimizer.param_groups for p in g["params"])
    rehearsed = f" ({n_rehearsal} of them from rehearsal_datasets)" if n_rehearsal else ""
    base = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    params = [p.shape for g in optimizer.param_groups for p in g["params"]]
    states = optimizer_state_bytes(cfg.optimizer_type, params, optimizer.defaults)
    epochs = total * cfg.gradient_accumulation_steps / order.batches_per_epoch
    lines = [
        f"ffid train: {task.name}  {sel.selector} ff={cfg.ff} ffid={cfg.ffid}  fingerprint {sel.fingerprint}",
        f"  items {n_items}{rehearsed}, batch {cfg.batch_size} x {accelerator.num_processes} process(es) x "
        f"{cfg.gradient_accumulation_steps} accumulation, {order.batches_per_epoch} micro-batches/epoch"
        + (f" from {len(set(order.groups))} buckets (one latent shape per batch)" if order.groups else ""),
        f"  steps {total} ({epochs:.2f} epochs)" + (f", resuming at step {start.step}" if start.step else ""),
        f"  trainable params {sel.selected:,} of {sel.total_params:,} "
        f"({sel.selected / sel.total_params:.4%}) in {len(sel)} tensors",
        f"  memory: base weights {format_bytes(base)}, trained values {format_bytes(proxies)}, "
        f"optimizer state {'unknown' if states is None else '~' + format_bytes(states)}; "
        f"{peak_memory(accelerator.device)} so far",
        f"  device {accelerator.device}, mixed precision {cfg.mixed_precision}, "
        f"optimizer {cfg.optimizer_type}, lr {cfg.learning_rate} ({cfg.lr_scheduler}), checkpointing "
        f"{'on' if cfg.gradient_checkpointing else 'off'}, blocks swapped {swapped}",
    ]
    return "\n".join(lines)


def train(cfg: TrainConfig, task: Task | None = None, model: nn.Module | None = None) -> TrainResult:
    """Train ``cfg.ff`` of the model's weights (selection ``cfg.ffid``) and save deltas/states.

    ``task`` defaults to the one named by ``cfg.model_type``; ``model`` defaults to
    ``task.build_model(cfg)`` (pass one to train a model you already hold, e.g. a merged base).
    Raises :class:`~ffid.errors.FfidError` subclasses for bad input before writing anything, and
    :class:`~ffid.errors.TrainingError` when the loss stops being finite.
    """
    from ..checkpoint import apply_delta
    from ..engine import attach
    from ..select import check_ff, check_ffid

    cfg.validate()
    if cfg.ff is None or cfg.ffid is None:
        raise ConfigError("ff and ffid are required; add e.g. ff = 0.01 and ffid = 1 to the config or flags")
    check_ff(cfg.ff)
    check_ffid(cfg.ffid)
    task = task if task is not None else get_task(cfg.model_type)
    check_task_args(task, cfg.task_args)

    dataset = task.dataset(cfg)
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ConfigError(
            f"dataset {cfg.dataset!r} has no items; point dataset at a folder/file with training data"
        )
    n_rehearsal = 0
    parts = [dataset]
    if cfg.rehearsal_datasets:
        if task.name == "demo":
            raise ConfigError(
                "rehearsal_datasets does not apply to model_type demo, whose data is built in; "
                "rehearse earlier concepts with task_args.prior instead"
            )
        # each read by the task exactly as `dataset` is, then taken as one pool of items
        for extra in cfg.rehearsal_datasets:
            part = task.dataset(dataclasses.replace(cfg, dataset=extra))
            if len(part) == 0:  # type: ignore[arg-type]
                raise ConfigError(f"rehearsal dataset {extra!r} has no items; remove it or fill it")
            parts.append(part)
            n_rehearsal += len(part)  # type: ignore[arg-type]
        dataset = torch.utils.data.ConcatDataset(parts)
    n_items = len(dataset)  # type: ignore[arg-type]

    resume_dir = _resume_folder(cfg)
    resume_meta = read_state_meta(resume_dir) if resume_dir else None

    accelerator = _accelerator(cfg)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)

    if model is None:
        model = task.build_model(cfg)
    if cfg.gradient_checkpointing:
        _enable_checkpointing(model)
    model.train()
    swapper = attach_block_swap(model, cfg.blocks_to_swap, device)
    _place(model, device, swapper.blocks if swapper else [])

    plan_kwargs: dict[str, Any] = {"include": cfg.include or None, "exclude": cfg.exclude or None}
    if cfg.slots is not None:
        plan_kwargs["slots"] = cfg.slots
    for delta in cfg.base_deltas:
        # Earlier runs' deltas become part of the base (e.g. ffid 2 trained on top of ffid 1).
        apply_delta(model, delta)
    handle = attach(model, ff=cfg.ff, ffid=cfg.ffid, selector=cfg.selector, device=device, **plan_kwargs)
    sel: Selection = handle.selection
    params = [p for p in handle.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the selection trains no element; raise ff or loosen include/exclude")
    optimizer = handle.guard(build_optimizer(cfg, params))
    try:
        preserver, preserve_line = _preserver(cfg, task, handle, parts[0])
    except Exception:
        handle.detach()  # refused: a model the caller passed in is not left attached
        raise
    prompts = _trained_prompts(task, parts[0])

    groups = _buckets(parts) if cfg.batch_size > 1 else None
    order = BatchOrder(n_items, cfg.batch_size, cfg.seed, rank, world, groups)
    total = _total_steps(cfg, order)
    scheduler = build_scheduler(cfg, optimizer, total)
    generator = torch.Generator().manual_seed(cfg.seed * 7919 + rank)
    identity = RunIdentity(
        cfg.trajectory_hash(), sel.fingerprint, sel.manifest.fingerprint, cfg.trajectory_keys(), world
    )

    pos, losses = Position(), []
    if resume_dir is not None and resume_meta is not None:
        check_identity(resume_dir, resume_meta, identity)
        st = load_state(resume_dir, rank)
        try:
            handle.load_state_dict(st["proxies"])
            optimizer.load_state_dict(st["optimizer"])
            scheduler.load_state_dict(st["scheduler"])
            set_rng_state(st["rng"], generator)
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError, AttributeError) as exc:
            if isinstance(exc, FfidError):
                raise
            why = " ".join(str(exc).split())[:160]
            raise ModelFileError(
                f"resume state {str(resume_dir)!r} does not fit this run ({why}); "
                "it is damaged or was edited: resume from another state or start a new run"
            ) from None
        pos = Position(resume_meta["step"], resume_meta["epoch"], resume_meta["index"])
        losses = list(resume_meta["losses"])[: pos.step]

    optimizer = accelerator.prepare_optimizer(optimizer, device_placement=False)
    main = accelerator.is_main_process
    out = Path(cfg.output_dir)
    logging_dir = (
        None if (cfg.logging_dir or "").lower() == "none" else (cfg.logging_dir or str(out / "logs"))
    )
    if main:
        make_output_dir(out)
        write_json(out / f"{cfg.output_name}-config.json", cfg.to_dict())
    monitor = TrainMonitor(
        total,
        pos.step,
        losses,
        logging_dir=logging_dir and f"{logging_dir}/{cfg.output_name}",
        enabled=main,
        progress=cfg.progress,
    )
    monitor.note(
        _summary(
            cfg,
            task,
            sel,
            n_items,
            order,
            total,
            optimizer,
            model,
            accelerator,
            pos,
            len(swapper.blocks) if swapper else 0,
            n_rehearsal,
        )
        + "\n"
        + preserve_line
    )

    saved: list[Path] = []
    state_path: Path | None = None

    def save(step: int, stem: str, with_state: bool) -> None:
        """Write the delta ``{stem}.safetensors`` and, if asked, the state of this step."""
        nonlocal state_path
        accelerator.wait_for_everyone()
        if main:
            path = out / f"{stem}.safetensors"
            handle.save_delta(path, metadata=_metadata(cfg, task, sel, step, cur_epoch, prompts))
            saved.append(path)
        if with_state:
            folder = out / f"{cfg.output_name}-step{step:08d}-state"
            rngs = (
                accelerator.gather_for_metrics([rng_state(generator)])
                if world > 1
                else [rng_state(generator)]
            )
            if main:
                save_state(
                    folder,
                    identity=identity,
                    position=Position(step, cur_epoch, cur_index),
                    proxies=handle.state_dict(),
                    optimizer=optimizer,
                    scheduler=scheduler,
                    rng=dict(enumerate(rngs)),
                    losses=monitor.losses,
                )
                state_path = folder
        accelerator.wait_for_everyone()

    batches = order.iterate(pos.epoch, pos.index)
    cur_epoch, cur_index = pos.epoch, pos.index
    step = pos.step
    sample_dir = out / "sample"
    try:
        while step < total:
            step_loss = 0.0
            epoch_done = False
            for _ in range(cfg.gradient_accumulation_steps):
                epoch, index, ids = next(batches)
                batch = move_to(task.collate([dataset[i] for i in ids]), device)
                with accelerator.autocast():
                    loss = task.loss(model, batch, generator)
                value = float(loss.detach())
                if not math.isfinite(value):
                    where = saved[-1] if saved else None
                    kept = f"the last good checkpoint is {str(where)!r}" if where else "nothing was saved yet"
                    raise TrainingError(
                        f"loss is {value} at step {step + 1} (epoch {epoch + 1}); training "
                        f"stopped, {kept}; lower learning_rate or max_grad_norm, or check the data"
                    )
                accelerator.backward(loss / cfg.gradient_accumulation_steps)
                step_loss += value / cfg.gradient_accumulation_steps
                cur_epoch, cur_index = (
                    (epoch, index + 1) if index + 1 < order.batches_per_epoch else (epoch + 1, 0)
                )
                epoch_done = epoch_done or cur_index == 0
            kept = None
            if preserver is not None:
                kept = preserver.step(model, step, generator, device=device, autocast=accelerator.autocast)
            if kept is not None:
                if not math.isfinite(kept.distance):
                    raise TrainingError(
                        f"preservation distance is {kept.distance} at step {step + 1}; training stopped; "
                        "lower learning_rate or preserve_weight"
                    )
                accelerator.backward(kept.loss)
            if swapper is not None:
                swapper.settle()
            if world > 1:
                for p in params:
                    if p.grad is not None:
                        p.grad = accelerator.reduce(p.grad, reduction="mean")
                step_loss = float(
                    accelerator.reduce(torch.tensor(step_loss, device=device), reduction="mean")
                )
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            extra = None
            if kept is not None:
                extra = {"preserve/distance": kept.distance}
                extra.update({f"preserve/{k}": v for k, v in kept.per_prompt.items()})
            monitor.step(step, step_loss, scheduler.get_last_lr()[0], extra)

            if cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0 and step < total:
                save(step, f"{cfg.output_name}-step{step:08d}", cfg.save_state)
            if (
                epoch_done
                and cfg.save_every_n_epochs
                and cur_epoch % cfg.save_every_n_epochs == 0
                and step < total
            ):
                save(step, f"{cfg.output_name}-{cur_epoch:06d}", cfg.save_state)
            if (
                cfg.sample_every_n_steps
                and step % cfg.sample_every_n_steps == 0
                and main
                and hasattr(task, "sample")
            ):
                _sample(task, model, step, sample_dir)
    finally:
        monitor.close()
        if main:
            title = f"{cfg.output_name}: {task.name}"
            plot_losses(monitor.losses, out / f"{cfg.output_name}-loss.png", title)
            write_json(out / f"{cfg.output_name}-loss.json", {"losses": monitor.losses})

    if swapper is not None:
        swapper.remove(device)
    save(step, cfg.output_name, cfg.save_state)
    full = None
    if cfg.save_full and main:
        full = out / f"{cfg.output_name}-full.safetensors"
        handle.save_full(
            full,
            dtype=_dtype(cfg.save_precision),
            metadata=_metadata(cfg, task, sel, step, cur_epoch, prompts),
        )
    if cfg.sample_every_n_steps and main and hasattr(task, "sample") and step % cfg.sample_every_n_steps:
        _sample(task, model, step, sample_dir)
    accelerator.wait_for_everyone()
    if world > 1:
        # leave the process group before the interpreter shuts down: gloo can abort a process
        # whose group is torn down during finalisation
        accelerator.end_training()
    final = out / f"{cfg.output_name}.safetensors"
    monitor.note(f"ffid train: done, {step} steps; delta {final}")
    return TrainResult(
        steps=step,
        epochs=step * cfg.gradient_accumulation_steps / order.batches_per_epoch,
        losses=list(monitor.losses),
        output_dir=out,
        final=final if main else None,
        full=full,
        state=state_path,
        saved=saved,
        selection=sel,
        handle=handle,
        model=model,
    )


def _sample(task: Task, model: nn.Module, step: int, out_dir: Path) -> None:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            task.sample(model, step, out_dir)  # type: ignore[attr-defined]
    finally:
        model.train(was_training)


__all__ = ["TrainResult", "model_dtype", "train"]
