"""ffid.dtypes: the one table of codes, sizes, torch/numpy dtypes, names and index widths."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from ffid import dtypes
from ffid.errors import ConfigError, ModelFileError


def test_import_pulls_neither_torch_nor_numpy():
    code = "import sys, ffid.dtypes; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_codes_agree_with_torch_and_numpy():
    assert set(dtypes.torch_dtypes()) <= set(dtypes.DTYPE_BYTES)
    for code, dtype in dtypes.torch_dtypes().items():
        assert dtype.itemsize == dtypes.DTYPE_BYTES[code], code
        assert dtypes.dtype_code(dtype) == code
        assert dtype.is_floating_point == dtypes.is_float_code(code), code
    for code in {*dtypes.NUMPY_INT, *dtypes.NUMPY_FLOAT, "BF16"}:
        assert np.dtype(dtypes.numpy_storage(code)).itemsize == dtypes.DTYPE_BYTES[code], code
    assert set(dtypes.fp8_dtypes()) == {
        getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)
    }
    assert dtypes.bit_view(2) == torch.int16 and dtypes.bit_view(1) == torch.uint8


def test_unknown_dtypes_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="cannot be stored in safetensors"):
        dtypes.dtype_code(torch.complex64)
    with pytest.raises(ConfigError, match="use one of bf16, fp16, fp32, fp8"):
        dtypes.parse_dtype("int4")
    with pytest.raises(ModelFileError, match="not supported by this torch build"):
        dtypes.torch_dtype("F4")


@pytest.mark.parametrize(
    ("name", "dtype"),
    [("bf16", torch.bfloat16), ("BFloat16", torch.bfloat16), (" half ", torch.float16),
     ("fp32", torch.float32), ("float", torch.float32), ("float64", torch.float64),
     (torch.float16, torch.float16), (None, None)],
)  # fmt: skip
def test_parse_dtype_names(name, dtype):
    assert dtypes.parse_dtype(name) == dtype


def test_run_dtypes():
    assert [dtypes.train_dtype(n) for n in ("fp32", "fp16", "bf16", "auto")] == [
        torch.float32,
        torch.float16,
        torch.bfloat16,
        None,
    ]
    assert set(dtypes.train_names()) == {"fp32", "float32", "fp16", "float16", "bf16", "bfloat16"}
    assert sorted(dtypes.DELTA_VALUE_CODES) == ["BF16", "F16", "F32", "F64"]
    assert list(dtypes.BASE_DTYPES) == ["bf16", "fp16", "fp32", "fp8"]


def test_index_widths():
    # delta files: the smallest unsigned type that holds numel - 1 (I64 past 2**32)
    sizes = (0, 1, 256, 257, 65536, 65537, 2**32, 2**32 + 1)
    assert [dtypes.index_code(n) for n in sizes] == ["U8", "U8", "U8", "U16", "U16", "U32", "U32", "I64"]
    # engine: int32 on the device, int64 from 2**31 elements on
    assert [dtypes.device_index_bytes(n) for n in (2**31 - 1, 2**31)] == [4, 8]
    assert dtypes.device_index_dtype(2**31 - 1) == torch.int32
    assert dtypes.device_index_dtype(2**31) == torch.int64
