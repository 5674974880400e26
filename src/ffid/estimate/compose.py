"""The estimate of a run: plan the selection exactly as training does, then add up the parts
(base weights, engine allocations, optimizer state, activations, host RAM, delta file)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ..dtypes import DTYPE_BYTES
from ..errors import CapacityError, ConfigError
from ..manifest import Manifest
from ..select import SelectionSettings, check_ff
from ..selection import Selection
from .activations import NOT_INCLUDED, GiB, activation_bytes, tokens_per_call
from .base import FP8_SCALED, check_base_dtype, check_fp8_scaled, compute_dtype_of, place_base
from .disk import CAPTION_TOKENS_MAX, delta_file_bytes, text_encodings_bytes
from .engine import (
    ENGINE,
    GRAD_PATHS,
    EngineLayout,
    dequant_kept_bytes,
    grad_path_bytes,
    index_bytes,
    touched_tensors,
    workspace_bytes,
)
from .experts import check_experts, place_inactive_expert
from .optimizer import check_optimizer
from .result import CONTEXT_BYTES, Estimate, Fit, use_case


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
    experts: int = 1,
    offload_inactive_dit: bool = False,
    captions: int = 0,
    caption_tokens: int = CAPTION_TOKENS_MAX,
) -> Estimate:
    """Memory needs of training ``selection`` (see :mod:`ffid.estimate` for the parts).

    ``captions`` captions of ``caption_tokens`` tokens: the text encodings a Wan run stores in
    each delta, counted in the delta file's size (0: left out, with a note saying so).

    ``grad_path`` is the engine's proxy-gradient path (``auto``, ``sampled``, ``dense``,
    ``chunked``; see ``ffid.engine.paths``): its transient counts in the workspace.
    ``experts=2`` is a Wan 2.2 A14B run of both experts (musubi's ``--dit_high_noise``, see
    :mod:`ffid.estimate.experts`): the same selection in each, one set of proxies and optimizer
    state per expert.
    """
    if grad_path not in GRAD_PATHS:
        raise ConfigError(f"--grad_path {grad_path!r} is not one of {', '.join(GRAD_PATHS)}")
    opt = check_optimizer(optimizer)
    base_dtype = check_base_dtype(base_dtype)
    experts = check_experts(experts, offload_inactive_dit, int(blocks_to_swap))
    manifest = selection.manifest
    if base_dtype == FP8_SCALED:
        check_fp8_scaled(manifest)
    compute = compute_dtype_of(manifest, base_dtype)
    base = place_base(manifest, base_dtype, int(blocks_to_swap))
    counts = [p.count for p in selection.values()]
    k = sum(counts)
    touched = touched_tensors(selection)
    tokens = tokens_per_call(manifest, video_size, frames, batch_size)

    gpu = {
        "base_resident": base.resident,
        "swap_in_flight": base.in_flight,
        "proxies": experts * k * engine.proxy_bytes,
        "indices": index_bytes(touched, engine),
        "gradients": experts * k * engine.grad_bytes,
        "optimizer": opt.state_bytes(counts * experts),
        "workspace": workspace_bytes(touched, manifest, base_dtype, compute, engine),
        "grad_path": grad_path_bytes(touched, grad_path, tokens, engine),
    }
    not_included: list[str] = []
    notes: list[str] = []
    if base_dtype == FP8_SCALED:
        gpu["dequant_kept"] = dequant_kept_bytes(touched, manifest, base_dtype, compute)
        notes.append(
            "fp8-scaled (musubi --fp8_base --fp8_scaled): block Linear weights in float8_e4m3fn with "
            f"{compute.lower()} scales per 64 input columns, the rest as stored; each matmul dequantizes "
            "its weight to a transient (workspace), and autograd keeps the untrained ones of the block "
            "being rebuilt (dequant kept)"
        )
    activations = activation_bytes(
        manifest, activations_gb, video_size, frames, batch_size, DTYPE_BYTES[compute], notes
    )
    if activations is None:
        not_included.append(NOT_INCLUDED)
    else:
        gpu["activations"] = activations
    not_included.append("CUDA context and allocator fragmentation (typically 0.3-1 GiB)")
    text, text_note = text_encodings_bytes(manifest, int(captions), int(caption_tokens))
    if text_note:
        notes.append(text_note)

    # musubi holds the state dict once while loading: as stored, or already quantized (fp8-scaled
    # quantizes tensor by tensor as it reads the file)
    load_one = base.model if base_dtype == FP8_SCALED else sum(t.nbytes for t in manifest)
    host = {"swapped_blocks": base.parked, "load_peak": load_one}
    notes.append(
        "host peak assumes the whole state dict is in RAM once while loading (musubi-tuner does this)"
    )
    if experts == 2:
        other = place_inactive_expert(base, load_one, offload_inactive_dit)
        gpu["inactive_expert"] = other.gpu
        host["inactive_expert"] = other.host
        if other.switch:
            host["expert_switch"] = other.switch
        host["load_peak"] = other.load_peak
        notes.append(
            "two experts (--dit_high_noise): the inactive expert's weights sit where musubi puts them "
            + (
                "(its own block swap: non-swapped blocks on the GPU, swapped ones on the host)"
                if base.parked
                else "(host RAM; each switch moves the active one there first)"
                if offload_inactive_dit
                else "(on the GPU; --offload_inactive_dit or --blocks_to_swap moves it)"
            )
            + "; proxies, gradients and optimizer state once per expert, indices once (same positions); "
            "gradients of the inactive expert are freed by zero_grad(set_to_none) unless a gradient "
            "accumulation step spans both experts, so that part is an upper bound; one delta per expert"
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
        delta_file_bytes=experts * (delta_file_bytes(selection) + text),
        hint=use_case(ff),
        not_included=not_included,
        notes=notes,
        experts=experts,
    )


def fit_blocks_to_swap(selection: Selection, budget_bytes: int, **options: Any) -> Fit:
    """The fewest ``blocks_to_swap`` whose GPU total plus :data:`CONTEXT_BYTES` fits
    ``budget_bytes`` (``options`` as for :func:`estimate_selection`, ``blocks_to_swap`` aside).

    The GPU total falls as blocks are swapped (from 2 swapped blocks on, each more frees a block),
    so a bisection over ``1..n-1`` after trying 0 finds it in a few estimates; when even ``n - 1``
    does not fit, that setting is returned with ``fits=False``.
    """
    options.pop("blocks_to_swap", None)
    offload = bool(options.pop("offload_inactive_dit", False))

    def est(n: int) -> Estimate:
        # musubi refuses --offload_inactive_dit with block swap: it applies to 0 swapped blocks only
        return estimate_selection(
            selection, blocks_to_swap=n, offload_inactive_dit=offload and not n, **options
        )

    def fits(e: Estimate) -> bool:
        return e.gpu_total + CONTEXT_BYTES <= budget_bytes

    first = est(0)
    if fits(first) or not first.blocks:
        return Fit(budget_bytes, 0, first.gpu_total, first.host_total, fits(first))
    lo, hi = 1, first.blocks - 1
    last = est(hi)
    if not fits(last):
        return Fit(budget_bytes, hi, last.gpu_total, last.host_total, False)
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(est(mid)):
            hi = mid
        else:
            lo = mid + 1
    best = est(lo)
    return Fit(budget_bytes, lo, best.gpu_total, best.host_total, True)


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
    experts: int = 1,
    dit_high_noise: Any = None,
    offload_inactive_dit: bool = False,
    gpu_gb: float | None = None,
    captions: int = 0,
    caption_tokens: int = CAPTION_TOKENS_MAX,
    **selector_options: Any,
) -> list[Estimate]:
    """Estimate memory for each ``ff`` of ``ffs`` on ``model`` (module, path, preset or manifest).

    The selection is planned exactly as training would plan it (``selector`` and
    ``selector_options`` such as ``slots=``, ``seed=`` as for :func:`ffid.plan`); only names,
    shapes and dtypes are read. ``experts=2`` (or ``dit_high_noise``, the high-noise expert's
    file, checked to have the same tensors) estimates a two-expert Wan 2.2 A14B run;
    ``base_dtype="fp8-scaled"`` musubi's ``--fp8_scaled``. ``gpu_gb`` adds to each estimate the
    fewest ``blocks_to_swap`` that fit a card of that many GiB (:func:`fit_blocks_to_swap`);
    ``captions``/``caption_tokens`` count a Wan run's stored text encodings in the delta size. Bad
    values raise :class:`~ffid.errors.ConfigError` with one line saying how to fix them.
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
    budget = _check_gpu_gb(gpu_gb)
    manifest = settings[0].manifest(model)
    if dit_high_noise is not None:
        _check_same_tensors(manifest, settings[0].manifest(dit_high_noise), dit_high_noise)
        experts = 2
    check_experts(experts, offload_inactive_dit, int(blocks_to_swap))
    out = []
    for one in settings:
        notes: list[str] = []
        sel = _plan_for_estimate(manifest, one, notes)
        run = dict(  # the run being estimated, also for the fewest-swapped-blocks search
            optimizer=optimizer,
            base_dtype=base_dtype,
            activations_gb=activations_gb,
            video_size=video_size,
            frames=frames,
            batch_size=batch_size,
            grad_path=grad_path,
            experts=experts,
            offload_inactive_dit=offload_inactive_dit,
            captions=captions,
            caption_tokens=caption_tokens,
        )
        est = estimate_selection(sel, blocks_to_swap=blocks_to_swap, **run)  # type: ignore[arg-type]
        if budget is not None:
            est.fit = fit_blocks_to_swap(sel, budget, **run)  # type: ignore[arg-type]
        est.notes[:0] = notes
        out.append(est)
    return out


def _check_gpu_gb(gpu_gb: float | None) -> int | None:
    """``--gpu-gb`` in bytes; a budget that cannot hold even the CUDA context is refused."""
    if gpu_gb is None:
        return None
    try:
        value = float(gpu_gb)
    except (TypeError, ValueError):
        raise ConfigError(
            f"--gpu-gb {gpu_gb!r} is not a number; give the card's memory in GiB, e.g. 24"
        ) from None
    if not math.isfinite(value) or value * GiB <= CONTEXT_BYTES:
        raise ConfigError(
            f"--gpu-gb {gpu_gb!r} must be more than the {CONTEXT_BYTES / GiB:g} GiB kept for the CUDA "
            "context; give the card's memory in GiB, e.g. 24"
        )
    return int(value * GiB)


def _check_same_tensors(low: Manifest, high: Manifest, source: Any) -> None:
    """The two experts of one run must have the same tensor names and shapes."""
    mine = {t.name: t.shape for t in low}
    theirs = {t.name: t.shape for t in high}
    if mine != theirs:
        diff = sorted(set(mine.items()) ^ set(theirs.items()))
        name = diff[0][0] if diff else "?"
        raise ConfigError(
            f"--dit_high_noise {str(source)!r} does not have the same tensors as the model "
            f"(first difference: {name}); give the other expert of the same Wan 2.2 A14B"
        )
