"""Every dtype fact of ffid in one place: safetensors codes, element sizes, torch and numpy dtypes,
the names users write, the integer widths of stored and device indices, and the fp8 types.

Codes are safetensors' (``"BF16"``, ``"F8_E4M3"``, ...): they are what headers, manifests and
delta files hold, so the rest of ffid speaks codes and turns them into torch or numpy dtypes only
where it makes tensors or arrays. Importing this module imports neither torch nor numpy (planning
from a header must not pay for them): the torch tables are built on first use, and numpy dtypes
are given by name (numpy accepts ``"uint16"`` wherever it accepts ``np.uint16``).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from .errors import ConfigError, ModelFileError

if TYPE_CHECKING:
    import torch

# -- safetensors codes ------------------------------------------------------------------------------
# Every code the header reader accepts, with its element size in bytes.
DTYPE_BYTES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}
# The floating-point codes: the only tensors that can be trained, merged or diffed.
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
FP8_CODES = ("F8_E4M3", "F8_E5M2")

# The torch attribute of each code; a code whose attribute this torch lacks (fp8 and the unsigned
# wide types on older builds) simply has no torch dtype.
_TORCH_NAMES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
}

# numpy dtype names of the integer codes (read through numpy: torch's unsigned types lack most ops)
# and of the float codes numpy has (bf16 is held as its uint16 bits, fp8 not at all).
NUMPY_INT: dict[str, str] = {
    "U8": "uint8",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "I8": "int8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
}
NUMPY_FLOAT: dict[str, str] = {"F64": "float64", "F32": "float32", "F16": "float16"}
# Float codes the torch-free (numpy) merge path handles bit-exactly like torch.
NUMPY_FAST = frozenset({"F32", "F16", "BF16"})


def is_float_code(code: str) -> bool:
    """Whether a safetensors code is a floating-point dtype."""
    return code in FLOAT_DTYPES


def numpy_storage(code: str) -> str:
    """numpy dtype (by name) holding one element of ``code`` (bf16 as its uint16 bits)."""
    return "uint16" if code == "BF16" else NUMPY_FLOAT.get(code) or NUMPY_INT[code]


# -- names users write --------------------------------------------------------------------------------
# Float dtype names -> code: ffid's short name, then torch's name, of each dtype.
FLOAT_NAMES: dict[str, str] = {
    "bf16": "BF16",
    "bfloat16": "BF16",
    "fp16": "F16",
    "float16": "F16",
    "fp32": "F32",
    "float32": "F32",
    "fp64": "F64",
    "float64": "F64",
    "fp8": "F8_E4M3",
    "float8_e4m3fn": "F8_E4M3",
}
# Informal spellings accepted where any float dtype may be named (--dtype of merge/full saves).
_FLOAT_ALIASES: dict[str, str] = {"half": "F16", "float": "F32", "fp8_e4m3": "F8_E4M3"}

# The dtypes a training run loads base weights in and saves full checkpoints in (model_dtype,
# save_precision, musubi's save_dtype), by short name, and their codes.
TRAIN_DTYPES: tuple[str, ...] = ("fp32", "fp16", "bf16")
TRAIN_CODES: tuple[str, ...] = tuple(FLOAT_NAMES[n] for n in TRAIN_DTYPES)
# Codes a delta file may store its values in: fp8 cannot hold trained values faithfully and most
# readers cannot decode it.
DELTA_VALUE_CODES = frozenset({*TRAIN_CODES, "F64"})
# ``--base-dtype`` of the estimator: the precisions musubi-tuner holds a DiT in ("fp8" is its
# ``--fp8_base``: the whole model in float8_e4m3fn). Order is the order help texts list them in.
BASE_DTYPES: dict[str, str] = {n: FLOAT_NAMES[n] for n in ("bf16", "fp16", "fp32", "fp8")}


def train_names() -> dict[str, str]:
    """Short and torch names of the :data:`TRAIN_DTYPES` -> code (``fp32``, ``float32``, ...)."""
    return {name: code for name, code in FLOAT_NAMES.items() if code in TRAIN_CODES}


# -- torch ---------------------------------------------------------------------------------------------
@functools.cache
def torch_dtypes() -> dict[str, torch.dtype]:
    """safetensors code -> torch dtype (only the ones this torch has)."""
    import torch

    return {code: getattr(torch, name) for code, name in _TORCH_NAMES.items() if hasattr(torch, name)}


@functools.cache
def _torch_codes() -> dict[torch.dtype, str]:
    return {dtype: code for code, dtype in torch_dtypes().items()}


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors code (:class:`ModelFileError` if this torch has none)."""
    dtype = torch_dtypes().get(code)
    if dtype is None:
        raise ModelFileError(f"safetensors dtype {code} is not supported by this torch build")
    return dtype


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    try:
        return _torch_codes()[dtype]
    except KeyError:
        raise ConfigError(
            f"dtype {dtype} cannot be stored in safetensors by ffid; use fp32, bf16 or fp16"
        ) from None


@functools.cache
def fp8_dtypes() -> tuple[torch.dtype, ...]:
    """The fp8 torch dtypes this torch build has (none on old builds)."""
    return tuple(torch_dtypes()[c] for c in FP8_CODES if c in torch_dtypes())


def bit_view(element_size: int) -> torch.dtype:
    """The same-size integer dtype used to compare floats bit for bit."""
    return torch_dtypes()[{8: "I64", 4: "I32", 2: "I16", 1: "U8"}[element_size]]


def parse_dtype(text: str | torch.dtype | None) -> torch.dtype | None:
    """A dtype name (``bf16``, ``fp16``, ``fp32``, ``fp8``, ...) or a torch dtype -> torch dtype."""
    if text is None:
        return None
    import torch

    if isinstance(text, torch.dtype):
        return text
    code = {**FLOAT_NAMES, **_FLOAT_ALIASES}.get(str(text).strip().lower())
    if code is None or code not in torch_dtypes():  # fp8 only where this torch has it
        raise ConfigError(f"dtype {text!r} is not known; use one of bf16, fp16, fp32, fp8")
    return torch_dtypes()[code]


def train_dtype(name: str) -> torch.dtype | None:
    """The torch dtype of a run's dtype setting (``model_dtype``, ``save_precision``): one of
    :data:`TRAIN_DTYPES`, else ``None`` (``auto``: keep the dtype the files store)."""
    return torch_dtypes()[FLOAT_NAMES[name]] if name in TRAIN_DTYPES else None


# -- index widths --------------------------------------------------------------------------------------
def index_code(numel: int) -> str:
    """The smallest integer code that holds every flat index of a tensor with ``numel`` elements:
    the width of the indices a delta file stores (unsigned, so a 65,536-element tensor needs U16)."""
    top = max(numel - 1, 0)
    for code, limit in (("U8", 2**8), ("U16", 2**16), ("U32", 2**32)):
        if top < limit:
            return code
    return "I64"  # int64 rather than U64: torch indexes with int64 and every reader handles it


def device_index_bytes(numel: int) -> int:
    """Bytes per flat index the engine keeps on the compute device: int32, int64 from 2**31 on."""
    return 4 if numel < 2**31 else 8


def device_index_dtype(numel: int) -> torch.dtype:
    """The torch dtype of :func:`device_index_bytes` (the engine's compact device indices)."""
    return bit_view(device_index_bytes(numel))
