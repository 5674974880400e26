"""The ffid delta file: absolute trained values at flat positions (see docs/delta-format.md).

A delta is a plain ``.safetensors`` file. For every touched tensor ``NAME`` (canonical name) it
holds ``NAME.ffid_value`` (the trained values) and, in format version 1, ``NAME.ffid_index``
(sorted flat indices into ``tensor.reshape(-1)``, the smallest integer dtype that fits). A tensor
trained whole has only ``NAME.ffid_value``, in the tensor's own shape. String metadata says what
was trained (selector, ff, ffid, fingerprints) and how (``ss_*``, ``modelspec.*``).

Values are absolute, not differences: applying a delta with multiplier 1 writes exactly the
trained values, so ``extract`` followed by ``merge`` reproduces a checkpoint bit for bit.

This module is the one place callers import from; the work is split by job so that no file
grows past what one reader holds in mind: :mod:`.delta_format` (keys, fingerprints, the parsed
header), :mod:`.delta_read`, :mod:`.delta_write`, :mod:`.delta_apply` and :mod:`.delta_text` (the
optional stored text encodings, ``ffid.text.*``).
"""

from __future__ import annotations

from .delta_apply import (
    ApplyResult,
    apply_delta,
    blend,
)
from .delta_format import (
    FINGERPRINT_SAMPLES,
    FORMAT_NAME,
    FORMAT_VERSION,
    HASH_BYTES,
    INDEX_SUFFIX,
    KEY_BASE_FP,
    KEY_BASE_MANIFEST_FP,
    KEY_EXPERT,
    KEY_FF,
    KEY_FFID,
    KEY_FORMAT,
    KEY_FORMAT_VERSION,
    KEY_NAMING,
    KEY_PARAMS,
    KEY_PROMPTS,
    KEY_SELECTED,
    KEY_SELECTION_FP,
    KEY_SELECTOR,
    KEY_SOURCE,
    KEY_TOTAL,
    KEY_TRIGGER_WORDS,
    KEY_VALUE_DTYPE,
    KEY_VERSION,
    VALUE_SUFFIX,
    DeltaInfo,
    DeltaTensor,
    TensorFingerprint,
    base_fingerprint_digest,
    delta_entries,
    delta_metadata,
    expert_hint,
    parse_info,
    preset_for,
    sample_positions,
    sample_positions_np,
    training_metadata,
    values_hash,
)
from .delta_read import (
    Delta,
    DeltaFile,
    load_delta,
)
from .delta_text import (
    KEY_TEXT_PROMPTS,
    MAX_TEXT_ENCODINGS,
    TEXT_PREFIX,
    TextLayout,
    first_stored,
    is_text_key,
)
from .delta_write import (
    delta_file_size,
    save_delta,
    write_delta,
)

# Kept for code written against the single-module layout (checkpoint/full.py used it).
_preset_for = preset_for

__all__ = [
    "FINGERPRINT_SAMPLES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "HASH_BYTES",
    "INDEX_SUFFIX",
    "KEY_BASE_FP",
    "KEY_BASE_MANIFEST_FP",
    "KEY_EXPERT",
    "KEY_FF",
    "KEY_FFID",
    "KEY_FORMAT",
    "KEY_FORMAT_VERSION",
    "KEY_NAMING",
    "KEY_PARAMS",
    "KEY_PROMPTS",
    "KEY_SELECTED",
    "KEY_SELECTION_FP",
    "KEY_SELECTOR",
    "KEY_SOURCE",
    "KEY_TEXT_PROMPTS",
    "KEY_TOTAL",
    "KEY_TRIGGER_WORDS",
    "KEY_VALUE_DTYPE",
    "KEY_VERSION",
    "MAX_TEXT_ENCODINGS",
    "TEXT_PREFIX",
    "VALUE_SUFFIX",
    "ApplyResult",
    "Delta",
    "DeltaFile",
    "DeltaInfo",
    "DeltaTensor",
    "TensorFingerprint",
    "TextLayout",
    "apply_delta",
    "base_fingerprint_digest",
    "blend",
    "delta_entries",
    "delta_file_size",
    "delta_metadata",
    "expert_hint",
    "first_stored",
    "is_text_key",
    "load_delta",
    "parse_info",
    "preset_for",
    "sample_positions",
    "sample_positions_np",
    "save_delta",
    "training_metadata",
    "values_hash",
    "write_delta",
]
