"""Released selection layouts never move: pinned fingerprints and index digests on every preset.

Delta files with implicit indices (format 2) store values only and rebuild their positions with
the selector named in the file. A change to a selector that re-points positions would silently
apply old files' values to other elements, so each released layout (``Selector.layout``) is pinned
here: the selection fingerprint (tensors, counts, slot offsets), the count, and a digest of the
actual indices of four tensors (first, middle and last by name, and the largest), for a few
``(ff, ffid)`` pairs on every built-in preset, plus a digest of every index of a small plan.

A failing pin means the layout changed: restore the old rule, or give the selector a new
``layout_version`` (old files then keep their version and are refused in one line, not misread)
and pin the new version next to the old one. Never edit a pinned value to make this pass.
"""

from __future__ import annotations

import hashlib

import pytest

import ffid
from ffid.presets import PRESETS
from ffid.select import SELECTORS

# The layouts released so far; a new selector or version adds a line, none is ever removed.
RELEASED = {"spread": "spread/1", "compat-v2": "compat-v2/1", "rows": "rows/1"}

PINS = {
    "wan2.1-t2v-1.3b spread 0.01 1": ("e31464f692852c77", 14189968, "0748ed7bdf9b4859"),
    "wan2.1-t2v-1.3b spread 0.05 3": ("c6aef0ccc2754943", 70949840, "f94faccc64fe32af"),
    "wan2.1-t2v-1.3b spread 0.001 0": ("a3267bf01a423929", 1418997, "287930153c1a9608"),
    "wan2.1-t2v-1.3b compat-v2 0.01 1": ("7e52164f5bc9b241", 14238208, "4df3f559388737da"),
    "wan2.1-t2v-1.3b compat-v2 0.05 3": ("4e14d92da355fb57", 75262976, "903f09967360e609"),
    "wan2.1-t2v-1.3b compat-v2 0.001 0": ("39cdddf474ddeeb2", 2406912, "2b116d1ee49d4c4b"),
    "wan2.1-t2v-1.3b rows 0.01 1": ("651f0747b0bf8712", 14192896, "d992228fe6efc65e"),
    "wan2.1-t2v-1.3b rows 0.05 3": ("9abea11952709e98", 70951168, "768495b626091cfa"),
    "wan2.1-t2v-1.3b rows 0.001 0": ("27150312aeee055b", 1425664, "1b2d9ccfb980e22f"),
    "wan2.2-ti2v-5b spread 0.01 1": ("5df6ff1291f6687b", 49997877, "78ad8b03211baf7e"),
    "wan2.2-ti2v-5b spread 0.05 3": ("7ae1e6d1de27186a", 249989386, "8cd1cb1d0296ac1c"),
    "wan2.2-ti2v-5b spread 0.001 0": ("2666b5e69dad9ecc", 4999788, "e463d85c3b2c7bf2"),
    "wan2.2-ti2v-5b compat-v2 0.01 1": ("50b94e750043fdb0", 56780800, "a8b76a108d1865fb"),
    "wan2.2-ti2v-5b compat-v2 0.05 3": ("d26035122d7824a4", 289710080, "df73a3632368f1e6"),
    "wan2.2-ti2v-5b compat-v2 0.001 0": ("74d4ec9d480c308d", 9532416, "8cec528798ffd5f3"),
    "wan2.2-ti2v-5b rows 0.01 1": ("982b99cc4078b1fa", 49999616, "213c030d9b344603"),
    "wan2.2-ti2v-5b rows 0.05 3": ("b62ffcbbb5e2919e", 249990656, "d14884efe89db618"),
    "wan2.2-ti2v-5b rows 0.001 0": ("d5c66dda8cb395d1", 5005056, "efb8d7e49a7b643e"),
    "wan2.2-t2v-14b spread 0.01 1": ("3a479df4d959a190", 142884916, "4d483a51e1744dff"),
    "wan2.2-t2v-14b spread 0.05 3": ("e8cf600910725c7e", 714424579, "5c739a514627b606"),
    "wan2.2-t2v-14b spread 0.001 0": ("7c08254cbfe2e96a", 14288492, "d8e602b5d3538ba3"),
    "wan2.2-t2v-14b compat-v2 0.01 1": ("dba2035000f0103b", 157532160, "e8a8b9671718f07e"),
    "wan2.2-t2v-14b compat-v2 0.05 3": ("34145f5b3f5e68c4", 734609920, "19e166414653f9a7"),
    "wan2.2-t2v-14b compat-v2 0.001 0": ("4fc759e9d2902b85", 26460160, "6434120e9798a6ca"),
    "wan2.2-t2v-14b rows 0.01 1": ("955fcfcce7f3bb60", 142889728, "488b00fa2ce841f1"),
    "wan2.2-t2v-14b rows 0.05 3": ("8b2e29feb7cedccb", 714428416, "6bb6f11c16072b9b"),
    "wan2.2-t2v-14b rows 0.001 0": ("e2ef03dc7ee3fe59", 14289152, "c6a66cfa56975d8e"),
    "wan2.1-t2v-14b spread 0.01 1": ("3a479df4d959a190", 142884916, "4d483a51e1744dff"),
    "wan2.1-t2v-14b spread 0.05 3": ("e8cf600910725c7e", 714424579, "5c739a514627b606"),
    "wan2.1-t2v-14b spread 0.001 0": ("7c08254cbfe2e96a", 14288492, "d8e602b5d3538ba3"),
    "wan2.1-t2v-14b compat-v2 0.01 1": ("dba2035000f0103b", 157532160, "e8a8b9671718f07e"),
    "wan2.1-t2v-14b compat-v2 0.05 3": ("34145f5b3f5e68c4", 734609920, "19e166414653f9a7"),
    "wan2.1-t2v-14b compat-v2 0.001 0": ("4fc759e9d2902b85", 26460160, "6434120e9798a6ca"),
    "wan2.1-t2v-14b rows 0.01 1": ("955fcfcce7f3bb60", 142889728, "488b00fa2ce841f1"),
    "wan2.1-t2v-14b rows 0.05 3": ("8b2e29feb7cedccb", 714428416, "6bb6f11c16072b9b"),
    "wan2.1-t2v-14b rows 0.001 0": ("e2ef03dc7ee3fe59", 14289152, "c6a66cfa56975d8e"),
}
FULL = {"spread": "66c219bfb72e0c89", "compat-v2": "6b5102e159f30e5e", "rows": "881385661bb16bb8"}


def _digest(sel, names) -> str:
    h = hashlib.blake2b(digest_size=8)
    for n in names:
        h.update(n.encode())
        h.update(sel.indices(n).numpy().astype("<i8").tobytes())
    return h.hexdigest()


def _sample(sel) -> list[str]:
    names = list(sel)
    largest = max(names, key=lambda n: (sel[n].count, n))
    return [names[0], names[len(names) // 2], names[-1], largest]


def test_every_registered_selector_is_a_released_layout():
    assert {s.name: s.layout for s in SELECTORS.values()} == RELEASED


def test_every_preset_and_selector_is_pinned():
    assert {k.split()[0] for k in PINS} == set(PRESETS)
    assert {k.split()[1] for k in PINS} == set(RELEASED) == set(FULL)


@pytest.mark.parametrize("key", list(PINS))
def test_layout_pin(key):
    preset, selector, ff, ffid_id = key.split()
    sel = ffid.plan(preset, float(ff), int(ffid_id), selector)
    assert (sel.fingerprint, sel.selected, _digest(sel, _sample(sel))) == PINS[key]


@pytest.mark.parametrize("selector", list(FULL))
def test_every_index_of_a_small_plan_is_pinned(selector):
    sel = ffid.plan("wan2.1-t2v-1.3b", 0.001, 0, selector)
    assert _digest(sel, list(sel)) == FULL[selector]


def test_the_torch_map_used_while_compiling_gives_the_same_indices(monkeypatch):
    """Outside torch.compile, spread and rows evaluate their maps in numpy (fast, no torch import
    needed); while dynamo traces, in torch. Both must give identical indices."""
    import random

    import torch

    from ffid.select.rows import RowSlot
    from ffid.select.spread import SpreadSlot

    rng = random.Random(7)
    cases = []
    for i in range(300):
        shape = tuple(rng.choice([1, 2, 3, 7, 16, 33, 100]) for _ in range(rng.choice([1, 2, 2, 3])))
        slots = rng.choice([1, 2, 5, 16])
        slot = SpreadSlot.build(f"t{i}", shape, rng.randrange(slots), slots, rng.randrange(3))
        cases.append((slot, rng.randint(0, slot.capacity)))
        if len(shape) == 2:
            rows = RowSlot.build(f"t{i}", shape, rng.randrange(slots), slots, rng.randrange(3))
            cases.append((rows, rng.randint(0, rows.capacity) * rows.cols))
    fast = [slot.indices(count) for slot, count in cases]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    for (slot, count), want in zip(cases, fast, strict=True):
        assert torch.equal(slot.indices(count), want), (slot, count)
