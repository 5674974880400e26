"""The estimate of a run: plan the selection exactly as training does, then add up the parts
(base weights, engine allocations, optimizer state, activations, host RAM, delta file)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..dtypes import DTYPE_BYTES
from ..errors import CapacityError, ConfigError
from ..manifest import Manifest
from ..select import SelectionSettings, check_ff
from ..selection import Selection
from .activations import NOT_INCLUDED, activation_bytes, tokens_per_call
from .base import check_base_dtype, compute_dtype_of, place_base
from .disk import delta_file_bytes
from .engine import (
    ENGINE,
    GRAD_PATHS,
    EngineLayout,
    grad_path_bytes,
    index_bytes,
    touched_tensors,
    workspace_bytes,
)
from .optimizer import check_optimizer
from .result import Estimate, use_case


def estimate_selection(
    selection: Selection,
    *,
    optimizer: str = "adamw",
    base_dtype: str | None = None,
    blocks_to_swap: int = 0,
    activations_gb: float | None = None,
    video_size: Sequence[int] | None = None,
    frames: int | None = None,
    batch_size: int = 1,
    engine: EngineLayout = ENGINE,
    grad_path: str = "auto",
) -> Estimate:
    """Memory needs of training ``selection`` (see :mod:`ffid.estimate` for the parts).

    ``grad_path`` is the engine's proxy-gradient path (``auto``, ``sampled``, ``dense``,
    ``chunked``; see ``ffid.engine.paths``): its transient counts in the workspace.
    """
    if grad_path not in GRAD_PATHS:
        raise ConfigError(f"--grad_path {grad_path!r} is not one of {', '.join(GRAD_PATHS)}")
    opt = check_optimizer(optimizer)
    base_dtype = check_base_dtype(base_dtype)
    manifest = selection.manifest
    compute = compute_dtype_of(manifest, base_dtype)
    base = place_base(manifest, base_dtype, int(blocks_to_swap))
    counts = [p.count for p in selection.values()]
    k = sum(counts)
    touched = touched_tensors(selection)
    tokens = tokens_per_call(manifest, video_size, frames, batch_size)

    gpu = {
        "base_resident": base.resident,
        "swap_in_flight": base.in_flight,
        "proxies": k * engine.proxy_bytes,
        "indices": index_bytes(touched, engine),
        "gradients": k * engine.grad_bytes,
        "optimizer": opt.state_bytes(counts),
        "workspace": workspace_bytes(touched, manifest, base_dtype, compute, engine),
        "grad_path": grad_path_bytes(touched, grad_path, tokens, engine),
    }
    not_included: list[str] = []
    notes: list[str] = []
    activations = activation_bytes(
        manifest, activations_gb, video_size, frames, batch_size, DTYPE_BYTES[compute], notes
    )
    if activations is None:
        not_included.append(NOT_INCLUDED)
    else:
        gpu["activations"] = activations
    not_included.append("CUDA context and allocator fragmentation (typically 0.3-1 GiB)")

    host = {
        "swapped_blocks": base.parked,
        "load_peak": sum(t.nbytes for t in manifest),
    }
    notes.append(
        "host peak assumes the whole state dict is in RAM once while loading (musubi-tuner does this)"
    )
    if base.parked and opt.name == "adamw8bit":
        notes.append(
            "adamw8bit with block swap: proxies and their state stay on the GPU, so bitsandbytes works"
        )

    ff = float(selection.params.get("ff", selection.fraction))
    return Estimate(
        ff=ff,
        selector=selection.selector,
        ffid=int(selection.params.get("ffid", 0)),
        selector_options=SelectionSettings.from_selection(selection).resolved_options,
        trainable=k,
        total_params=selection.total_params,
        tensors_touched=len(selection),
        tensors_total=len(manifest),
        optimizer=opt.name,
        base_dtype=base_dtype or "as stored",
        compute_dtype=compute,
        blocks=base.blocks,
        blocks_to_swap=int(blocks_to_swap),
        gpu=gpu,
        host=host,
        delta_file_bytes=delta_file_bytes(selection),
        hint=use_case(ff),
        not_included=not_included,
        notes=notes,
    )


def _plan_for_estimate(manifest: Manifest, settings: SelectionSettings, notes: list[str]) -> Selection:
    """The selection of ``settings``; when ``ff`` does not fit its layout and the options the
    selector would change to fit it were not given, the nearest layout that fits (memory does not
    depend on the layout), with a note saying which options to train with."""
    try:
        return settings.plan(manifest)
    except CapacityError:
        selector = settings.selector_object
        fitting = selector.fitting_options(
            manifest, settings.eligible(manifest), settings.ff, settings.ffid, settings.resolved_options
        )
        if fitting is None:
            raise
        changed = {k: v for k, v in fitting.items() if settings.resolved_options.get(k) != v}
        if any(k in settings.options for k in changed):  # a layout the user chose: that one or none
            raise
        flags = " ".join(f"--{k} {v}" for k, v in changed.items())
        notes.append(
            f"--ff {settings.ff:g} does not fit the default layout "
            f"({selector.describe(settings.resolved_options)}); "
            f"estimated with {flags} (ids 0..{selector.ids(fitting) - 1}): train with the same {flags}"
        )
        return settings.replace(options=fitting).plan(manifest)


def estimate(
    model: Any,
    ffs: float | Sequence[float],
    *,
    ffid: int = 0,
    selector: str | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    block_pattern: str | None = None,
    optimizer: str = "adamw",
    base_dtype: str | None = None,
    blocks_to_swap: int = 0,
    activations_gb: float | None = None,
    video_size: Sequence[int] | None = None,
    frames: int | None = None,
    batch_size: int = 1,
    grad_path: str = "auto",
    **selector_options: Any,
) -> list[Estimate]:
    """Estimate memory for each ``ff`` of ``ffs`` on ``model`` (module, path, preset or manifest).

    The selection is planned exactly as training would plan it (``selector`` and
    ``selector_options`` such as ``slots=``, ``seed=`` as for :func:`ffid.plan`); only names,
    shapes and dtypes are read. Bad values raise :class:`~ffid.errors.ConfigError` with one line
    saying how to fix them.
    """
    single = isinstance(ffs, (int, float, str))
    values = [ffs] if single else list(ffs)  # type: ignore[list-item]
    if not values:
        raise ConfigError("give at least one --ff value, e.g. --ff 0.001 0.01")
    fracs = [check_ff(v) for v in values]
    settings = [
        SelectionSettings.create(
            ff,
            ffid,
            selector,
            include=include,
            exclude=exclude,
            block_pattern=block_pattern,
            **selector_options,
        )
        for ff in fracs
    ]
    check_optimizer(optimizer)
    check_base_dtype(base_dtype)
    manifest = settings[0].manifest(model)
    out = []
    for one in settings:
        notes: list[str] = []
        sel = _plan_for_estimate(manifest, one, notes)
        est = estimate_selection(
            sel,
            optimizer=optimizer,
            base_dtype=base_dtype,
            blocks_to_swap=blocks_to_swap,
            activations_gb=activations_gb,
            video_size=video_size,
            frames=frames,
            batch_size=batch_size,
            grad_path=grad_path,
        )
        est.notes[:0] = notes
        out.append(est)
    return out
