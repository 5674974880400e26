"""The ``compat-v2`` selector: the original tensor-level "Selection Algorithm v2.0", exactly.

It reproduces what the seed implementation selected (its logs on Wan 2.2 14B are test fixtures),
so people who trained with ``--ff X --ffid N`` before get the very same whole tensors, and the
same tensor-level disjointness, again. The behaviour (including its quirks: 8 pools, ``--ffid``
as a 0-based pool index, budgets that overshoot by up to one tensor) is specified in
docs/selectors.md. The one deliberate difference: an id outside 0..7 is an error here, where the
original silently selected nothing.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from fractions import Fraction

from ..errors import ConfigError
from ..manifest import Manifest
from ..selection import Selection, TensorPick, Whole
from .base import Selector

POOLS = 8
# Tie order of attention projection weights of equal size inside a block (the original took it
# from a seeded shuffle; it is fixed here so that no RNG is involved).
_PROJ_ORDER = {"v": 0, "k": 1, "o": 2, "q": 3}


def _block_and_local(name: str) -> tuple[int | None, str]:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1]), ".".join(parts[2:])
    return None, name


def priority(local: str) -> int:
    """0: attention/FFN weights, 1: their biases, 2: norms, 3: everything else."""
    if ("attn" in local or "ffn" in local) and "weight" in local:
        return 0
    if ("attn" in local or "ffn" in local) and "bias" in local:
        return 1
    if "norm" in local:
        return 2
    return 3


def _in_block_key(name: str, local: str, numel: int) -> tuple[int, int, str]:
    parts = local.split(".")
    proj = 4
    if "attn" in local and "weight" in local and len(parts) >= 2 and parts[-2] in _PROJ_ORDER:
        proj = _PROJ_ORDER[parts[-2]]
    return numel, proj, name


def _check_id(ffid: int) -> None:
    if not 0 <= ffid < POOLS:
        raise ConfigError(
            f"--ffid {ffid} does not exist in compat-v2, which has {POOLS} pools numbered 0..{POOLS - 1} "
            "(the original silently trained nothing for larger ids); use --ffid 0..7 or --selector spread"
        )


def select_compat_v2(manifest: Manifest, *, ff: float, ffid: int, names: list[str]) -> Selection:
    """Plan a compat-v2 selection. ``names`` restricts which tensors may be taken; dealing into
    pools always uses the whole manifest so that pools match the original."""
    _check_id(ffid)
    sizes = {t.name: t.numel for t in manifest}
    ordered = sorted(sizes, key=lambda n: (priority(_block_and_local(n)[1]), sizes[n], n))
    pool = [n for i, n in enumerate(ordered) if i % POOLS == ffid]

    blocks: dict[int, list[str]] = defaultdict(list)
    others: list[str] = []
    for n in pool:
        block, _ = _block_and_local(n)
        if block is None:
            others.append(n)
        else:
            blocks[block].append(n)
    for members in blocks.values():
        members.sort(key=lambda n: _in_block_key(n, _block_and_local(n)[1], sizes[n]))

    candidates: list[str] = []
    depth = max((len(m) for m in blocks.values()), default=0)
    for r in range(depth):
        for block in sorted(blocks):
            if r < len(blocks[block]):
                candidates.append(blocks[block][r])
    candidates += sorted(others, key=lambda n: (sizes[n], n))

    total = manifest.total_params
    target = max(1, math.floor(Fraction(ff) * total))
    allowed = set(names)
    picks: dict[str, TensorPick] = {}
    running = 0
    for n in candidates:
        if running >= target:
            break
        if n not in allowed:
            continue
        picks[n] = TensorPick(n, manifest[n].shape, sizes[n], Whole(sizes[n]))
        running += sizes[n]
    if not picks:
        raise ConfigError(
            f"compat-v2 pool {ffid} holds no tensor allowed by --include/--exclude; loosen the patterns "
            "or use --selector spread"
        )
    return Selection("compat-v2", {"ff": ff, "ffid": ffid}, manifest, picks, target)


class CompatV2Selector(Selector):
    """``compat-v2``: the original whole-tensor algorithm, reproduced exactly; it takes no options."""

    name = "compat-v2"
    help = f"the original v2.0 whole-tensor algorithm, {POOLS} disjoint pools (ids 0..{POOLS - 1})"
    options = ()

    def ids(self, options: Mapping[str, int]) -> int:
        return POOLS

    def check_ffid(self, ffid: int, options: Mapping[str, int]) -> None:
        _check_id(ffid)

    def select(
        self, manifest: Manifest, *, ff: float, ffid: int, names: list[str], options: Mapping[str, int]
    ) -> Selection:
        return select_compat_v2(manifest, ff=ff, ffid=ffid, names=names)
