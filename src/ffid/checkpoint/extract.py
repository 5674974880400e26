"""``ffid extract``: the exact sparse difference between a base and a tuned checkpoint, as a delta.

Both checkpoints are read one tensor at a time. Without a selection the delta holds every
position whose value differs bit for bit (or by more than ``threshold``), so merging it into the
base gives back the tuned checkpoint exactly. With a selection (``--ff``/``--ffid``) it holds the
tuned values at every selected position, like a delta saved by the engine, and a difference
found outside the selection is an error (``outside="warn"`` drops it with a warning instead):
such a delta would silently not reproduce the tuned model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..dtypes import bit_view, is_float_code, parse_dtype
from ..errors import ConfigError, MismatchError
from ..manifest import Manifest, TensorInfo
from ..selection import Explicit, Selection, TensorPick
from .atomic import refuse_overwrite
from .delta import DeltaTensor, TensorFingerprint, sample_positions, values_hash, write_delta
from .files import Checkpoint
from .implicit import check_indices
from .namemap import NameResolver, detect_naming
from .stio import one_thread, require_finite

OUTSIDE_CHOICES = ("error", "warn")


@dataclass
class ExtractResult:
    """What ``extract`` found and wrote."""

    path: Path
    tensors: int  # tensors in the delta
    elements: int  # positions stored
    differing: int  # positions where tuned differs from base (within the selection, if any)
    outside: int  # differing positions outside the selection (dropped when outside="warn")
    first_outside: str | None
    bytes_written: int
    warnings: list[str] = field(default_factory=list)


def _differs(base: torch.Tensor, tuned: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Boolean mask (flat) of positions where ``tuned`` differs from ``base``."""
    if threshold is not None:
        # NaN differences count as differing: "not <= T" rather than "> T".
        return ~((tuned.to(torch.float32) - base.to(torch.float32)).abs() <= threshold)
    if base.dtype != tuned.dtype:
        base, tuned = base.to(torch.float32), tuned.to(torch.float32)
    bits = bit_view(base.element_size())
    return base.view(bits) != tuned.view(bits)


def extract_delta(
    base: str | os.PathLike[str],
    tuned: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    selection: Selection | None = None,
    threshold: float | None = None,
    outside: str = "error",
    save_dtype: torch.dtype | str | None = None,
    metadata: Mapping[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    indices: str = "explicit",
) -> ExtractResult:
    """Write the delta that turns ``base`` into ``tuned`` (see the module docstring).

    ``indices="implicit"`` (format 2, values only) needs a ``selection``; ``save_dtype`` defaults
    to fp32 for explicit files and to the base's dtype for implicit ones.
    """
    if outside not in OUTSIDE_CHOICES:
        raise ConfigError(f"outside={outside!r}; choose one of {', '.join(OUTSIDE_CHOICES)}")
    if threshold is not None and not (math.isfinite(threshold) and threshold >= 0):
        raise ConfigError(
            f"--threshold {threshold} must be a finite number >= 0 (0 keeps every change; inf would keep "
            "none)"
        )
    if selection is not None and threshold is not None:
        raise ConfigError("give either a selection (--ff/--ffid) or --threshold, not both")
    if check_indices(indices) == "implicit" and selection is None:
        raise ConfigError(
            "--indices implicit needs a selection (--ff/--ffid): an unrestricted extract has no rule to "
            "rebuild its positions; use --indices explicit"
        )
    value_dtype = parse_dtype(save_dtype)
    out = Path(out)
    with one_thread(), Checkpoint(base) as bk, Checkpoint(tuned) as tk:
        if out.is_dir():
            raise ConfigError(
                f"output {out} is a folder; name the delta file, e.g. {out / 'delta.safetensors'}"
            )
        refuse_overwrite(out, bk.files + tk.files)
        resolver = NameResolver(tk.tensors, detect_naming(bk.tensors))
        pairs = []
        used: set[str] = set()
        for name, loc in bk.tensors.items():
            tname = resolver.resolve(name)
            if tname is None:
                raise MismatchError(
                    f"tensor {name!r} of base {bk.path.name} is missing from tuned {tk.path.name} "
                    "(first mismatching "
                    "tensor); compare checkpoints of the same model"
                )
            tloc = tk.tensors[tname]
            if tloc.entry.shape != loc.entry.shape:
                raise MismatchError(
                    f"tensor {name!r} is {list(loc.entry.shape)} in base but {list(tloc.entry.shape)} "
                    "in tuned (first "
                    "mismatching tensor); compare checkpoints of the same model"
                )
            if (
                threshold is None
                and loc.entry.dtype != tloc.entry.dtype
                and is_float_code(loc.entry.dtype)
                and is_float_code(tloc.entry.dtype)
            ):
                raise MismatchError(
                    f"tensor {name!r} is {loc.entry.dtype} in base but {tloc.entry.dtype} in tuned (first "
                    "such tensor); every position would differ by rounding alone: extract from a tuned "
                    "checkpoint saved in the base's dtype, or pass --threshold T to keep only larger changes"
                )
            pairs.append((name, loc, tloc))
            used.add(tname)
        extra = sorted(set(tk.tensors) - used)
        if extra:
            raise MismatchError(
                f"tuned {tk.path.name} holds tensor {extra[0]!r} that base {bk.path.name} lacks; "
                "compare checkpoints "
                "of the same model"
            )
        if selection is not None:
            unknown = [n for n in selection if n not in bk.tensors]
            if unknown:
                raise MismatchError(
                    f"the selection names tensor {unknown[0]!r}, which base {bk.path.name} lacks"
                )
        pairs.sort(key=lambda p: (p[1].file.path.name, p[1].entry.start))
        tensors: list[DeltaTensor] = []
        fps: dict[str, TensorFingerprint] = {}
        differing = outside_n = 0
        first_outside: str | None = None
        for name, loc, tloc in pairs:
            b = loc.file.read_tensor(loc.entry).reshape(-1)
            t = tloc.file.read_tensor(tloc.entry).reshape(-1)
            if not is_float_code(loc.entry.dtype) or not is_float_code(tloc.entry.dtype):
                if loc.entry.dtype != tloc.entry.dtype or not torch.equal(b, t):
                    raise MismatchError(
                        f"non-float tensor {name!r} differs between base and tuned; a delta can only "
                        "hold float "
                        "changes, so merging could not reproduce the tuned model"
                    )
                continue
            mask = _differs(b, t, threshold)
            if selection is not None:
                idx = selection.indices(name) if name in selection else torch.empty(0, dtype=torch.int64)
                mask[idx] = False
                n_out = int(mask.sum())
                if n_out:
                    outside_n += n_out
                    first_outside = first_outside or name
                differing += int(_differs(b[idx], t[idx], None).sum()) if idx.numel() else 0
            else:
                idx = mask.nonzero().reshape(-1)
                differing += idx.numel()
            if progress is not None:
                progress(loc.entry.nbytes + tloc.entry.nbytes)
            if idx.numel() == 0:
                continue
            values = t[idx].to(torch.float32)
            require_finite(
                values,
                f"tuned {tloc.file.path} tensor {tloc.entry.key!r}",
                "a delta must hold finite values: extract from a checkpoint saved before training diverged",
            )
            tensors.append(DeltaTensor(name, loc.entry.shape, idx, values))
            fps[name] = TensorFingerprint(loc.entry.shape, values_hash(b[idx[sample_positions(idx.numel())]]))
            del b, t, mask
        warnings = []
        if outside_n:
            msg = (
                f"{outside_n:,} changed positions lie outside the selection (first in "
                f"{first_outside!r}); the "
                "delta leaves them out, so merging it does not give back the tuned model"
            )
            if outside == "error":
                raise MismatchError(
                    msg.replace("the delta leaves", "a delta would leave")
                    + ": check --ff/--ffid/--selector, or pass --outside warn to drop them"
                )
            warnings.append(msg)
        if differing == 0 and outside_n == 0:  # (changes only outside, with "warn": the user chose)
            what = "" if threshold is None else f" by more than --threshold {threshold}"
            raise MismatchError(
                f"no position differs{what} between base {bk.path.name} and tuned {tk.path.name}; the "
                "delta would be empty: check that TUNED is the finetuned checkpoint"
            )
        manifest = Manifest(
            [
                TensorInfo(n, loc.entry.shape, loc.entry.dtype, loc.entry.key)
                for n, loc in bk.tensors.items()
                if is_float_code(loc.entry.dtype)
            ],
            str(bk.path),
        )
        if selection is not None:
            sel = selection
            selector, params = sel.selector, dict(sel.params)
        else:
            picks = {d.name: TensorPick(d.name, d.shape, d.count, Explicit(d.indices)) for d in tensors}
            sel = Selection(
                "extract", {"threshold": threshold}, manifest, picks, sum(d.count for d in tensors)
            )
            selector, params = "extract", {"threshold": threshold}
        size = write_delta(
            out,
            tensors,
            selector=selector,
            params=params,
            selection_fingerprint=sel.fingerprint,
            base_fingerprint=fps,
            base_manifest_fingerprint=manifest.fingerprint,
            naming=detect_naming(bk.tensors),
            total_params=manifest.total_params,
            source="extract",
            metadata=metadata,
            save_dtype=value_dtype,
            indices=indices,
            selection=sel,
        )
    return ExtractResult(
        out, len(tensors), sum(d.count for d in tensors), differing, outside_n, first_outside, size, warnings
    )
