"""Model manifests: the names, shapes and dtypes of a model's tensors, never their values.

Everything ffid decides before training (which elements to train, how much memory it takes,
what a report shows) needs only a :class:`Manifest`. One can be made from

- an ``nn.Module`` (also one built on the ``meta`` device),
- a ``.safetensors`` file, a sharded checkpoint (``*.safetensors.index.json``) or a diffusers /
  transformers model folder: only the JSON headers are read,
- a built-in shape preset such as ``wan2.2-t2v-14b`` (see :mod:`ffid.presets`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, MissingFileError, ModelFileError
from .names import BlockFinder, BlockKey, canonical_name

if TYPE_CHECKING:
    import torch

# safetensors dtype codes and their sizes in bytes.
DTYPE_BYTES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})

# A safetensors header larger than this is not a real header (the format caps it at 100 MB).
_MAX_HEADER = 100_000_000


def torch_dtype_code(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    import torch

    table = {
        torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
        torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
        torch.uint8: "U8", torch.bool: "BOOL",
    }
    for name, code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
        if hasattr(torch, name):
            table[getattr(torch, name)] = code
    try:
        return table[dtype]
    except KeyError:
        raise ConfigError(
            f"tensor dtype {dtype} is not supported by ffid;"
            " cast the model to bf16/fp16/fp32"
        ) from None


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
        code = torch_dtype_code(p.dtype)
        if code not in FLOAT_DTYPES:
            continue
        tensors.append(TensorInfo(canonical_name(name), tuple(p.shape), code, name))
    if not tensors:
        raise ConfigError(
            f"{type(module).__name__} has no floating-point parameters to train; pass the model itself, "
            "not a wrapper without parameters"
        )
    return Manifest(tensors, f"module {type(module).__name__}", block_pattern)


# -- from safetensors headers --------------------------------------------------------------------
def read_safetensors_header(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, str], int]:
    """Read and validate a safetensors header without touching the tensor data.

    Returns ``(entries, metadata, data_start)`` where ``entries`` maps each stored key to
    ``{"dtype", "shape", "data_offsets"}`` and ``data_start`` is the byte offset of the data.
    Raises :class:`ModelFileError` for anything that is not a complete safetensors file.
    """
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise ModelFileError(f"{path} is a folder, expected a .safetensors file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFileError(
                f"{path} is too short to be a safetensors file ({size} bytes);"
                " re-download or re-save it"
            )
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or n + 8 > size:
            raise ModelFileError(
                f"{path} is not a safetensors file or is truncated (header length {n} does not fit in "
                f"{size} bytes); re-download or re-save it"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(
            f"{path} has a corrupt safetensors header ({exc});"
            " re-download or re-save it"
        ) from None
    if not isinstance(header, dict):
        raise ModelFileError(
            f"{path} has a corrupt safetensors header (not a JSON object);"
            " re-download or re-save it"
        )
    metadata = header.pop("__metadata__", None) or {}
    data_len = size - 8 - n
    end_max = 0
    for key, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            numel = 1
            for d in shape:
                numel *= int(d)
            ok = dtype in DTYPE_BYTES and 0 <= start <= end and end - start == numel * DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ModelFileError(
                f"{path}: header entry {key!r} is malformed;"
                " the file is corrupt, re-save it"
            )
        end_max = max(end_max, end)
    if end_max > data_len:
        raise ModelFileError(
            f"{path} is truncated: its header describes {end_max} bytes of data but only {data_len} are "
            "present; re-download or re-save it"
        )
    return header, {str(k): str(v) for k, v in metadata.items()}, 8 + n


def _tensors_from_header(entries: dict[str, Any], file: str | None) -> list[TensorInfo]:
    return [
        TensorInfo(canonical_name(k), tuple(int(d) for d in e["shape"]), e["dtype"], k, file)
        for k, e in entries.items()
        if e["dtype"] in FLOAT_DTYPES
    ]


def manifest_from_safetensors(path: str | os.PathLike[str], block_pattern: str | None = None) -> Manifest:
    """Manifest of a single ``.safetensors`` file, from its header only."""
    path = Path(path)
    entries, meta, _ = read_safetensors_header(path)
    tensors = _tensors_from_header(entries, path.name)
    if not tensors:
        raise ModelFileError(f"{path} holds no floating-point tensors; nothing to train in it")
    return Manifest(tensors, str(path), block_pattern, meta)


def manifest_from_index(path: str | os.PathLike[str], block_pattern: str | None = None) -> Manifest:
    """Manifest of a sharded checkpoint from its ``*.safetensors.index.json`` and shard headers."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path}: no such file; check the path")
    try:
        index = json.loads(path.read_text())
        weight_map: dict[str, str] = index["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelFileError(
            f"{path} is not a valid safetensors index ({exc});"
            " re-save the checkpoint"
        ) from None
    tensors: list[TensorInfo] = []
    for shard in sorted(set(weight_map.values())):
        entries, _, _ = read_safetensors_header(path.parent / shard)
        tensors += _tensors_from_header(entries, shard)
    if not tensors:
        raise ModelFileError(f"{path} lists no floating-point tensors; nothing to train in it")
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
    if not indexes and not files:
        raise ModelFileError(
            f"{folder} holds no .safetensors file or index; point ffid at the checkpoint file itself "
            "(.bin/.pt checkpoints must be converted to safetensors first)"
        )
    raise ModelFileError(
        f"{folder} holds several checkpoints ({', '.join(p.name for p in (indexes or files))}); name one file"
    )


def load_manifest(
    source: Any,
    block_pattern: str | None = None,
) -> Manifest:
    """Make a :class:`Manifest` from a module, a manifest, a path (file/index/folder) or a preset name."""
    if isinstance(source, Manifest):
        if block_pattern is None:
            return source
        return Manifest(source.tensors, source.source, block_pattern, source.metadata)
    if not isinstance(source, (str, os.PathLike)):
        # torch is imported only here: planning from a file or preset must not pay its import time.
        import torch

        if isinstance(source, torch.nn.Module):
            return manifest_from_module(source, block_pattern)
        raise ConfigError(
            f"cannot read a model from a {type(source).__name__}; pass an nn.Module, a .safetensors path, "
            "a model folder or a preset name"
        )
    from .presets import PRESETS, preset_manifest

    text = os.fspath(source)
    if text in PRESETS:
        m = preset_manifest(text)
        return m if block_pattern is None else Manifest(m.tensors, m.source, block_pattern, m.metadata)
    path = Path(text)
    if path.is_dir():
        path = find_checkpoint(path)
    if path.name.endswith(".index.json"):
        return manifest_from_index(path, block_pattern)
    if not path.exists():
        names = ", ".join(sorted(PRESETS))
        raise MissingFileError(
            f"{text!r} is neither an existing file or folder nor a preset;"
            f" check the path or use one of: {names}"
        )
    return manifest_from_safetensors(path, block_pattern)
