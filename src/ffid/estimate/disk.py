"""Disk: the size of the delta file a run writes, from the delta writer itself (:mod:`ffid.checkpoint`)."""

from __future__ import annotations

from ..dtypes import DTYPE_BYTES, index_code
from ..selection import Selection

# The trainer's default output name; the file name is written into the delta's metadata.
DELTA_TITLE = "ffid"


def index_dtype_bytes(numel: int) -> int:
    """Bytes of the integer type a delta stores the flat indices of a ``numel``-element tensor in."""
    return DTYPE_BYTES[index_code(numel)]


def delta_file_bytes(selection: Selection) -> int:
    """Size of the delta file of ``selection`` as ``ffid.checkpoint`` writes it (fp32 values,
    indices, header with the base fingerprint) under the trainer's default name; the ``ss_*``
    keys and prompts a trainer adds to the metadata (a few hundred bytes) are not counted, nor
    the text encodings a Wan run stores (at most 64 captions: about 12 MB typically, 256 MiB at
    worst for Wan 14B; docs/delta-format.md)."""
    # Imported here: the checkpoint code loads numpy, which `ffid --help` need not pay for.
    from ..checkpoint.delta import delta_file_size

    return delta_file_size(selection, title=DELTA_TITLE)
