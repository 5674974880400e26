"""Disk: the size of the delta file a run writes, from the delta writer itself (:mod:`ffid.checkpoint`)."""

from __future__ import annotations

from ..dtypes import DTYPE_BYTES, index_code
from ..errors import ConfigError
from ..manifest import Manifest
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
    the text encodings a Wan run stores (:func:`text_encodings_bytes`)."""
    # Imported here: the checkpoint code loads numpy, which `ffid --help` need not pay for.
    from ..checkpoint.delta import delta_file_size

    return delta_file_size(selection, title=DELTA_TITLE)


# umT5 keeps at most this many tokens of a caption (Wan's text_len); musubi caches each caption's
# encoding cut to its real length, in bf16, and a delta stores that tensor as it is.
CAPTION_TOKENS_MAX = 512


def text_encodings_bytes(manifest: Manifest, captions: int, tokens: int) -> tuple[int, str]:
    """Bytes the stored text encodings of ``captions`` captions of ``tokens`` tokens add to each
    delta of a Wan run, and a one-line note saying what was counted (bf16, at most 64 stored)."""
    from ..checkpoint.delta_text import MAX_TEXT_ENCODINGS, text_bytes
    from ..presets.wan import wan_text_width

    if captions < 0:
        raise ConfigError(f"--captions {captions} is negative; give the number of captions, e.g. 30")
    if not 1 <= tokens <= CAPTION_TOKENS_MAX:
        raise ConfigError(
            f"--caption_tokens {tokens} is outside 1..{CAPTION_TOKENS_MAX} (umT5 keeps at most "
            f"{CAPTION_TOKENS_MAX}); give the tokens of a typical caption, e.g. 60"
        )
    width = wan_text_width(manifest)
    if width is None:
        if captions:
            raise ConfigError(
                f"--captions {captions}: {manifest.source or 'this model'} has no Wan text embedding, so "
                "its deltas store no text encodings; leave --captions out"
            )
        return 0, ""
    per_token = text_bytes(1, 1, width)
    if not captions:
        return 0, (
            f"the delta file leaves out the text encodings a Wan run stores ({per_token // 1024} KiB per "
            f"caption token, {MAX_TEXT_ENCODINGS} captions at most); give --captions N --caption_tokens T "
            "to count them, or train with store_encodings=false to store none"
        )
    stored = min(captions, MAX_TEXT_ENCODINGS)
    over = f" (the first {MAX_TEXT_ENCODINGS} of {captions})" if stored < captions else ""
    return text_bytes(stored, tokens, width), (
        f"the delta file includes the stored text encodings of {stored} captions{over} of {tokens} "
        f"tokens each (bf16, width {width}); store_encodings=false leaves them out"
    )
