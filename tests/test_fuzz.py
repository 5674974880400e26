"""Fuzzing the readers: random and mutated safetensors headers, indexes and delta files.

A seeded generator (deterministic in CI) builds hostile inputs and feeds them to ``plan``,
``inspect``, ``merge``, ``extract`` (the CLI, in process) and ``apply_delta`` (the API). Every
run must either succeed (a harmless mutation) or fail with exit code 2, exactly one line on
stderr, no traceback, and nothing written next to the output. The API may only raise
:class:`~ffid.errors.FfidError`. ``FFID_FUZZ_CASES`` sets the cases per target (default 25;
the default run takes a few seconds).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tests.test_checkpoint import StandInHandle, save_state
from tests.test_train import TinyNet

import ffid
from ffid.checkpoint import apply_delta, save_delta
from ffid.cli import main
from ffid.errors import FfidError

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = int(os.environ.get("FFID_FUZZ_CASES", "25"))
DTYPES = ["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "F64", "X9", "", 3, None]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    model = TinyNet()
    save_state(model, tmp / "base.safetensors")
    save_delta(StandInHandle(model, ffid.plan(model, 0.05, 1)), tmp / "delta.safetensors")
    save_delta(
        StandInHandle(model, ffid.plan(model, 0.05, 2)), tmp / "delta_bf16.safetensors", save_dtype="bf16"
    )
    implicit = tmp / "delta_implicit.safetensors"
    save_delta(StandInHandle(model, ffid.plan(model, 0.05, 3)), implicit, indices="implicit")
    return tmp


# -- generators ------------------------------------------------------------------------------------
def _rand_value(rng: random.Random, depth: int = 0):
    kinds = ["int", "neg", "float", "str", "list", "dict", "none", "bool", "big"]
    kind = rng.choice(kinds if depth < 3 else kinds[:4])
    return {
        "int": lambda: rng.randint(0, 64),
        "neg": lambda: -rng.randint(1, 64),
        "float": lambda: rng.choice([4.5, float("nan"), 1e308, -0.0]),
        "str": lambda: rng.choice(["44", "", "\x1b[2J", "\ud800", "../x", "F32"]),
        "list": lambda: [_rand_value(rng, depth + 1) for _ in range(rng.randint(0, 3))],
        "dict": lambda: {str(i): _rand_value(rng, depth + 1) for i in range(rng.randint(0, 2))},
        "none": lambda: None,
        "bool": lambda: rng.random() < 0.5,
        "big": lambda: 2 ** rng.choice([31, 32, 63, 64, 70]),
    }[kind]()


def _rand_entry(rng: random.Random, offset: int) -> tuple[dict, int]:
    """A header entry: mostly plausible, sometimes with one broken field."""
    shape = [rng.randint(0, 5) for _ in range(rng.randint(0, 3))]
    dtype = rng.choice(["F32", "F16", "BF16", "I64", "U8"])
    size = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1}[dtype]
    n = size
    for d in shape:
        n *= d
    entry = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
    if rng.random() < 0.4:
        field = rng.choice(["dtype", "shape", "data_offsets", "extra", "drop"])
        if field == "dtype":
            entry["dtype"] = rng.choice(DTYPES)
        elif field == "shape":
            entry["shape"] = _rand_value(rng)
        elif field == "data_offsets":
            entry["data_offsets"] = rng.choice(
                [
                    [offset, offset + n + 1],
                    [offset - 1, offset + n - 1],
                    [offset + n, offset],
                    _rand_value(rng),
                ]
            )
        elif field == "extra":
            entry["junk"] = _rand_value(rng)
        else:
            entry.pop(rng.choice(list(entry)))
    return entry, offset + n


def random_safetensors(rng: random.Random) -> bytes:
    header: dict = {}
    offset = 0
    for i in range(rng.randint(0, 5)):
        name = rng.choice([f"blocks.{i}.w", f"w{i}", "", "a.b", "x" * 300, f"blocks.{i}.w\n"])
        header[name], offset = _rand_entry(rng, offset)
    if rng.random() < 0.5:
        header["__metadata__"] = rng.choice([{"k": "v"}, {"k": 3}, [], "x", {"ffid.format": "ffid-delta"}])
    raw = json.dumps(header).encode()
    if rng.random() < 0.2:
        raw = raw[: rng.randint(0, len(raw))]
    n = len(raw)
    if rng.random() < 0.15:
        n = rng.choice([0, n + 1, n - 1, 2**63, 2**40])
    data = bytes(rng.randint(0, 255) for _ in range(max(0, offset + rng.choice([0, 0, 0, -3, 5]))))
    return struct.pack("<Q", n % 2**64) + raw + data


def mutate(rng: random.Random, blob: bytes) -> bytes:
    """Flip, insert, delete or truncate bytes, mostly inside the header."""
    data = bytearray(blob)
    (hlen,) = struct.unpack("<Q", bytes(data[:8])) if len(data) >= 8 else (0,)
    for _ in range(rng.randint(1, 4)):
        op = rng.choice(["flip", "flip", "digit", "truncate", "insert", "delete", "length"])
        hi = min(len(data), 8 + hlen) if rng.random() < 0.8 else len(data)
        pos = rng.randrange(0, max(1, hi))
        if op == "flip" and data:
            data[pos] ^= 1 << rng.randrange(8)
        elif op == "digit" and data:
            digits = [i for i in range(8, hi) if chr(data[i]).isdigit()]
            if digits:
                data[rng.choice(digits)] = ord(rng.choice("0123456789"))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = bytes(rng.choice([b"[", b"{", b'"', b"\\", b"-1", b"\x00"]))
        elif op == "delete" and data:
            del data[pos : pos + rng.randint(1, 8)]
        elif op == "length" and len(data) >= 8:
            data[:8] = struct.pack("<Q", max(0, hlen + rng.choice([-8, -1, 1, 8, 10**6])))
    return bytes(data)


def random_index(rng: random.Random, folder: Path, shard: Path) -> Path:
    shard_name = rng.choice(
        [shard.name, "../" + shard.name, "/etc/passwd", "", ".", "..", "missing.safetensors", "a/b", 3, None]
    )
    weight_map = rng.choice(
        [
            {"inp.weight": shard_name},
            {"inp.weight": shard_name, "nope": shard.name},
            [shard_name],
            shard_name,
            {},
            {"inp.weight": {"x": 1}},
        ]
    )
    index = {"metadata": rng.choice([{}, {"total_size": 1}, [], "x"]), "weight_map": weight_map}
    raw = json.dumps(index)
    if rng.random() < 0.2:
        raw = raw[: rng.randint(0, len(raw))]
    path = folder / "model.safetensors.index.json"
    path.write_text(raw)
    return path


# -- the contract ----------------------------------------------------------------------------------
def check_cli(capsys, argv: list[str], out_dir: Path | None = None) -> int:
    before = sorted(p.name for p in out_dir.iterdir()) if out_dir else None
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc in (0, 2), (argv, rc, captured.err[-500:])
    assert "Traceback" not in captured.err
    if rc == 2:
        assert len(captured.err.strip().splitlines()) == 1, captured.err[-1000:]
        if out_dir is not None:
            assert sorted(p.name for p in out_dir.iterdir()) == before, argv
    return rc


def _case_dir(tmp_path: Path, i: int) -> tuple[Path, Path]:
    case = tmp_path / f"c{i}"
    out = case / "out"
    out.mkdir(parents=True)
    return case, out


def test_fuzz_random_headers_against_plan_inspect_merge(seeds, tmp_path, capsys):
    rng = random.Random(1301)
    for i in range(CASES):
        case, out = _case_dir(tmp_path, i)
        f = case / "x.safetensors"
        f.write_bytes(random_safetensors(rng))
        check_cli(capsys, ["plan", str(f), "--ff", "0.05", "--ffid", "1", "--list", "--plain"])
        check_cli(capsys, ["inspect", str(f)])
        check_cli(
            capsys,
            ["merge", str(f), str(seeds / "delta.safetensors"), "-o", str(out / "m.safetensors"), "-q"],
            out,
        )
        check_cli(
            capsys,
            ["merge", str(seeds / "base.safetensors"), str(f), "-o", str(out / "m.safetensors"), "-q"],
            out,
        )


def merge_and_apply(capsys, seeds: Path, delta: Path, out: Path) -> None:
    """A fuzzed delta against ``ffid merge`` (one line, exit 2, nothing written) and ``apply_delta``
    (an FfidError or nothing, never another exception)."""
    check_cli(
        capsys,
        ["merge", str(seeds / "base.safetensors"), str(delta), "-o", str(out / "m.safetensors"), "-q"],
        out,
    )
    with contextlib.suppress(FfidError):
        apply_delta(TinyNet(), delta)


def test_fuzz_mutated_bases_against_plan_inspect_merge_extract(seeds, tmp_path, capsys):
    rng = random.Random(1302)
    blob = (seeds / "base.safetensors").read_bytes()
    for i in range(CASES):
        case, out = _case_dir(tmp_path, i)
        f = case / "base.safetensors"
        f.write_bytes(mutate(rng, blob))
        check_cli(capsys, ["plan", str(f), "--ff", "0.05", "--ffid", "1", "--plain"])
        check_cli(capsys, ["inspect", str(f), "--json"])
        check_cli(
            capsys,
            ["merge", str(f), str(seeds / "delta.safetensors"), "-o", str(out / "m.safetensors"), "-q"],
            out,
        )
        check_cli(
            capsys,
            ["extract", str(seeds / "base.safetensors"), str(f), "-o", str(out / "d.safetensors"), "-q"],
            out,
        )


@pytest.mark.parametrize(
    "which", ["delta.safetensors", "delta_bf16.safetensors", "delta_implicit.safetensors"]
)
def test_fuzz_mutated_deltas_against_merge_inspect_and_apply_delta(seeds, tmp_path, capsys, which):
    rng = random.Random(1303 + len(which))
    blob = (seeds / which).read_bytes()
    for i in range(CASES):
        case, out = _case_dir(tmp_path, i)
        d = case / "d.safetensors"
        d.write_bytes(mutate(rng, blob))
        check_cli(capsys, ["inspect", str(d)])
        merge_and_apply(capsys, seeds, d, out)


def test_fuzz_delta_metadata_against_merge_and_apply_delta(seeds, tmp_path, capsys):
    from safetensors import safe_open

    rng = random.Random(1304)
    with safe_open(str(seeds / "delta.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
        meta = f.metadata()
    for i in range(CASES):
        case, out = _case_dir(tmp_path, i)
        m = dict(meta)
        key = rng.choice(sorted(m))
        m[key] = rng.choice(
            ["", "{}", "[]", "null", "[[1], 2]", "nan", "-1", "F16", json.dumps(_rand_value(rng))]
        )
        t = dict(tensors)
        if rng.random() < 0.3:
            k = rng.choice(sorted(t))
            t[k] = rng.choice(
                [t[k].to(torch.float16), t[k][:-1].clone(), t[k].flip(0).clone(), t[k].reshape(1, -1)]
            )
        d = case / "d.safetensors"
        save_file(t, str(d), metadata=m)
        merge_and_apply(capsys, seeds, d, out)


def test_fuzz_implicit_selection_record_against_merge_and_apply_delta(seeds, tmp_path, capsys):
    """Every field of an implicit delta's ``ffid.selection`` replaced by junk: refused in one line."""
    from safetensors import safe_open

    rng = random.Random(1306)
    with safe_open(str(seeds / "delta_implicit.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
        meta = f.metadata()
    record = json.loads(meta["ffid.selection"])
    for i in range(CASES):
        case, out = _case_dir(tmp_path, i)
        r = dict(record)
        key = rng.choice(sorted(r))
        r[key] = rng.choice([None, "", 0, -1, 1e300, "spread/1", [], {}, {"x": 1}, _rand_value(rng)])
        d = case / "d.safetensors"
        save_file(tensors, str(d), metadata={**meta, "ffid.selection": json.dumps(r)})
        merge_and_apply(capsys, seeds, d, out)


def test_fuzz_indexes_against_plan_inspect_merge(seeds, tmp_path, capsys):
    rng = random.Random(1305)
    for i in range(CASES):
        case, out = _case_dir(tmp_path, i)
        shard = case / "model-00001-of-00001.safetensors"
        shard.write_bytes((seeds / "base.safetensors").read_bytes())
        index = random_index(rng, case, shard)
        check_cli(capsys, ["plan", str(index), "--ff", "0.05", "--ffid", "1", "--plain"])
        check_cli(capsys, ["inspect", str(index)])
        check_cli(
            capsys,
            ["merge", str(index), str(seeds / "delta.safetensors"), "-o", str(out / "merged"), "-q"],
            out,
        )
