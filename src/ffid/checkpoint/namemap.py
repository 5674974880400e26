"""Wan DiT tensor names: original naming (Wan code, musubi-tuner, ComfyUI) <-> diffusers naming.

The two namings hold the same tensors with the same shapes; only the names differ. The table
below is the one diffusers applies when it converts an original checkpoint
(``convert_wan_transformer_to_diffusers`` in ``diffusers/loaders/single_file_utils.py``), written
as whole-component prefixes so that it can be inverted exactly:

==============================  ==========================================
original (``wan``)              diffusers
==============================  ==========================================
``text_embedding.0.*``          ``condition_embedder.text_embedder.linear_1.*``
``text_embedding.2.*``          ``condition_embedder.text_embedder.linear_2.*``
``time_embedding.0.*``          ``condition_embedder.time_embedder.linear_1.*``
``time_embedding.2.*``          ``condition_embedder.time_embedder.linear_2.*``
``time_projection.1.*``         ``condition_embedder.time_proj.*``
``head.head.*``                 ``proj_out.*``
``head.modulation``             ``scale_shift_table`` ([1, 2, dim] in both)
``img_emb.proj.{0,1,3,4}.*``    ``condition_embedder.image_embedder.{norm1,ff.net.0.proj,ff.net.2,norm2}.*``
``img_emb.emb_pos``             ``condition_embedder.image_embedder.pos_embed``
``blocks.N.self_attn.{q,k,v,o}``  ``blocks.N.attn1.{to_q,to_k,to_v,to_out.0}``
``blocks.N.cross_attn.*``       ``blocks.N.attn2.*`` (same sub-names; ``k_img``/``v_img``/``norm_k_img``
                                -> ``add_k_proj``/``add_v_proj``/``norm_added_k``)
``blocks.N.norm3.*``            ``blocks.N.norm2.*`` (the cross-attention norm; the other norms have
                                no weights in either naming)
``blocks.N.ffn.0.*``            ``blocks.N.ffn.net.0.proj.*``
``blocks.N.ffn.2.*``            ``blocks.N.ffn.net.2.*``
``blocks.N.modulation``         ``blocks.N.scale_shift_table`` ([1, 6, dim] in both)
``patch_embedding.*``, ``*.norm_q``, ``*.norm_k``   unchanged
==============================  ==========================================

Every mapped tensor keeps its shape and memory layout, so a flat index means the same element
in both namings; callers still compare shapes and refuse a tensor whose shape differs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..errors import MismatchError

WAN = "wan"
DIFFUSERS = "diffusers"
OTHER = "other"

# (original, diffusers) for names outside the blocks. A trailing "." marks a prefix; otherwise exact.
_TOP = [
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("head.head.", "proj_out."),
    ("head.modulation", "scale_shift_table"),
    ("img_emb.proj.0.", "condition_embedder.image_embedder.norm1."),
    ("img_emb.proj.1.", "condition_embedder.image_embedder.ff.net.0.proj."),
    ("img_emb.proj.3.", "condition_embedder.image_embedder.ff.net.2."),
    ("img_emb.proj.4.", "condition_embedder.image_embedder.norm2."),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
]
# (original, diffusers) for the part of a name after "blocks.N.".
_BLOCK = [
    ("modulation", "scale_shift_table"),
    ("norm3.", "norm2."),
    ("ffn.0.", "ffn.net.0.proj."),
    ("ffn.2.", "ffn.net.2."),
]
for _orig, _diff in (("self_attn.", "attn1."), ("cross_attn.", "attn2.")):
    _BLOCK += [
        (_orig + "q.", _diff + "to_q."),
        (_orig + "k.", _diff + "to_k."),
        (_orig + "v.", _diff + "to_v."),
        (_orig + "o.", _diff + "to_out.0."),
        (_orig + "norm_q.", _diff + "norm_q."),
        (_orig + "norm_k.", _diff + "norm_k."),
    ]
_BLOCK += [
    ("cross_attn.k_img.", "attn2.add_k_proj."),
    ("cross_attn.v_img.", "attn2.add_v_proj."),
    ("cross_attn.norm_k_img.", "attn2.norm_added_k."),
]

_BLOCK_RE = re.compile(r"^(blocks\.\d+\.)(.*)$")
_WAN_HINT = re.compile(
    r"(^|\.)(self_attn|cross_attn)\.|^head\.head\.|^(text|time)_embedding\.|^time_projection\."
)
_DIFFUSERS_HINT = re.compile(r"\.attn[12]\.|^condition_embedder\.|scale_shift_table$|^proj_out\.")


def detect_naming(names: Iterable[str]) -> str:
    """``"wan"``, ``"diffusers"`` or ``"other"`` for a set of canonical tensor names."""
    wan = diff = 0
    for n in names:
        if _WAN_HINT.search(n):
            wan += 1
        elif _DIFFUSERS_HINT.search(n):
            diff += 1
    if wan == diff == 0:
        return OTHER
    return WAN if wan >= diff else DIFFUSERS


def _swap(rest: str, table: list[tuple[str, str]], src: int) -> str | None:
    dst = 1 - src
    for pair in table:
        key = pair[src]
        if key.endswith("."):
            if rest.startswith(key):
                return pair[dst] + rest[len(key) :]
        elif rest == key:
            return pair[dst]
    return None


def map_name(name: str, src: str, dst: str) -> str:
    """``name`` in naming ``src`` rewritten into naming ``dst`` (unchanged when the namings agree)."""
    if src == dst or OTHER in (src, dst):
        return name
    if {src, dst} != {WAN, DIFFUSERS}:
        raise MismatchError(f"unknown tensor naming {src!r} or {dst!r}; expected 'wan' or 'diffusers'")
    side = 0 if src == WAN else 1
    m = _BLOCK_RE.match(name)
    if m:
        swapped = _swap(m.group(2), _BLOCK, side)
        return name if swapped is None else m.group(1) + swapped
    swapped = _swap(name, _TOP, side)
    return name if swapped is None else swapped


class NameResolver:
    """Finds, for names of one naming (a delta's), the matching names of a target set (a checkpoint's)."""

    def __init__(self, target_names: Iterable[str], source_naming: str):
        self.targets = set(target_names)
        self.target_naming = detect_naming(self.targets)
        self.source_naming = source_naming

    def resolve(self, name: str) -> str | None:
        """The target name holding tensor ``name``, or None when the target has no such tensor."""
        if name in self.targets:
            return name
        if self.target_naming in (WAN, DIFFUSERS):
            # The source naming may be unrecorded ("other"); only the opposite of the target can differ.
            other_side = DIFFUSERS if self.target_naming == WAN else WAN
            mapped = map_name(name, other_side, self.target_naming)
            if mapped in self.targets:
                return mapped
        return None
