"""Model manifests: the names, shapes and dtypes of a model's tensors, never their values.

Everything ffid decides before training (which elements to train, how much memory it takes,
what a report shows) needs only a :class:`Manifest`. One can be made from

- an ``nn.Module`` (also one built on the ``meta`` device),
- a ``.safetensors`` file, a sharded checkpoint (``*.safetensors.index.json``) or a diffusers /
  transformers model folder: only the JSON headers are read,
- a built-in shape preset such as ``wan2.2-t2v-14b`` (see :mod:`ffid.presets`).

:func:`ffid.models.load_manifest` picks the right one for whatever names a model; this module
only reads, so the presets (made of its types) can sit above it without a cycle.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .dtypes import DTYPE_BYTES, FLOAT_DTYPES, dtype_code
from .errors import ConfigError, MissingFileError, ModelFileError
from .names import BlockFinder, BlockKey, canonical_name

if TYPE_CHECKING:
    import torch

# Shard file names as transformers / diffusers write them: name-00001-of-00003.safetensors.
_SHARD_NAME = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")
# A safetensors header larger than this is not a real header (the format caps it at 100 MB).
_MAX_HEADER = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a model: canonical name, shape, dtype code and where it came from."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    source_name: str  # the key as stored in the file / module (before canonicalisation)
    file: str | None = None  # shard file name for checkpoints, None otherwise

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES.get(self.dtype, 4)


@dataclass
class Manifest:
    """The trainable tensors of a model, sorted by canonical name.

    ``tensors`` holds only floating-point tensors (integer buffers such as position ids are not
    trainable and never selected). ``source`` says where the manifest came from, for reports.
    """

    tensors: list[TensorInfo]
    source: str = "module"
    block_pattern: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tensors = sorted(self.tensors, key=lambda t: t.name)
        self._by_name = {t.name: t for t in self.tensors}
        if len(self._by_name) != len(self.tensors):
            seen: set[str] = set()
            dup = next(t.name for t in self.tensors if t.name in seen or seen.add(t.name))
            raise ModelFileError(
                f"two tensors normalise to the same name {dup!r} in {self.source}; the file mixes "
                "wrapped and unwrapped names: re-save it with one naming"
            )
        self._finder = BlockFinder(self.block_pattern)
        if (
            self.block_pattern is not None
            and self.tensors
            and not any(self._finder(t.name) for t in self.tensors)
        ):
            example = self.tensors[len(self.tensors) // 2].name
            raise ConfigError(
                f"block pattern '{self.block_pattern}' finds no block number in any tensor name of "
                f"{self.source} (e.g. {example!r}); its first group must capture the digits, e.g. "
                "'blocks\\.(\\d+)\\.'"
            )

    # -- lookups -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> TensorInfo:
        return self._by_name[name]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    @property
    def total_params(self) -> int:
        return sum(t.numel for t in self.tensors)

    def block_of(self, name: str) -> BlockKey | None:
        """The repeated block a tensor belongs to, or ``None`` (embeddings, head, ...)."""
        return self._finder(name)

    def blocks(self) -> list[BlockKey]:
        """All blocks of the model in (group, index) order."""
        return sorted({b for b in (self.block_of(n) for n in self.names) if b is not None})

    def subset(self, names: Iterable[str]) -> Manifest:
        """A manifest restricted to ``names`` (same source and block pattern)."""
        keep = set(names)
        return Manifest(
            [t for t in self.tensors if t.name in keep], self.source, self.block_pattern, dict(self.metadata)
        )

    @property
    def fingerprint(self) -> str:
        """A short hash of the names and shapes (not dtypes, not values)."""
        h = hashlib.blake2b(digest_size=8)
        for t in self.tensors:
            h.update(f"{t.name}:{','.join(map(str, t.shape))};".encode())
        return h.hexdigest()


# -- from a module -------------------------------------------------------------------------------
def manifest_from_module(module: torch.nn.Module, block_pattern: str | None = None) -> Manifest:
    """Manifest of a module's floating-point parameters (tied parameters listed once).

    Works on ``meta``-device modules: only names, shapes and dtypes are read.
    """
    tensors = []
    for name, p in module.named_parameters(remove_duplicate=True):
        try:
            code = dtype_code(p.dtype)
        except ConfigError:
            raise ConfigError(
                f"tensor dtype {p.dtype} is not supported by ffid; cast the model to bf16/fp16/fp32"
            ) from None
        if code not in FLOAT_DTYPES or p.numel() == 0:  # an empty tensor has nothing to train
            continue
        tensors.append(TensorInfo(canonical_name(name), tuple(p.shape), code, name))
    if not tensors:
        raise ConfigError(
            f"{type(module).__name__} has no floating-point parameters to train; pass the model itself, "
            "not a wrapper without parameters"
        )
    return Manifest(tensors, f"module {type(module).__name__}", block_pattern)


# -- from safetensors headers --------------------------------------------------------------------
class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from "\ud800" escapes
        return False
    return True


def parse_json_strict(raw: bytes | str, lead: str, fix: str) -> Any:
    """JSON as ffid reads it from files: no duplicate keys, no runaway nesting, valid UTF-8 only.

    Anything else is a :class:`ModelFileError` saying ``{lead} ({why}); {fix}``.
    """
    try:
        return json.loads(raw, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        why = f"key {str(exc)!r} appears twice"
    except RecursionError:
        why = "nested too deeply"
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        why = " ".join(str(exc).split())[:120]
    raise ModelFileError(f"{lead} ({why}); {fix}")


def _is_count(x: Any) -> bool:
    return type(x) is int and x >= 0


def _open_regular(path: Path) -> int:
    """The size of ``path``, refusing anything that is not a regular file (devices, FIFOs, folders)."""
    import stat

    if not path.exists():
        raise MissingFileError(f"{path}: no such file; check the path")
    st = path.stat()
    if stat.S_ISDIR(st.st_mode):
        raise ModelFileError(f"{path} is a folder, expected a .safetensors file")
    if not stat.S_ISREG(st.st_mode):
        raise ModelFileError(f"{path} is not a regular file (a device or pipe); name a .safetensors file")
    return st.st_size


def read_safetensors_header(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, str], int]:
    """Read and validate a safetensors header without touching the tensor data.

    Returns ``(entries, metadata, data_start)`` where ``entries`` maps each stored key to
    ``{"dtype", "shape", "data_offsets"}`` and ``data_start`` is the byte offset of the data.
    Raises :class:`ModelFileError` for anything that is not a complete, well-formed safetensors
    file: duplicate keys, names or metadata that are not valid UTF-8 strings, shapes that are not
    lists of non-negative integers, data ranges that do not match the shape or overlap.
    """
    path = Path(path)
    size = _open_regular(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFileError(
                f"{path} is too short to be a safetensors file ({size} bytes); re-download or re-save it"
            )
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or n + 8 > size:
            raise ModelFileError(
                f"{path} is not a safetensors file or is truncated (header length {n} does not fit in "
                f"{size} bytes); re-download or re-save it"
            )
        raw = f.read(n)
    header = parse_json_strict(raw, f"{path} has a corrupt safetensors header", "re-download or re-save it")
    if not isinstance(header, dict):
        raise ModelFileError(
            f"{path} has a corrupt safetensors header (not a JSON object); re-download or re-save it"
        )
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and _utf8(k) and _utf8(v) for k, v in metadata.items()
    ):
        raise ModelFileError(
            f"{path} has corrupt safetensors metadata (it must map strings to strings); re-save the file"
        )
    data_len = size - 8 - n
    end_max = 0
    ranges = []
    for key, entry in header.items():
        if not key.isprintable():
            raise ModelFileError(
                f"{path}: tensor name {key!r} holds control characters (escape sequences, line breaks); "
                "the file is crafted or corrupt, ffid does not read it"
            )
        ok = _utf8(key) and isinstance(entry, dict)
        if ok:
            dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
            ok = (
                isinstance(dtype, str)
                and dtype in DTYPE_BYTES
                and isinstance(shape, list)
                and all(_is_count(d) for d in shape)
                and isinstance(offsets, list)
                and len(offsets) == 2
                and all(_is_count(o) for o in offsets)
            )
        if ok:
            start, end = offsets
            ok = start <= end and end - start == math.prod(shape) * DTYPE_BYTES[dtype]
        if not ok:
            raise ModelFileError(
                f"{path}: header entry {key!r} is malformed (dtype, shape of non-negative integers and "
                "matching data_offsets required); the file is corrupt, re-save it"
            )
        if end > start:
            ranges.append((start, end, key))
        end_max = max(end_max, end)
    ranges.sort()
    for (_, prev_end, prev_key), (start, _, key) in itertools.pairwise(ranges):
        if start < prev_end:
            raise ModelFileError(
                f"{path}: the data of {prev_key!r} and {key!r} overlap; the file is corrupt or crafted, "
                "re-save it"
            )
    if end_max > data_len:
        raise ModelFileError(
            f"{path} is truncated: its header describes {end_max} bytes of data but only {data_len} are "
            "present; re-download or re-save it"
        )
    return header, dict(metadata), 8 + n


def _flat_name(name: Any) -> bool:
    """A shard name that stays in the index's folder: a plain file name, no separators or '..'."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and _utf8(name)
        and name.isprintable()
        and Path(name).name == name
    )


def read_index(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Path]]:
    """Read a ``*.safetensors.index.json``: the index itself and tensor key -> shard path.

    The one reader of indexes (plan, overlap, estimate, inspect, merge, extract). One rule for
    shards: they live in the index's folder, so a shard name with a separator, ``..`` or an
    absolute path is refused; a ``weight_map`` that is not an object of strings is refused.
    """
    path = Path(path)
    _open_regular(path)
    if path.stat().st_size > _MAX_HEADER:
        raise ModelFileError(f"{path} is too large to be a safetensors index; name the right file")
    fix = "re-download or re-save the checkpoint"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ModelFileError(f"{path} cannot be read ({exc.strerror}); check its permissions") from None
    index = parse_json_strict(raw, f"{path} is not a valid safetensors index", fix)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelFileError(f"{path} is not a valid safetensors index (no 'weight_map' object); {fix}")
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not _utf8(key) or not key.isprintable():
            raise ModelFileError(f"{path}: weight_map entry {key!r} is not a shard file name; {fix}")
        if not _flat_name(shard):
            raise ModelFileError(
                f"{path} names shard {shard!r} outside its folder; shards must be plain file names next "
                "to the index, ffid never reads elsewhere"
            )
    meta = index.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        raise ModelFileError(f"{path}: 'metadata' is not a JSON object; {fix}")
    return index, {key: path.parent / shard for key, shard in weight_map.items()}


def _tensors_from_header(entries: dict[str, Any], file: str | None) -> list[TensorInfo]:
    return [
        TensorInfo(canonical_name(k), tuple(int(d) for d in e["shape"]), e["dtype"], k, file)
        for k, e in entries.items()
        if e["dtype"] in FLOAT_DTYPES and math.prod(e["shape"]) > 0  # an empty tensor has nothing to train
    ]


def manifest_from_safetensors(path: str | os.PathLike[str], block_pattern: str | None = None) -> Manifest:
    """Manifest of a single ``.safetensors`` file, from its header only."""
    path = Path(path)
    entries, meta, _ = read_safetensors_header(path)
    tensors = _tensors_from_header(entries, path.name)
    if not tensors:
        raise ModelFileError(f"{path} holds no floating-point tensors with elements; nothing to train in it")
    return Manifest(tensors, str(path), block_pattern, meta)


def manifest_from_index(path: str | os.PathLike[str], block_pattern: str | None = None) -> Manifest:
    """Manifest of a sharded checkpoint from its ``*.safetensors.index.json`` and shard headers."""
    index, shard_paths = read_index(path)
    tensors: list[TensorInfo] = []
    for shard in sorted(set(shard_paths.values())):
        entries, _, _ = read_safetensors_header(shard)
        tensors += _tensors_from_header(entries, shard.name)
    if not tensors:
        raise ModelFileError(f"{path} lists no floating-point tensors with elements; nothing to train in it")
    metadata = {str(k): str(v) for k, v in (index.get("metadata") or {}).items()}
    return Manifest(tensors, str(path), block_pattern, metadata)


def find_checkpoint(folder: Path) -> Path:
    """The checkpoint file inside a diffusers/transformers model or pipeline folder."""
    if (folder / "model_index.json").exists():
        for sub in ("transformer", "unet"):
            if (folder / sub).is_dir():
                return find_checkpoint(folder / sub)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return indexes[0]
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return files[0]
    if not indexes and len(files) > 1 and all(_SHARD_NAME.search(f.name) for f in files):
        raise ModelFileError(
            f"{folder} holds shards ({files[0].name}, ...) but no *.safetensors.index.json: the set is "
            "incomplete (a merge killed while switching it?); write it again"
        )
    if not indexes and not files:
        raise ModelFileError(
            f"{folder} holds no .safetensors file or index; point ffid at the checkpoint file itself "
            "(.bin/.pt checkpoints must be converted to safetensors first)"
        )
    raise ModelFileError(
        f"{folder} holds several checkpoints ({', '.join(p.name for p in (indexes or files))}); name one file"
    )
