"""ffid deltas as ComfyUI weight patches.

An ffid delta holds, per touched tensor, the trained values at explicit flat positions. Here each
tensor becomes one :class:`FfidDeltaPatch` (a ``comfy.weight_adapter.WeightAdapterBase``) that
holds only those indices and values. ComfyUI's own patching code calls it whenever it builds a
patched weight: on a full load (an fp32 copy of the weight, then cast back and the original kept
as a backup), and in lowvram mode every time a layer's weight is cast for compute. Unpatching
is ComfyUI's: it puts the backup back.

Semantics are those of ``ffid merge --multiplier S``: at every stored position
``out = base + S * (trained - base)`` in fp32 (exactly ``trained`` when ``S == 1``), rounded to the
dtype of the model *file* (see :func:`infer_file_dtype`) and then to the dtype ComfyUI holds the
weight in, so the result equals the merged file as ComfyUI would load it.

Two places where ComfyUI's loader needs help:

- ``ModelPatcher._load_list`` skips parameters owned by a module that also has children with
  parameters. Wan's ``blocks.N.modulation`` and ``head.modulation`` are such parameters: ComfyUI
  never patches them (LoRA ``diff`` patches on them are silently lost too). An ``on_load``
  callback patches those keys with ComfyUI's own ``patch_weight_to_device``, which backs them up
  in the same backup dict, so unpatching restores them like every other weight.
- fp8 weights are rounded stochastically by ComfyUI after patching (``comfy.float``), seeded by
  the key: exact equality with a merged file is impossible there, and the base fingerprint
  (computed on the bf16/fp32 base) cannot be checked against fp8 values.

GGUF models (ComfyUI-GGUF) keep quantized weights as raw blocks and apply the patches to the
dequantized weight at every cast, so the same patch works there; shapes are read from the held
tensors, because ComfyUI-GGUF's state dict has raw-shaped meta stand-ins (and a fake
``temp.weight``). Newer ComfyUI rebuilds adapters as ``type(a)(a.loaded_keys, weights)``: the patch
keeps all its state in ``weights``. Bypass mode cannot express a delta and is refused.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import comfy.model_patcher
import comfy.utils
import torch
from comfy.patcher_extension import CallbacksMP
from comfy.weight_adapter.base import WeightAdapterBase

from ffid.checkpoint import DeltaFile
from ffid.checkpoint.delta import expert_hint, sample_positions, values_hash
from ffid.checkpoint.namemap import NameResolver
from ffid.errors import FfidError

log = logging.getLogger("ffid.comfyui")

MODEL_PREFIX = "diffusion_model."
CALLBACK_KEY = "ffid_delta"
FP8_DTYPES = tuple(
    getattr(torch, n)
    for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, n)
)
FILE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_SAMPLE = 4096  # elements per tensor looked at to tell which dtype the model file held


BYPASS_REFUSAL = (
    "ComfyUI's bypass mode cannot apply an ffid delta: it sets single weights to trained values, which "
    "needs the base weight that bypass mode never reads; load the delta with 'Load ffid delta (model only)' "
    "instead, which patches the weights as they are cast for compute (GGUF, fp8 and offloaded models too)"
)


def _check_weights(weights, source: str) -> None:
    """Refuse a malformed ``weights`` tuple in one line (a rebuild by other code that changed it)."""
    if not isinstance(weights, (tuple, list)) or len(weights) != 5:
        raise TypeError(
            f"ffid delta {source}: an FfidDeltaPatch needs weights (indices or None, values, shape, "
            f"file dtype, source), got {type(weights).__name__} {str(weights)[:60]}"
        )
    indices, values, shape, file_dtype, _src = weights
    if not isinstance(values, torch.Tensor) or not values.is_floating_point() or values.dim() != 1:
        got = str(values)[:50]
        raise TypeError(f"ffid delta {source}: the values must be a flat float tensor, got {got}")
    if indices is not None:
        if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or indices.is_complex():
            kind = indices.dtype if isinstance(indices, torch.Tensor) else type(indices).__name__
            raise TypeError(
                f"ffid delta {source}: its positions became {kind}, not integers (ComfyUI's bypass mode "
                f"casts adapter tensors to the layer dtype); {BYPASS_REFUSAL}"
            )
        if indices.shape != values.shape:
            raise ValueError(
                f"ffid delta {source}: {indices.numel()} positions but {values.numel()} values; read the "
                "file again"
            )
    if not isinstance(file_dtype, torch.dtype) or not all(isinstance(d, int) for d in shape):
        raise TypeError(
            f"ffid delta {source}: shape {shape!r} and file dtype {file_dtype!r} must be ints and a dtype"
        )


class FfidDeltaPatch(WeightAdapterBase):
    """One tensor of an ffid delta: flat indices (None for a whole tensor) and trained values.

    All its state is in ``weights`` = ``(indices | None, values, shape, file_dtype, source)``, and it
    is built as ``FfidDeltaPatch(loaded_keys, weights)``: newer ComfyUI releases rebuild every
    adapter as ``type(adapter)(adapter.loaded_keys, weights)`` when they prefetch its tensors to the
    compute device (``comfy.lora.prefetch_prepared_value``), passing non-tensor items through.
    """

    name = "ffid_delta"

    def __init__(self, loaded_keys: set[str], weights: tuple):
        source = weights[4] if isinstance(weights, (tuple, list)) and len(weights) == 5 else "?"
        _check_weights(weights, str(source))
        self.loaded_keys = loaded_keys
        self._weights = tuple(weights)

    @classmethod
    def create(
        cls,
        indices: torch.Tensor | None,
        values: torch.Tensor,
        shape: tuple[int, ...],
        file_dtype: torch.dtype,
        source: str,
    ) -> FfidDeltaPatch:
        """A patch for one tensor of ``shape``; ``indices`` in the narrowest signed int, or None (whole)."""
        return cls(set(), (indices, values, tuple(int(d) for d in shape), file_dtype, source))

    @property
    def weights(self) -> tuple:
        return self._weights

    @weights.setter
    def weights(self, new) -> None:
        # ComfyUI's bypass mode assigns moved (and maybe recast) tensors here before it runs a layer
        _check_weights(new, self.source)
        self._weights = tuple(new)

    indices = property(lambda self: self._weights[0], doc="Flat positions, or None for the whole tensor.")
    values = property(lambda self: self._weights[1], doc="Trained values, flat, in the delta's dtype.")
    target_shape = property(lambda self: self._weights[2], doc="Shape of the model tensor it patches.")
    file_dtype = property(lambda self: self._weights[3], doc="Dtype of the model file (results round to it).")
    source = property(lambda self: self._weights[4], doc="The delta's file name, for messages.")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._weights[:2] if t is not None)

    def calculate_shape(self, key: str) -> None:
        """Newer ComfyUI asks adapters for the weight shape they produce: a delta never reshapes."""
        return None

    def h(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """Bypass mode's additive term: refused, see :data:`BYPASS_REFUSAL`."""
        raise RuntimeError(f"ffid delta {self.source}: {BYPASS_REFUSAL}")

    def bypass_forward(self, org_forward, x, *args, **kwargs):
        """Bypass mode's forward: refused, see :data:`BYPASS_REFUSAL`."""
        raise RuntimeError(f"ffid delta {self.source}: {BYPASS_REFUSAL}")

    def calculate_weight(
        self,
        weight,
        key,
        strength,
        strength_model,
        offset,
        function,
        intermediate_dtype=torch.float32,
        original_weight=None,
    ):
        if offset is not None or tuple(weight.shape) != self.target_shape:
            log.warning(
                "ffid: %s: cannot patch %s (%s of shape %s, the delta's tensor is %s); left unchanged",
                self.source, key, "a slice" if offset is not None else "a weight",
                tuple(weight.shape), self.target_shape,
            )  # fmt: skip
            return None
        if strength == 0.0:
            return weight
        work = weight if weight.is_contiguous() else weight.contiguous()
        flat = work.view(-1)
        dev = weight.device
        vals = self.values.to(dev, torch.float32)
        idx = slice(None) if self.indices is None else self.indices.to(dev, torch.int64)
        new = self.result(flat[idx], vals, strength).to(weight.dtype)
        if not _all_finite(new):
            # add_delta checked the unpatched weights; another patch applied first can still push
            # values out of range, and NaN/inf weights must never reach sampling
            raise DeltaMismatch(
                f"ffid: {self.source} at strength {strength} would write NaN/inf into {key} "
                f"({weight.dtype}); lower the strength or load the patches in another order"
            )
        flat[idx] = new
        if work is not weight:
            weight.copy_(work)
        return weight

    def result(self, base: torch.Tensor, vals: torch.Tensor, strength: float) -> torch.Tensor:
        """The patched values at the stored positions, rounded to the file dtype, as ``ffid merge``."""
        if strength == 1.0:
            new = vals
        else:  # ffid.checkpoint.delta.blend, term for term: the same fp32 operations as `ffid merge`
            base = base.to(torch.float32)
            new = base + strength * (vals - base)
        if self.file_dtype != torch.float32:
            new = new.to(self.file_dtype)  # what the merged file would hold
        return new


@dataclass
class LoadedDelta:
    """A delta file read into per-tensor patches (ComfyUI keys), plus what the user should know."""

    path: str
    patches: dict[str, FfidDeltaPatch]
    metadata: dict[str, str]
    file_bytes: int
    renamed: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.patches.values())


class DeltaMismatch(RuntimeError):
    """The delta does not belong to this model (names, shapes or base values differ)."""


def _narrow_index(idx: torch.Tensor, numel: int) -> torch.Tensor:
    if numel <= 2**7:
        return idx.to(torch.int8)
    if numel <= 2**15:
        return idx.to(torch.int16)
    if numel <= 2**31:
        return idx.to(torch.int32)
    return idx


def is_gguf_quantized(t) -> bool:
    """A ComfyUI-GGUF ``GGMLTensor`` that holds quantized blocks (Q8_0, Q4_K, BF16, ...).

    Its storage is the file's raw bytes and its ``shape`` the logical one; the layer dequantizes it
    and applies the patches at every forward. F32/F16 GGUF tensors are plain float tensors.
    """
    return hasattr(t, "tensor_type") and hasattr(t, "tensor_shape") and not t.is_floating_point()


def held_weight(patcher, key: str):
    """The tensor ComfyUI holds for ``key`` (not the state dict's, which ComfyUI-GGUF replaces with
    raw-shaped meta tensors for quantized layers)."""
    return comfy.model_patcher.get_key_weight(patcher.model, key)[0]


def original_weight(patcher, key: str) -> torch.Tensor:
    """The unpatched weight of ``key`` as ComfyUI holds it (the backup while another clone is loaded),
    dequantized (scaled fp8) when the layer converts its weight."""
    bk = patcher.backup.get(key)
    weight, _set_func, convert_func = comfy.model_patcher.get_key_weight(patcher.model, key)
    if bk is not None:
        weight = bk.weight
    if convert_func is not None:
        weight = convert_func(weight.to(torch.float32, copy=True), inplace=True)
    return weight


def _as_float(t):
    """``t`` as the planner of an implicit delta should see it: a GGUF-quantized tensor becomes a meta
    float tensor of its logical shape (its storage is raw bytes, which the planner would skip)."""
    return torch.empty(tuple(t.shape), dtype=torch.float32, device="meta") if is_gguf_quantized(t) else t


def _sample(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().reshape(-1)
    step = max(1, flat.numel() // _SAMPLE)
    return flat[::step][:_SAMPLE]


def infer_file_dtype(patcher) -> torch.dtype:
    """The dtype the model file most likely held: bf16, fp16 or fp32.

    ComfyUI may hold a bf16 file's weights in fp32 (on CPU by default, and Wan's
    ``patch_embedding`` always), so the held dtype does not say what a merged file would hold. A
    bf16 or fp16 file leaves every value exactly representable in that dtype; a trained fp32 file
    does not. fp8 weights (and their scales) and GGUF-quantized weights are not looked at; a GGUF
    file's F32 tensors (norms, biases, modulation) hold the values of the file it was made from.
    Ties go to bf16.
    """
    fits = {torch.bfloat16: True, torch.float16: True}
    seen = False
    for key, t in patcher.model.state_dict().items():
        if (
            not key.startswith(MODEL_PREFIX)  # not the sampler's sigmas and the like
            or not t.is_floating_point()
            or t.device.type == "meta"  # ComfyUI-GGUF's stand-ins for quantized layers
            or t.dtype in FP8_DTYPES
            or key.endswith(("scale_weight", "scale_input"))
        ):
            continue
        bk = patcher.backup.get(key)
        s = _sample(bk.weight if bk is not None else t)
        if s.numel() == 0:
            continue
        seen = True
        s32 = s.to(torch.float32)
        for dt in fits:
            if fits[dt] and not bool((s32.to(dt).to(torch.float32) == s32).all()):
                fits[dt] = False
        if not any(fits.values()):
            return torch.float32
    if not seen:
        return torch.float32
    return torch.bfloat16 if fits[torch.bfloat16] else torch.float16


def model_keys(patcher) -> dict[str, str]:
    """Canonical tensor name (as in a delta) -> ComfyUI key, for the diffusion model's weights.

    Only keys the model holds a tensor for: ComfyUI-GGUF adds a stand-in ``<layer>.temp.weight`` to
    its state dict (room to dequantize the largest layer, for ComfyUI's memory estimate).
    """
    out = {}
    for key in patcher.model.state_dict():
        if not key.startswith(MODEL_PREFIX):
            continue
        try:
            comfy.utils.get_attr(patcher.model, key)
        except AttributeError:
            continue
        out[key[len(MODEL_PREFIX) :]] = key
    return out


def read_delta(path: str | os.PathLike[str], patcher, file_dtype: torch.dtype, verify: bool) -> LoadedDelta:
    """Read ``path`` into patches for ``patcher``'s model, checking names, shapes and base values.

    Raises :class:`DeltaMismatch` with one plain sentence when the delta is for another model. With
    fp8 (or scaled fp8) or GGUF-quantized weights the base values cannot be compared exactly; a
    mismatch there only adds a note.
    """
    path = os.fspath(path)
    name = os.path.basename(path)
    keys = model_keys(patcher)
    held_by_key = {key: held_weight(patcher, key) for key in keys.values()}
    patches: dict[str, FfidDeltaPatch] = {}
    notes: list[str] = []
    renamed = 0
    fp8_unverified: list[str] = []
    gguf_unverified: list[str] = []
    with DeltaFile(path) as df:
        metadata = dict(df.metadata)
        if df.implicit:
            # An implicit-index delta (format 2) stores values only: ffid's planner rebuilds the
            # positions from the loaded model's names and shapes, and refuses another model.
            try:
                df.bind({canon: _as_float(held_by_key[key]) for canon, key in keys.items()})
            except FfidError as exc:
                raise DeltaMismatch(f"ffid delta {name} does not fit this model: {exc}") from None
        resolver = NameResolver(keys, df.info.naming)
        for tname in df.names:
            target = resolver.resolve(tname)
            if target is None:
                raise DeltaMismatch(
                    f"ffid delta {name} does not fit this model: it changes {tname!r}, which the model does "
                    "not have; it was made for another model"
                )
            renamed += target != tname
            key = keys[target]
            held = held_by_key[key]
            quantized = is_gguf_quantized(held)
            shape = df.shape(tname)
            if tuple(held.shape) != tuple(shape):
                raise DeltaMismatch(
                    f"ffid delta {name} does not fit this model: {target!r} is {list(held.shape)} here but "
                    f"{list(shape)} in the delta; it was made for another model size"
                )
            if not held.is_floating_point() and not quantized:
                raise DeltaMismatch(f"ffid delta {name} changes {target!r}, which is not a float tensor here")
            idx = df.read_indices(tname)
            if verify and quantized:
                gguf_unverified.append(target)  # lossy blocks: the file's values are gone
            elif verify:
                w = original_weight(patcher, key)
                got = values_hash(w.reshape(-1)[idx[sample_positions(idx.numel())].to(w.device)])
                if got != df.info.base_fingerprint[tname].hash:
                    if held.dtype in FP8_DTYPES:
                        fp8_unverified.append(target)
                    else:
                        raise DeltaMismatch(
                            f"ffid delta {name} was not trained from this model: {target!r} holds other base "
                            "values at the trained positions (first mismatching tensor)"
                            f"{expert_hint(df.metadata)}; load the base model "
                            "it was trained on, or set verify to 'off' if you are sure"
                        )
            numel = math.prod(shape)
            whole = idx.numel() == numel  # sorted, unique, in range: every position, in order
            patches[key] = FfidDeltaPatch.create(
                None if whole else _narrow_index(idx, numel),
                df.read_values(tname).reshape(-1).clone(),
                tuple(shape),
                file_dtype,
                name,
            )
            del idx
    if fp8_unverified:
        notes.append(
            f"base fingerprint not checked exactly for {len(fp8_unverified)} fp8 tensor(s) (first "
            f"{fp8_unverified[0]!r}): the fingerprint hashes the bf16/fp32 base values, which fp8 storage "
            "rounds away; names and shapes match"
        )
    if gguf_unverified:
        notes.append(
            f"base fingerprint not checked exactly for {len(gguf_unverified)} GGUF-quantized tensor(s) "
            f"(first {gguf_unverified[0]!r}): the fingerprint hashes the bf16/fp32 base values, which "
            "quantization rounds away; names and shapes match, and the file's F32 tensors are checked exactly"
        )
    return LoadedDelta(path, patches, metadata, os.path.getsize(path), renamed, notes)


def skipped_keys(patcher) -> set[str]:
    """Keys with patches that ComfyUI's ``_load_list`` never visits (Wan's ``modulation`` tensors)."""
    covered = set()
    for _size, n, _m, params in patcher._load_list():
        covered.update(f"{n}.{p}" for p in params)
    return {k for k in patcher.patches if k not in covered}


def _is_ffid(patch_list) -> bool:
    return any(isinstance(p[1], FfidDeltaPatch) for p in patch_list)


def patch_skipped_on_load(patcher, device_to, lowvram_model_memory, force_patch_weights, full_load) -> None:
    """``on_load`` callback: patch the keys ``_load_list`` skips, through ComfyUI's backed-up path.

    A key already in the backup is patched already (a partial reload of the same patches): it is
    left alone, so nothing is applied twice. Unpatching restores these keys from the backup like
    every other weight.
    """
    for key in sorted(skipped_keys(patcher)):
        if key in patcher.backup or not _is_ffid(patcher.patches[key]):
            continue
        patcher.patch_weight_to_device(key, device_to=None)


def check_strength(strength: float) -> float:
    """``strength`` as a float, or :class:`DeltaMismatch` when it is NaN or infinite."""
    value = float(strength)
    if not math.isfinite(value):
        raise DeltaMismatch(f"ffid: strength {strength} is not a finite number; use a value such as 1.0")
    return value


def nonfinite_key(patcher, loaded: LoadedDelta, strength: float) -> str | None:
    """The first key whose patched values would be NaN/inf in the dtype ComfyUI holds it in.

    Checked like ``ffid merge`` checks its output: a strength that overflows the file dtype (4 on
    fp16 weights near its range) or delta values beyond it (1e5 into fp16) are refused before any
    weight is patched. fp8 has no inf: an overflow there becomes NaN and is caught the same way.
    """
    for key, p in loaded.patches.items():
        w = original_weight(patcher, key)
        if is_gguf_quantized(w):
            continue  # raw blocks until the layer dequantizes them: checked then, as the patch applies
        w = w.reshape(-1)
        idx = slice(None) if p.indices is None else p.indices.to(w.device, torch.int64)
        new = p.result(w[idx], p.values.to(w.device, torch.float32), strength)
        held = comfy.model_patcher.get_key_weight(patcher.model, key)[0].dtype
        # fp8 is filled by ComfyUI's own (scaled, stochastic) rounding: the file dtype is checked
        if not _all_finite(new if held in FP8_DTYPES else new.to(held)):
            return key
    return None


def _all_finite(t: torch.Tensor) -> bool:
    # torch has no isfinite for fp8; its overflow is NaN, which survives the cast to fp32
    return bool(torch.isfinite(t.float() if t.dtype in FP8_DTYPES else t).all())


def add_delta(patcher, loaded: LoadedDelta, strength: float):
    """A clone of ``patcher`` with ``loaded`` added at ``strength`` (``ffid merge --multiplier``).

    Refuses (:class:`DeltaMismatch`) a non-finite strength and a result that would hold NaN/inf.
    """
    strength = check_strength(strength)
    bad = nonfinite_key(patcher, loaded, strength)
    if bad is not None:
        raise DeltaMismatch(
            f"ffid delta {os.path.basename(loaded.path)} at strength {strength} would make {bad!r} hold "
            "NaN/inf (beyond the range of its dtype); lower the strength"
        )
    clone = patcher.clone()
    added = clone.add_patches(dict(loaded.patches), strength)
    if len(added) != len(loaded.patches):  # pragma: no cover - names were resolved against this model
        missing = sorted(set(loaded.patches) - set(added))
        raise DeltaMismatch(f"ffid: ComfyUI refused patches for {missing[:3]}")
    if not clone.get_callbacks(CallbacksMP.ON_LOAD, CALLBACK_KEY):
        clone.add_callback_with_key(CallbacksMP.ON_LOAD, CALLBACK_KEY, patch_skipped_on_load)
    return clone


def overlap_count(patcher, loaded: LoadedDelta) -> int:
    """Positions that ``loaded`` shares with ffid deltas already on ``patcher`` (where the order of
    application matters, unlike ``ffid merge --allow-overlap``, which adds differences)."""
    n = 0
    for key, p in loaded.patches.items():
        for entry in patcher.patches.get(key, []):
            other = entry[1]
            if not isinstance(other, FfidDeltaPatch):
                continue
            if p.indices is None or other.indices is None:
                n += p.values.numel() if other.indices is None else other.indices.numel()
                continue
            # both sorted: one binary search per position (much cheaper than a set intersection)
            a = p.indices.to(torch.int64)
            b = other.indices.to(torch.int64)
            pos = torch.searchsorted(b, a).clamp_(max=b.numel() - 1)
            n += int((b[pos] == a).sum())
    return n


__all__ = [
    "DeltaMismatch",
    "FfidDeltaPatch",
    "LoadedDelta",
    "add_delta",
    "check_strength",
    "held_weight",
    "infer_file_dtype",
    "is_gguf_quantized",
    "nonfinite_key",
    "overlap_count",
    "patch_skipped_on_load",
    "read_delta",
    "skipped_keys",
]
