"""``ffid merge``: bake one or more deltas into a full checkpoint, streaming tensor by tensor.

The output keeps the base's names, dtypes (unless ``dtype`` is given), metadata and shard layout.
Tensors no delta touches are copied as bytes (in the kernel where the filesystem allows) without
being decoded; touched tensors are read one at a time, patched at the delta's positions and
written, so peak memory is about one tensor plus one delta tensor.

Everything that can fail is checked before the first byte is written: names and shapes (with the
Wan <-> diffusers name map), the base fingerprint of every delta tensor (a few elements read per
tensor), overlaps between deltas, free disk space.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..dtypes import DTYPE_BYTES, NUMPY_FAST, dtype_code, is_float_code, numpy_storage, parse_dtype
from ..errors import ConfigError, MismatchError
from .atomic import atomic_write, check_free_space, check_target, refuse_overwrite
from .delta import DeltaFile, blend, expert_hint, sample_positions_np, values_hash
from .files import Checkpoint
from .fileset import FileSet
from .namemap import NameResolver
from .stio import (
    SafetensorsFile,
    alignment_order,
    buffer_tensor,
    build_header,
    copy_range,
    from_f32,
    nonfinite,
    one_thread,
    require_finite,
    require_finite_scalar,
    tensor_bytes,
    to_f32,
    write_all,
)

if TYPE_CHECKING:
    import torch

# The copy thread publishes progress in steps of this size; patching follows right behind it.
_PIPELINE_CHUNK = 32 * 2**20


@dataclass
class MergeResult:
    """What a merge wrote and changed."""

    outputs: list[Path]
    tensors: int  # base tensors patched
    elements: int  # positions written (counted once even where deltas overlap)
    overlap: int  # positions touched by more than one delta
    bytes_written: int
    renamed: dict[str, str] = field(default_factory=dict)  # delta name -> base name, where they differ


@dataclass
class _Patch:
    delta: DeltaFile
    name: str  # name inside the delta
    multiplier: float


def _output_paths(base: Checkpoint, out: Path) -> tuple[Path | None, dict[str, Path]]:
    """(index path or None, shard file name -> output path)."""
    if not base.sharded:
        target = out / base.path.name if out.is_dir() else out
        return None, {base.shards[0].path.name: target}
    if out.name.endswith(".index.json"):
        folder, index_name = out.parent, out.name
    else:
        folder, index_name = out, base.path.name
    # A missing output folder is created (after every check passed) only if its parent exists.
    if not folder.is_dir() and not (folder.parent.is_dir() and not folder.exists()):
        raise ConfigError(
            f"output folder {folder} cannot be used; a sharded base is written as a folder of shards plus "
            "an index: name a new folder in an existing one, or an existing folder, with -o"
        )
    return folder / index_name, {s.path.name: folder / s.path.name for s in base.shards}


def _remove_if_empty(folder: Path) -> None:
    """Remove ``folder`` if nothing is in it (the folder a refused merge made for its output)."""
    with contextlib.suppress(OSError):
        folder.rmdir()


def _check_delta_against_base(
    base: Checkpoint, deltas: Sequence[DeltaFile], multipliers: Sequence[float], verify: bool
) -> tuple[dict[str, list[_Patch]], dict[str, str]]:
    """Map every delta tensor to its base tensor, check shapes and base fingerprints."""
    patches: dict[str, list[_Patch]] = {}
    renamed: dict[str, str] = {}
    for df, m in zip(deltas, multipliers, strict=True):
        resolver = NameResolver(base.tensors, df.info.naming)
        for name in df.names:
            target = resolver.resolve(name)
            if target is None:
                raise MismatchError(
                    f"delta {df.path.name} holds tensor {name!r}, which base {base.path.name} lacks (first "
                    "mismatching tensor); the delta was made for another model"
                )
            loc = base.tensors[target]
            if loc.entry.shape != df.shape(name):
                raise MismatchError(
                    f"tensor {target!r} is {list(loc.entry.shape)} in base {base.path.name} but "
                    f"{list(df.shape(name))} in delta {df.path.name} (first mismatching tensor); the "
                    "delta was "
                    "made for another model size"
                )
            if not is_float_code(loc.entry.dtype):
                raise MismatchError(
                    f"base tensor {target!r} is {loc.entry.dtype}, a delta can only change floats"
                )
            if target != name:
                renamed[name] = target
            patches.setdefault(target, []).append(_Patch(df, name, m))
    if verify:
        for target in sorted(
            patches, key=lambda n: (base.tensors[n].file.path.name, base.tensors[n].entry.start)
        ):
            loc = base.tensors[target]
            for p in patches[target]:
                # The whole index is read and checked first, so a corrupt delta is reported as such
                # and not as one "made from another base".
                idx = p.delta.read_indices_np(p.name)
                pos = idx[sample_positions_np(idx.size)]
                if loc.entry.dtype in NUMPY_FAST:
                    got = values_hash(loc.file.read_elements_f32(loc.entry, pos))
                else:
                    got = values_hash(loc.file.read_elements(loc.entry, pos.tolist()))
                if got != p.delta.info.base_fingerprint[p.name].hash:
                    raise MismatchError(
                        f"delta {p.delta.path.name} was not made from base {base.path.name}: tensor "
                        f"{target!r} holds "
                        "other values at the trained positions (first mismatching tensor)"
                        f"{expert_hint(p.delta.metadata)}; merge into the model "
                        "it was trained on, or pass --no-verify if you are sure"
                    )
    return patches, renamed


def _count_overlap(base: Checkpoint, patches: dict[str, list[_Patch]]) -> tuple[int, str | None]:
    total, first = 0, None
    for target, plist in patches.items():
        if len(plist) < 2:
            continue
        idx = np.concatenate([p.delta.read_indices_np(p.name) for p in plist])
        n = idx.size - np.unique(idx).size
        if n and first is None:
            first = target
        total += n
    return total, first


def _patched(t: torch.Tensor, plist: list[_Patch], out_dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """``t`` (flat, base dtype) with every patch applied, in ``out_dtype``; also the positions written."""
    import torch

    reads = []
    for p in plist:
        idx = p.delta.read_indices(p.name)
        reads.append((idx, p.delta.read_values(p.name).to(torch.float32), p.multiplier))
    out = t if t.dtype == out_dtype else t.to(out_dtype)
    if len(reads) == 1:
        idx, vals, m = reads[0]
        # With multiplier 1 the base values are not needed: no gather (no read faults on a mapping).
        new = (vals if m == 1.0 else blend(t[idx], vals, m)).to(out_dtype)
        _require_finite_result(new, plist[0].name, str(out_dtype).replace("torch.", ""))
        out[idx] = new
        return out, idx.numel()
    # Several deltas: where they overlap, their differences add up; elsewhere each writes its own.
    cat = torch.cat([r[0] for r in reads])
    uniq, inverse, counts = torch.unique(cat, return_inverse=True, return_counts=True)
    base_u = t[uniq].to(torch.float32)
    acc = torch.zeros_like(base_u)
    start = 0
    for idx, vals, m in reads:
        inv = inverse[start : start + idx.numel()]
        start += idx.numel()
        acc.index_add_(0, inv, m * (vals - base_u[inv]))
    result = base_u + acc
    start = 0
    for idx, vals, m in reads:
        inv = inverse[start : start + idx.numel()]
        start += idx.numel()
        solo = counts[inv] == 1
        # A lone position with multiplier 1 takes the trained value itself, bit for bit.
        result[inv[solo]] = blend(base_u[inv[solo]], vals[solo], m)
    result = result.to(out_dtype)
    _require_finite_result(result, plist[0].name, str(out_dtype).replace("torch.", ""))
    out[uniq] = result
    return out, uniq.numel()


def _require_finite_result(values: object, name: str, code: str) -> None:
    require_finite(
        values,
        f"merged tensor {name!r} ({code})",
        "the multiplier makes values overflow the output dtype: use a smaller --multiplier or --dtype fp32",
        ConfigError,
    )


def _numpy_ok(code: str, plist: list[_Patch], overlap_free: bool) -> bool:
    """Whether the torch-free patch path handles this tensor (common float dtypes, no overlaps)."""
    return (
        code in NUMPY_FAST
        and (overlap_free or len(plist) == 1)
        and all(p.delta.info.value_dtype in NUMPY_FAST for p in plist)
    )


def _patch_np(arr: np.ndarray, code: str, plist: list[_Patch]) -> int:
    """Apply non-overlapping patches to ``arr`` (flat storage of ``code``) in place; positions written.

    Same arithmetic as :func:`~ffid.checkpoint.delta.blend` (fp32, then round to nearest even),
    so the numpy and torch paths write identical bytes.
    """
    n = 0
    for p in plist:
        idx = p.delta.read_indices_np(p.name)
        vals = p.delta.read_values_f32(p.name)
        if p.multiplier == 1.0:
            new = from_f32(vals, code)
        else:
            base = to_f32(arr[idx], code)
            with np.errstate(over="ignore", invalid="ignore"):
                new = from_f32(base + np.float32(p.multiplier) * (vals - base), code)
        _require_finite_result(to_f32(new, code), p.name, code)
        arr[idx] = new
        n += idx.size
    return n


def _copy_and_patch(
    src: SafetensorsFile,
    target: Path,
    patches: dict[str, list[_Patch]],
    canon: dict[str, str],
    progress: Callable[[int], None] | None,
    overlap_free: bool,
    pending: FileSet | None = None,
) -> tuple[int, int, int]:
    """Same-dtype merge: copy the whole base in the kernel, then patch touched tensors in place.

    Measured on ext4 with a 1% spread delta (every tensor touched, most 4 KiB pages dirtied):
    ``copy_file_range`` + per-tensor ``mmap`` patching runs at about cp's speed, while reading
    and writing every tensor through user space is several times slower. The copy runs in a
    thread (the kernel call releases the GIL) and each tensor is patched as soon as its bytes
    are copied, so the two overlap. Each tensor is mapped on its own and unmapped after, so
    resident memory stays about one tensor.
    """
    size = src.data_start + max((e.end for e in src.order), default=0)
    tensors = elements = 0
    with atomic_write(target, size=size, pending=pending) as f:
        state = {"copied": 0, "stop": False}
        errors: list[BaseException] = []
        cond = threading.Condition()

        def copier() -> None:
            done = 0
            try:
                while done < size and not state["stop"]:
                    n = min(_PIPELINE_CHUNK, size - done)
                    copy_range(src.f, f, done, n)
                    done += n
                    with cond:
                        state["copied"] = done
                        cond.notify_all()
                    if progress is not None:
                        progress(n)
            except BaseException as exc:  # handed to the main thread
                errors.append(exc)
                with cond:
                    state["copied"] = size
                    cond.notify_all()

        thread = threading.Thread(target=copier, name="ffid-merge-copy", daemon=True)
        thread.start()
        try:
            fd = f.fileno()
            for e in src.order:
                plist = patches.get(canon[e.key])
                if not plist or e.nbytes == 0:
                    continue
                offset = src.data_start + e.start
                with cond:
                    cond.wait_for(lambda: state["copied"] >= offset + e.nbytes)  # noqa: B023 - waited on here
                if errors:
                    break
                start = offset - offset % mmap.ALLOCATIONGRANULARITY
                mm = mmap.mmap(
                    fd,
                    offset + e.nbytes - start,
                    mmap.MAP_SHARED,
                    mmap.PROT_READ | mmap.PROT_WRITE,
                    offset=start,
                )
                try:
                    if _numpy_ok(e.dtype, plist, overlap_free):
                        arr = np.frombuffer(mm, numpy_storage(e.dtype), e.numel, offset - start)
                        elements += _patch_np(arr, e.dtype, plist)
                        del arr  # the mapping cannot close while a view exports it
                    else:
                        import torch

                        with one_thread():
                            raw = torch.frombuffer(mm, dtype=torch.uint8)[offset - start :]
                            t = buffer_tensor(raw.numpy(), e.dtype, (e.numel,))
                            elements += _patched(t, plist, t.dtype)[1]
                            del raw, t
                    tensors += 1
                finally:
                    # A propagating error's traceback may still hold a view of the mapping: it is then
                    # unmapped with that traceback (and atomic_write removes the temp file).
                    with contextlib.suppress(BufferError):
                        mm.close()
        except BaseException:
            state["stop"] = True  # the copy is pointless now; atomic_write removes the temp file
            thread.join()
            raise
        thread.join()
        if errors:
            raise errors[0]
    return size, tensors, elements


def _write_shard(
    src: SafetensorsFile,
    target: Path,
    patches: dict[str, list[_Patch]],
    canon: dict[str, str],
    out_dtype: torch.dtype | None,
    progress: Callable[[int], None] | None,
    overlap_free: bool,
    pending: FileSet | None = None,
) -> tuple[int, int, int]:
    """Write one output shard; returns (bytes written, tensors patched, positions written)."""
    if out_dtype is None:
        return _copy_and_patch(src, target, patches, canon, progress, overlap_free, pending)
    # Casting: every float tensor is decoded, converted and re-encoded (new header, new offsets).
    want = dtype_code(out_dtype)
    specs = [(e.key, want if is_float_code(e.dtype) else e.dtype, e.shape) for e in src.order]
    head, laid = build_header(alignment_order(specs), src.metadata)
    layout = [src.entries[e.key] for e in laid]
    codes = {e.key: e.dtype for e in laid}
    size = len(head) + sum(e.numel * DTYPE_BYTES[codes[e.key]] for e in layout)
    tensors = elements = 0
    with one_thread(), atomic_write(target, size=size, pending=pending) as f:
        write_all(f, head)
        run: list[int] = []  # [start, end) of a run of untouched tensors, copied in one go

        def flush_run() -> None:
            if run:
                copy_range(src.f, f, src.data_start + run[0], run[1] - run[0])
                if progress is not None:
                    progress(run[1] - run[0])
                run.clear()

        for e in layout:
            plist = patches.get(canon[e.key])
            convert = codes[e.key] != e.dtype
            if plist is None and not convert:
                if run and run[1] == e.start:
                    run[1] = e.end
                else:
                    flush_run()
                    run.extend((e.start, e.end))
                continue
            flush_run()
            t = buffer_tensor(src.read_bytes(e), e.dtype, e.shape).reshape(-1)
            want_dtype = out_dtype if convert else t.dtype
            if plist:
                t, n = _patched(t, plist, want_dtype)
                tensors += 1
                elements += n
            else:
                src_bad = nonfinite(t)
                t = t.to(want_dtype)
                if nonfinite(t) > src_bad:
                    raise ConfigError(
                        f"base tensor {e.key!r} has values beyond the range of {codes[e.key]}; casting would "
                        "write inf: keep the base dtype (no --dtype) or use --dtype bf16/fp32"
                    )
            write_all(f, tensor_bytes(t))
            if progress is not None:
                progress(e.nbytes)
            del t
        flush_run()
    return size, tensors, elements


def merge_checkpoint(
    base: str | os.PathLike[str],
    deltas: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    multipliers: Sequence[float] | float = 1.0,
    dtype: torch.dtype | str | None = None,
    allow_overlap: bool = False,
    verify: bool = True,
    progress: Callable[[int], None] | None = None,
) -> MergeResult:
    """Write ``base`` with every delta applied to ``out`` (a file, or a folder for a sharded base).

    Each position becomes ``base + multiplier * (trained - base)`` computed in fp32 and cast to the
    output dtype (exactly the trained value when the multiplier is 1). Deltas touching the same
    positions are refused unless ``allow_overlap`` (then their differences are summed).
    """
    if not deltas:
        raise ConfigError("no delta given; name at least one delta file to merge into the base")
    mults = (
        [float(multipliers)] * len(deltas)
        if isinstance(multipliers, (int, float))
        else [float(m) for m in multipliers]
    )
    mults = [require_finite_scalar(m, "--multiplier") for m in mults]
    if len(mults) == 1 and len(deltas) > 1:
        mults = mults * len(deltas)
    if len(mults) != len(deltas):
        raise ConfigError(
            f"{len(mults)} multipliers for {len(deltas)} deltas; give one --multiplier for all or one "
            "per delta"
        )
    out_dtype = parse_dtype(dtype)
    out = Path(out)
    with Checkpoint(base) as ck:
        dfs = [DeltaFile(d) for d in deltas]
        try:
            index_out, shard_out = _output_paths(ck, out)
            inputs = ck.files + [d.path for d in dfs]
            for target in [*shard_out.values(), *([index_out] if index_out else [])]:
                refuse_overwrite(target, inputs)
                check_target(target)  # a FIFO/device index would only be found after the shards
            for d in dfs:
                d.bind(ck)  # implicit-index deltas rebuild their positions from the base's shapes
            patches, renamed = _check_delta_against_base(ck, dfs, mults, verify)
            overlap, first = _count_overlap(ck, patches)
            if overlap and not allow_overlap:
                raise MismatchError(
                    f"the deltas overlap in {overlap:,} positions (first in tensor {first!r}); they would "
                    "overwrite each other: pass --allow-overlap to add up their changes there"
                )
            if len(shard_out) > 1 and out_dtype is None:
                # Each shard checks its own size; check the whole set first so no shard is written in vain.
                folder = next(iter(shard_out.values())).parent
                check_free_space(folder if folder.exists() else folder.parent, sum(s.size for s in ck.shards))
            made = index_out is not None and not index_out.parent.exists()
            if index_out is not None:
                index_out.parent.mkdir(exist_ok=True)
            written = tensors = elements = 0
            outputs: list[Path] = []
            # A sharded output is switched as a set (see FileSet): shards are finished as temps first.
            with contextlib.ExitStack() as stack:
                if made and index_out is not None:  # refused while writing (an overflow): no empty folder
                    stack.callback(_remove_if_empty, index_out.parent)
                pending = stack.enter_context(FileSet(index_out, inputs)) if index_out is not None else None
                for sf in ck.shards:
                    canon = {e.key: n for n, e in sf.by_canonical.items()}
                    size, nt, ne = _write_shard(
                        sf,
                        shard_out[sf.path.name],
                        patches,
                        canon,
                        out_dtype,
                        progress,
                        overlap == 0,
                        pending,
                    )
                    written += size
                    tensors += nt
                    elements += ne
                    outputs.append(shard_out[sf.path.name])
                if index_out is not None and pending is not None:
                    assert ck.index is not None
                    index = json.loads(json.dumps(ck.index))
                    # Counted, never copied: the base's value is unchecked input (it may be absurd).
                    index.setdefault("metadata", {})["total_size"] = sum(
                        e.numel
                        * (
                            DTYPE_BYTES[dtype_code(out_dtype)]
                            if out_dtype is not None and is_float_code(e.dtype)
                            else DTYPE_BYTES[e.dtype]
                        )
                        for loc in ck.tensors.values()
                        for e in [loc.entry]
                    )
                    written += pending.commit(index)
                    outputs.insert(0, index_out)
        finally:
            for d in dfs:
                d.close()
    return MergeResult(outputs, tensors, elements, overlap, written, renamed)
