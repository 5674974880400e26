"""``ffid inspect``: what a delta or a checkpoint holds, as a JSON-ready dict and as text."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from ..dtypes import is_float_code
from ..names import BlockFinder, printable
from .delta import FORMAT_NAME, KEY_EXPERT, KEY_FORMAT, KEY_PROMPTS, KEY_TRIGGER_WORDS, DeltaFile
from .files import Checkpoint
from .namemap import detect_naming
from .stio import SafetensorsFile

TRAINING_PREFIXES = ("ss_", "modelspec.")


def _json_list(raw: str | None) -> list[str] | None:
    """A metadata value holding a JSON list of strings, or None when absent or not such a list."""
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def _block_label(finder: BlockFinder, name: str, groups: set[str]) -> str:
    key = finder(name)
    if key is None:
        return "other"
    return key.label(single_group=len(groups) <= 1)


def _blocks(names: list[str], weights: dict[str, int]) -> dict[str, int]:
    finder = BlockFinder()
    groups = {k.group for k in (finder(n) for n in names) if k is not None}
    counts: Counter[str] = Counter()
    for n in names:
        counts[_block_label(finder, n, groups)] += weights[n]
    ordered = sorted((k for k in counts if k != "other"), key=lambda k: (len(k), k))
    return {k: counts[k] for k in ([*ordered, "other"] if "other" in counts else ordered)}


def inspect_delta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Everything a delta file says about itself (see docs/delta-format.md)."""
    with DeltaFile(path) as df:
        info = df.info
        counts = {n: df.count(n) for n in df.names}
        sizes = {n: 1 for n in df.names}
        for n in df.names:
            for d in df.shape(n):
                sizes[n] *= d
        return {
            "kind": "delta",
            "path": str(df.path),
            "file_bytes": df.path.stat().st_size,
            "format_version": info.format_version,
            "indices": "implicit" if info.implicit else "explicit",
            "layout": info.selection_record.layout if info.selection_record else None,
            "ffid_version": info.ffid_version,
            "source": info.source,
            "expert": df.metadata.get(KEY_EXPERT) or None,
            "selector": info.selector,
            "params": info.params,
            "ff": info.ff,
            "ffid": info.ffid,
            "selection_fingerprint": info.selection_fingerprint,
            "base_fingerprint": info.base_digest,
            "base_manifest_fingerprint": info.base_manifest_fingerprint,
            "naming": info.naming,
            "value_dtype": info.value_dtype,
            "tensors": len(df.names),
            "whole_tensors": sum(1 for n in df.names if counts[n] == sizes[n]),
            "selected": sum(counts.values()),
            "total_params": info.total_params,
            "per_block": _blocks(df.names, counts),
            "prompts": _json_list(df.metadata.get(KEY_PROMPTS)),
            "trigger_words": _json_list(df.metadata.get(KEY_TRIGGER_WORDS)),
            "text_encodings": _text(df),
            "training_metadata": {
                k: v for k, v in sorted(df.metadata.items()) if k.startswith(TRAINING_PREFIXES)
            },
        }


def _text(df: DeltaFile) -> dict[str, Any] | None:
    """The stored text encodings (for later runs' preservation): count, width, dtypes, bytes."""
    t = df.text
    if t is None:
        return None
    return {
        "count": t.count,
        "width": t.width,
        "dtypes": list(t.dtypes),
        "tokens": t.tokens,
        "bytes": t.nbytes,
    }


def inspect_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Names, sizes, dtypes, blocks and metadata of a checkpoint (file, index or model folder)."""
    with Checkpoint(path) as ck:
        names = sorted(ck.tensors)
        numel = {n: ck.tensors[n].entry.numel for n in names}
        dtypes: Counter[str] = Counter()
        params_by_dtype: Counter[str] = Counter()
        for n in names:
            e = ck.tensors[n].entry
            dtypes[e.dtype] += 1
            params_by_dtype[e.dtype] += numel[n]
        floats = [n for n in names if is_float_code(ck.tensors[n].entry.dtype)]
        from ..manifest import Manifest, TensorInfo

        manifest = Manifest(
            [TensorInfo(n, ck.tensors[n].entry.shape, ck.tensors[n].entry.dtype, n) for n in floats]
        )
        return {
            "kind": "checkpoint",
            "path": str(ck.path),
            "file_bytes": sum(p.stat().st_size for p in ck.files),
            "shards": [s.path.name for s in ck.shards] if ck.sharded else [],
            "tensors": len(names),
            "params": sum(numel.values()),
            "float_params": sum(numel[n] for n in floats),
            "dtypes": {k: {"tensors": dtypes[k], "params": params_by_dtype[k]} for k in sorted(dtypes)},
            "naming": detect_naming(names),
            "manifest_fingerprint": manifest.fingerprint,
            "blocks": len(manifest.blocks()),
            "per_block": _blocks(names, numel),
            "metadata": dict(sorted(ck.metadata.items())),
        }


def inspect_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """:func:`inspect_delta` for ffid deltas, :func:`inspect_checkpoint` for anything else."""
    p = Path(path)
    if p.is_file() and p.name.endswith(".safetensors"):
        with SafetensorsFile(p) as sf:
            is_delta = sf.metadata.get(KEY_FORMAT) == FORMAT_NAME
        if is_delta:
            return inspect_delta(p)
    return inspect_checkpoint(p)


def _fmt_count(n: int | None) -> str:
    return "?" if n is None else f"{n:,}"


def _printable(value: Any) -> Any:
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {printable(str(k)): _printable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_printable(v) for v in value]
    return value


def format_inspect(report: dict[str, Any]) -> str:
    """Human-readable text for :func:`inspect_file`'s result (strings from the file escaped)."""
    report = _printable(report)
    lines = []
    if report["kind"] == "delta":
        frac = ""
        if report["total_params"]:
            frac = f" ({report['selected'] / report['total_params']:.4%} of {report['total_params']:,})"
        lines += [
            f"ffid delta {report['path']} ({report['file_bytes']:,} bytes, format "
            f"v{report['format_version']}, "
            f"written by ffid {report['ffid_version'] or '?'} via {report['source'] or '?'})",
            f"  selector   {report['selector']}  ff={report['ff']}  ffid={report['ffid']}"
            + (f"  expert={report['expert']} (Wan 2.2)" if report.get("expert") else ""),
            f"  params     {report['params']}",
            f"  selected   {report['selected']:,} elements in {report['tensors']} tensors{frac}"
            + (f", {report['whole_tensors']} whole" if report["whole_tensors"] else ""),
            f"  values     {report['value_dtype']}, naming {report['naming']}, indices {report['indices']}"
            + (f" (rebuilt by layout {report['layout']})" if report["layout"] else ""),
            f"  selection fingerprint {report['selection_fingerprint']}",
            f"  base fingerprint      {report['base_fingerprint']} (manifest "
            f"{report['base_manifest_fingerprint']})",
        ]
        for key, label in (("trigger_words", "trigger words"), ("prompts", "prompts trained")):
            values = report.get(key)
            if values:
                shown = ", ".join(repr(v) for v in values[:5])
                more = f" and {len(values) - 5} more" if len(values) > 5 else ""
                lines.append(f"  {label} {shown}{more}")
        text = report.get("text_encodings")
        if text:
            lines.append(
                f"  text encodings {text['count']} prompt(s) stored, {text['tokens']:,} tokens x width "
                f"{text['width']}, {'/'.join(text['dtypes'])}, {text['bytes']:,} bytes (protect them later)"
            )
        meta = report["training_metadata"]
    else:
        lines += [
            f"checkpoint {report['path']} ({report['file_bytes']:,} bytes"
            + (f", {len(report['shards'])} shards" if report["shards"] else "")
            + ")",
            f"  tensors    {report['tensors']:,}  params {report['params']:,} (float "
            f"{report['float_params']:,})",
            "  dtypes     "
            + ", ".join(
                f"{k}: {v['tensors']} tensors / {v['params']:,}" for k, v in report["dtypes"].items()
            ),
            f"  naming     {report['naming']}, {report['blocks']} blocks, manifest fingerprint "
            f"{report['manifest_fingerprint']}",
        ]
        meta = report["metadata"]
    per_block = report["per_block"]
    if per_block:
        what = "selected" if report["kind"] == "delta" else "params"
        lines.append(f"  {what} per block:")
        items = list(per_block.items())
        for i in range(0, len(items), 4):
            lines.append("    " + "   ".join(f"{k:>6}: {_fmt_count(v):>12}" for k, v in items[i : i + 4]))
    if meta:
        lines.append("  metadata:")
        for k, v in meta.items():
            text = v if len(v) <= 100 else v[:97] + "..."  # already escaped: no line breaks
            lines.append(f"    {k} = {text}")
    return "\n".join(lines)
