"""Delta format 2 (implicit indices): same merges as format 1, one-line refusals, ``ffid convert``."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tests.test_checkpoint import StandInHandle, save_state
from tests.tiny_models import tiny_wan

import ffid
from ffid.checkpoint import DeltaFile, apply_delta, load_delta, merge_checkpoint, save_delta
from ffid.checkpoint.atomic import TEMP_SUFFIX
from ffid.checkpoint.convert import convert_delta
from ffid.checkpoint.delta import INDEX_SUFFIX
from ffid.cli import main
from ffid.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CODES = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}


def _pair(model: torch.nn.Module, folder: Path, ffid_id: int = 1, seed: int = 0) -> tuple[Path, Path]:
    """The same run saved twice: explicit (format 1, fp32 values) and implicit (format 2, defaults)."""
    handle = StandInHandle(model, ffid.plan(model, 0.05, ffid_id), seed=seed)
    explicit, implicit = folder / f"e{ffid_id}.safetensors", folder / f"i{ffid_id}.safetensors"
    save_delta(handle, explicit)
    save_delta(handle, implicit, indices="implicit")
    return explicit, implicit


def _merged_bytes(out: Path) -> dict[str, bytes]:
    """Shard name -> bytes (a single file under one name, so that two outputs compare)."""
    files = sorted(out.glob("*")) if out.is_dir() else [out]
    return {(p.name if out.is_dir() else "merged"): p.read_bytes() for p in files}


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_implicit_and_explicit_deltas_merge_to_identical_bytes(tmp_path, dtype, sharded):
    model = tiny_wan().to(DTYPES[dtype])
    if sharded:
        model.save_pretrained(tmp_path / "base", max_shard_size="40KB")
        base = tmp_path / "base"
        assert len(list(base.glob("*.safetensors"))) > 1
    else:
        base = tmp_path / "base.safetensors"
        save_state(model, base)
    explicit, implicit = _pair(model, tmp_path)
    with DeltaFile(implicit) as df:
        assert df.info.format_version == "2" and df.info.value_dtype == CODES[dtype]
        assert not any(k.endswith(INDEX_SUFFIX) for k in df.file.entries)
    assert implicit.stat().st_size < explicit.stat().st_size
    outs = []
    for name, delta in (("e", explicit), ("i", implicit)):
        out = tmp_path / (f"m{name}" if sharded else f"m{name}.safetensors")
        merge_checkpoint(base, [delta], out)
        outs.append(_merged_bytes(out))
    assert outs[0] == outs[1]


def test_two_implicit_deltas_and_apply_delta_match_explicit(tmp_path):
    model = tiny_wan().to(torch.bfloat16)
    base = tmp_path / "base.safetensors"
    save_state(model, base)
    e1, i1 = _pair(model, tmp_path, 1, seed=1)
    e2, _ = _pair(model, tmp_path, 2, seed=2)
    merge_checkpoint(base, [e1, e2], tmp_path / "me.safetensors")
    merge_checkpoint(base, [i1, e2], tmp_path / "mi.safetensors")  # formats mix freely
    assert (tmp_path / "me.safetensors").read_bytes() == (tmp_path / "mi.safetensors").read_bytes()
    a, b = tiny_wan().to(torch.bfloat16), tiny_wan().to(torch.bfloat16)
    apply_delta(a, e1)
    apply_delta(b, i1)  # positions rebuilt from the module's own names and shapes
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), n
    loaded = load_delta(i1, base=model)
    explicit = load_delta(e1)
    for n, t in explicit.tensors.items():
        assert torch.equal(loaded.tensors[n].indices, t.indices)


def test_implicit_delta_needs_the_base_to_read_positions(tmp_path):
    _, implicit = _pair(tiny_wan(), tmp_path)
    with pytest.raises(ConfigError, match="stores no positions"):
        load_delta(implicit)


def test_extract_and_convert_round_trip(tmp_path, capsys):
    model = tiny_wan().to(torch.bfloat16)
    base = tmp_path / "base.safetensors"
    save_state(model, base)
    explicit, _ = _pair(model, tmp_path)
    tuned = tmp_path / "tuned.safetensors"
    merge_checkpoint(base, [explicit], tuned)
    x = tmp_path / "x.safetensors"
    args = ["extract", str(base), str(tuned), "-o", str(x), "-q", "--ff", "0.05", "--ffid", "1"]
    assert main([*args, "--indices", "implicit"]) == 0
    back = tmp_path / "back.safetensors"
    assert main(["merge", str(base), str(x), "-o", str(back), "-q"]) == 0
    assert back.read_bytes() == tuned.read_bytes()
    # explicit -> implicit -> explicit keeps positions and values; sizes as measured.
    conv = tmp_path / "c.safetensors"
    assert (
        main(["convert", str(explicit), "--indices", "implicit", "--base", str(base), "-o", str(conv)]) == 0
    )
    assert "implicit indices" in capsys.readouterr().out
    again = tmp_path / "c2.safetensors"
    result = convert_delta(conv, again, indices="explicit", base=base)
    assert result.value_dtype == "F32"  # the input's (fp32 values, from the explicit file)
    a, b = load_delta(explicit), load_delta(again)
    assert a.info.selection_fingerprint == b.info.selection_fingerprint
    for n, t in a.tensors.items():
        assert torch.equal(t.indices, b.tensors[n].indices) and torch.equal(t.values, b.tensors[n].values)
    small = tmp_path / "c3.safetensors"
    assert (
        convert_delta(explicit, small, indices="implicit", value_dtype="bf16", base=base).value_dtype
        == "BF16"
    )
    merge_checkpoint(base, [small], tmp_path / "m3.safetensors")
    assert (tmp_path / "m3.safetensors").read_bytes() == tuned.read_bytes()


# -- bad input: one line, exit 2, nothing written ------------------------------------------------


def _rewrite_header(src: Path, dst: Path, edit) -> None:
    """Copy a safetensors file with its metadata changed by ``edit(meta)`` (data block kept)."""
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header["__metadata__"])
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    dst.write_bytes(struct.pack("<Q", len(head)) + head + raw[8 + n :])


def _edit_record(key: str, value):
    def edit(meta):
        record = json.loads(meta["ffid.selection"])
        if key == "counts":
            first = sorted(record["counts"])[0]
            record["counts"][first] += 1
        else:
            record[key] = value
        meta["ffid.selection"] = json.dumps(record)

    return edit


@pytest.fixture()
def bad_setup(tmp_path):
    model = tiny_wan()
    base = tmp_path / "base.safetensors"
    save_state(model, base)
    other = tmp_path / "other.safetensors"
    save_state(tiny_wan(layers=3), other)
    wider = tiny_wan()  # the same names, one touched tensor of another size
    wider.blocks[0].ffn.net[2].weight = torch.nn.Parameter(torch.zeros(32, 48))
    save_state(wider, tmp_path / "wider.safetensors")
    _, implicit = _pair(model, tmp_path)
    return tmp_path, base, other, implicit


CASES = {
    "other model": (None, "other", "another model"),
    "other shapes": (None, "wider", "another model size"),
    "unknown planner version": (_edit_record("layout", "spread/99"), "base", "cannot rebuild"),
    "counts do not add up": (_edit_record("counts", None), "base", "damaged"),
    "fingerprint mismatch": (_edit_record("fingerprint", "0123456789abcdef"), "base", "fingerprint"),
    "truncated value block": ("truncate", "base", "truncated"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_implicit_input_is_one_line_exit_2_nothing_written(bad_setup, case, capsys):
    tmp, base, other, implicit = bad_setup
    change, target, needle = CASES[case]
    delta = tmp / "bad.safetensors"
    if change is None:
        delta = implicit
    elif change == "truncate":
        delta.write_bytes(implicit.read_bytes()[:-10])
    else:
        _rewrite_header(implicit, delta, change)
    before = sorted(p.name for p in tmp.iterdir())
    out = tmp / "out.safetensors"
    onto = {"base": base, "other": other, "wider": tmp / "wider.safetensors"}[target]
    commands = [
        ["merge", str(onto), str(delta), "-o", str(out), "-q"],
        ["convert", str(delta), "--indices", "explicit", "--base", str(onto), "-o", str(out)],
    ]
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
        assert sorted(p.name for p in tmp.iterdir()) == before
        assert not out.exists()
        assert not [p for p in tmp.iterdir() if p.name.endswith(TEMP_SUFFIX)]


def test_implicit_needs_a_rebuildable_selection(tmp_path, capsys):
    model = tiny_wan()
    base, tuned = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    save_state(model, base)
    save_state(tiny_wan(seed=1), tuned)
    out = tmp_path / "x.safetensors"
    assert main(["extract", str(base), str(tuned), "-o", str(out), "-q", "--indices", "implicit"]) == 2
    assert "--ff/--ffid" in capsys.readouterr().err
    assert main(["extract", str(base), str(tuned), "-o", str(out), "-q", "--indices", "sideways"]) == 2
    assert "--indices" in capsys.readouterr().err
    assert not out.exists()


def test_value_block_holds_values_in_selection_order(tmp_path):
    """Format 2's value tensor i is the value at the selection's i-th (sorted) position."""
    model = tiny_wan()
    sel = ffid.plan(model, 0.05, 1)
    handle = StandInHandle(model, sel)
    path = tmp_path / "i.safetensors"
    save_delta(handle, path, indices="implicit")
    trained = handle.trained_values()
    with safe_open(str(path), "pt") as f:
        for n in sel:
            assert torch.equal(f.get_tensor(n + ".ffid_value").reshape(-1), trained[n].to(torch.float32))


def test_engine_handle_saves_implicit_and_hf_resume_reads_it(tmp_path):
    from ffid.engine import attach
    from ffid.integrations.hf import load_delta_into

    model = tiny_wan()
    handle = attach(model, ff=0.05, ffid=1)
    with torch.no_grad():
        for p in handle.parameters():
            p.add_(0.01)
    path = tmp_path / "h.safetensors"
    handle.save_delta(path, indices="implicit")
    trained = handle.trained_values()
    handle.detach()
    fresh = attach(tiny_wan(), ff=0.05, ffid=1)
    assert load_delta_into(fresh, path) == sum(t.numel() for t in trained.values())
    got = fresh.trained_values()
    assert all(torch.equal(got[n], trained[n]) for n in trained)  # fp32 model: F32 values, exact


def test_inspect_reports_implicit_layout(tmp_path, capsys):
    _, implicit = _pair(tiny_wan(), tmp_path)
    assert main(["inspect", str(implicit), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (
        report["indices"] == "implicit" and report["layout"] == "spread/1" and report["format_version"] == "2"
    )


def test_explicit_positions_that_are_not_the_selection_stay_explicit(tmp_path, capsys):
    model = tiny_wan()
    base = tmp_path / "base.safetensors"
    save_state(model, base)
    explicit, _ = _pair(model, tmp_path)
    edited = tmp_path / "edited.safetensors"
    # The same header with another selection id recorded: its positions are not id 2's.
    _rewrite_header(explicit, edited, lambda m: m.update(
        {"ffid.params": m["ffid.params"].replace('"ffid": 1', '"ffid": 2'), "ffid.ffid": "2"}
    ))  # fmt: skip
    out = tmp_path / "o.safetensors"
    assert main(["convert", str(edited), "--indices", "implicit", "--base", str(base), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "keep --indices explicit" in err, err
    assert not out.exists()


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_delta_file_size_predicts_implicit_files_exactly(tmp_path, dtype):
    from ffid.checkpoint import delta_file_size

    model = tiny_wan().to(DTYPES[dtype])
    sel = ffid.plan(model, 0.05, 1)
    path = tmp_path / "size.safetensors"
    written = save_delta(StandInHandle(model, sel), path, indices="implicit", architecture="arch")
    predicted = delta_file_size(sel, title="size", architecture="arch", indices="implicit")
    assert written == path.stat().st_size == predicted


@pytest.mark.parametrize(
    ("selector", "options"),
    [("compat-v2", {}), ("rows", {"slots": 8}), ("spread", {"include": [r"^blocks\.1\."], "seed": 3})],
)
def test_every_selector_and_include_round_trips(tmp_path, selector, options):
    model = tiny_wan().to(torch.bfloat16)
    base = tmp_path / "base.safetensors"
    save_state(model, base)
    ff = {"compat-v2": 0.2, "rows": 0.05}.get(selector, 0.02)
    sel = ffid.plan(model, ff, 1, selector, **options)
    handle = StandInHandle(model, sel)
    e, i = tmp_path / "e.safetensors", tmp_path / "i.safetensors"
    save_delta(handle, e)
    save_delta(handle, i, indices="implicit")
    merge_checkpoint(base, [e], tmp_path / "me.safetensors")
    merge_checkpoint(base, [i], tmp_path / "mi.safetensors")
    assert (tmp_path / "me.safetensors").read_bytes() == (tmp_path / "mi.safetensors").read_bytes()
    with DeltaFile(i, base=base) as df:
        assert df.bind(base).fingerprint == sel.fingerprint


def test_convert_refuses_its_input_as_output_and_a_folder(tmp_path, capsys):
    model = tiny_wan()
    base = tmp_path / "base.safetensors"
    save_state(model, base)
    explicit, _ = _pair(model, tmp_path)
    before = explicit.read_bytes()
    for out in (explicit, tmp_path):
        argv = ["convert", str(explicit), "--indices", "implicit", "--base", str(base), "-o", str(out)]
        assert main(argv) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert explicit.read_bytes() == before
    assert main(["convert", str(explicit), "--indices", "implicit", "--value_dtype", "fp8", "-o", "x"]) == 2
    assert "--value_dtype" in capsys.readouterr().err
