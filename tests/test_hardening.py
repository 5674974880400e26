"""Hostile inputs, one class of the hardening issue per section: each test failed before its fix."""

from __future__ import annotations

import json
import os
import pickle
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tests.test_checkpoint import StandInHandle, save_state
from tests.test_train import TinyNet, TinyTask, cfg_for
from tests.tiny_models import tiny_wan

import ffid
from ffid.checkpoint import apply_delta, extract_delta, merge_checkpoint, save_delta
from ffid.checkpoint.atomic import TEMP_SUFFIX
from ffid.checkpoint.delta import INDEX_SUFFIX, VALUE_SUFFIX
from ffid.cli import main
from ffid.errors import ConfigError, ModelFileError
from ffid.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


# 1. No code execution from files ------------------------------------------------------------


class _Payload:
    """Unpickling this runs ``os.system``: what a crafted state file from a stranger would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng-0.pt"])
def test_resume_from_a_crafted_state_runs_no_code(tmp_path: Path, name: str) -> None:
    train(cfg_for(tmp_path, save_state=True, max_train_steps=2), task=TinyTask())
    state = tmp_path / "out" / "run-step00000002-state"
    marker = tmp_path / "pwned"
    import torch

    torch.save({"x": _Payload(marker)}, state / name)
    with pytest.raises(ModelFileError, match="never runs code"):
        train(cfg_for(tmp_path, resume=str(state), max_train_steps=4), task=TinyTask())
    assert not marker.exists()
    # a raw pickle (not a torch zip) is refused the same way
    (state / name).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ModelFileError, match="never runs code"):
        train(cfg_for(tmp_path, resume=str(state), max_train_steps=4), task=TinyTask())
    assert not marker.exists()


def test_resume_from_a_truncated_state_is_one_line(tmp_path: Path) -> None:
    train(cfg_for(tmp_path, save_state=True, max_train_steps=2), task=TinyTask())
    state = tmp_path / "out" / "run-step00000002-state"
    for name in ("optimizer.pt", "proxies.safetensors"):
        data = (state / name).read_bytes()
        (state / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(ModelFileError, match="corrupt"):
            train(cfg_for(tmp_path, resume=str(state), max_train_steps=4), task=TinyTask())
        (state / name).write_bytes(data)


def test_resume_from_a_state_with_a_wrong_structure_is_one_line(tmp_path: Path) -> None:
    import torch

    train(cfg_for(tmp_path, save_state=True, max_train_steps=2), task=TinyTask())
    state = tmp_path / "out" / "run-step00000002-state"
    torch.save({"state": {}, "param_groups": "nope"}, state / "optimizer.pt")
    with pytest.raises(ModelFileError, match="does not fit this run"):
        train(cfg_for(tmp_path, resume=str(state), max_train_steps=4), task=TinyTask())


def test_no_unsafe_loader_in_the_sources() -> None:
    src = Path(__file__).resolve().parents[1] / "src"
    for path in src.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for bad in ("weights_only=False", "pickle.load", "pickle.loads"):
            assert bad not in text, f"{path}: {bad}"


# shared helpers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """A tiny Wan base (fp32 and bf16), one delta for it."""
    tmp = tmp_path_factory.mktemp("wan")
    model = tiny_wan()
    save_state(model, tmp / "base.safetensors")
    save_state(model, tmp / "base16.safetensors", torch.float16)
    save_delta(StandInHandle(model, ffid.plan(model, 0.05, 1)), tmp / "d.safetensors")
    return tmp


def rewrite(src: Path, dst: Path, change) -> Path:
    """Copy a safetensors file with ``change(tensors, metadata)`` applied (in place on the dicts)."""
    with safe_open(str(src), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
        meta = f.metadata()
    change(tensors, meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def first_value_key(tensors: dict) -> str:
    return next(k for k in sorted(tensors) if k.endswith(VALUE_SUFFIX) and tensors[k].numel() > 4)


def poison(value: float):
    def change(tensors, meta):
        key = first_value_key(tensors)
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[3] = value

    return change


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """Run the CLI; return (exit code, stderr), asserting stderr is one line when it fails."""
    rc = main(list(argv))
    err = capsys.readouterr().err
    if rc:
        assert len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err
    return rc, err


def nothing_written(folder: Path, before: set[str]) -> bool:
    return {p.name for p in folder.iterdir()} == before


# 2. No NaN/inf in outputs --------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_merge_refuses_a_delta_holding_nonfinite_values(wan, tmp_path, capsys, value):
    bad = rewrite(wan / "d.safetensors", tmp_path / "bad.safetensors", poison(value))
    before = {p.name for p in tmp_path.iterdir()}
    rc, err = run_cli(
        capsys, "merge", str(wan / "base.safetensors"), str(bad), "-o", str(tmp_path / "m.safetensors"), "-q"
    )
    assert rc == 2 and "NaN/inf" in err and VALUE_SUFFIX not in err.split("tensor")[0]
    assert nothing_written(tmp_path, before)
    # the library refuses it too, naming the tensor
    with pytest.raises(ModelFileError, match=r"tensor '.*' holds 1 NaN/inf value"):
        apply_delta(tiny_wan(), bad)


@pytest.mark.parametrize("mult", ["nan", "inf", "-inf", "1e39"])
def test_merge_refuses_a_nonfinite_multiplier(wan, tmp_path, capsys, mult):
    before = {p.name for p in tmp_path.iterdir()}
    rc, err = run_cli(
        capsys, "merge", str(wan / "base.safetensors"), str(wan / "d.safetensors"),
        "-o", str(tmp_path / "m.safetensors"), f"--multiplier={mult}", "-q",
    )  # fmt: skip
    assert rc == 2 and "finite" in err
    assert nothing_written(tmp_path, before)
    with pytest.raises(ConfigError, match="finite"):
        apply_delta(tiny_wan(), wan / "d.safetensors", float(mult))


@pytest.mark.parametrize(
    "base,extra", [("base.safetensors", ["--dtype", "fp16"]), ("base16.safetensors", [])]
)
def test_merge_refuses_a_multiplier_that_overflows_the_output_dtype(wan, tmp_path, capsys, base, extra):
    before = {p.name for p in tmp_path.iterdir()}
    rc, err = run_cli(
        capsys, "merge", str(wan / base), str(wan / "d.safetensors"), "--no-verify",
        "-o", str(tmp_path / "m.safetensors"), "--multiplier", "1e30", *extra, "-q",
    )  # fmt: skip
    assert rc == 2 and "overflow" in err
    assert nothing_written(tmp_path, before)


def test_merge_cast_refuses_values_beyond_the_output_range(tmp_path, capsys):
    model = torch.nn.Linear(64, 4, bias=False)
    weight = model.weight.detach().clone()
    save_file({"weight": weight, "big": torch.tensor([1.0, 1e6])}, str(tmp_path / "b.safetensors"))
    d = tmp_path / "d.safetensors"
    save_delta(StandInHandle(model, ffid.plan(model, 0.05, 1)), d)
    out = tmp_path / "m.safetensors"
    rc, err = run_cli(
        capsys, "merge", str(tmp_path / "b.safetensors"), str(d), "-o", str(out), "--dtype", "fp16", "-q"
    )
    assert rc == 2 and "'big'" in err and "inf" in err
    assert not out.exists()


def test_extract_refuses_a_tuned_file_holding_nan(wan, tmp_path, capsys):
    tuned = rewrite(
        wan / "base.safetensors",
        tmp_path / "t.safetensors",
        lambda t, m: t.__setitem__(
            "blocks.0.attn1.to_q.weight", torch.full_like(t["blocks.0.attn1.to_q.weight"], float("nan"))
        ),
    )
    out = tmp_path / "x.safetensors"
    rc, err = run_cli(capsys, "extract", str(wan / "base.safetensors"), str(tuned), "-o", str(out), "-q")
    assert rc == 2 and "blocks.0.attn1.to_q.weight" in err and "NaN/inf" in err
    assert not out.exists()
    with pytest.raises(ModelFileError, match="NaN/inf"):
        extract_delta(wan / "base.safetensors", tuned, out)


def test_train_with_a_nan_base_delta_names_the_delta_not_the_learning_rate(tmp_path):
    net = TinyNet()
    d = tmp_path / "prev.safetensors"
    save_delta(StandInHandle(net, ffid.plan(net, 0.05, 2)), d)
    bad = rewrite(d, tmp_path / "bad.safetensors", poison(float("nan")))
    with pytest.raises(ModelFileError, match=r"bad.safetensors tensor .* NaN/inf"):
        train(cfg_for(tmp_path, base_deltas=[str(bad)], max_train_steps=2), task=TinyTask())


# 3. No path escape through a sharded index ---------------------------------------------------


def _index_with(folder: Path, shard: str) -> Path:
    folder.mkdir(exist_ok=True)
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {"w": shard}}))
    return index


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors", ".."])
@pytest.mark.parametrize("command", ["plan", "estimate", "inspect", "overlap"])
def test_index_shards_outside_the_index_folder_are_refused(tmp_path, capsys, shard, command):
    save_file({"w": torch.ones(4, 4)}, str(tmp_path / "outside.safetensors"))
    index = _index_with(tmp_path / "model", shard)
    argv = {
        "plan": ["plan", str(index), "--ff", "0.1", "--ffid", "1"],
        "estimate": ["estimate", str(index), "--ff", "0.1"],
        "inspect": ["inspect", str(index)],
        "overlap": ["overlap", str(index), "--ff", "0.1", "--ffids", "1,2"],
    }[command]
    rc, err = run_cli(capsys, *argv)
    assert rc == 2 and "outside its folder" in err, err


@pytest.mark.parametrize("weight_map", [[], "x", {"w": 3}, {"w": None}, {}])
def test_index_with_a_malformed_weight_map_is_one_line(tmp_path, capsys, weight_map):
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for argv in (["plan", str(tmp_path / "m.safetensors.index.json"), "--ff", "0.1", "--ffid", "1"],
                 ["inspect", str(tmp_path / "m.safetensors.index.json")]):  # fmt: skip
        rc, err = run_cli(capsys, *argv)
        assert rc == 2, err


# 7./8. Malformed safetensors headers: one line, never a traceback, never accepted --------------


def _raw_file(path: Path, header: str | bytes, data: bytes = b"\0" * 64) -> Path:
    raw = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


BAD_HEADERS = {
    "deep": "[" * 100_000 + "]" * 100_000,
    "duplicate": '{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},'
    '"a":{"dtype":"F32","shape":[4],"data_offsets":[16,32]}}',
    "overlap": '{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},'
    '"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}',
    "float-shape": '{"a":{"dtype":"F32","shape":[4.5,4],"data_offsets":[0,16]}}',
    "string-shape": '{"a":{"dtype":"F32","shape":"44","data_offsets":[0,16]}}',
    "bool-shape": '{"a":{"dtype":"F32","shape":[true,4],"data_offsets":[0,16]}}',
    "negative": '{"a":{"dtype":"F32","shape":[-4],"data_offsets":[16,0]}}',
    "surrogate": '{"a\\ud800":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}',
    "meta-int": '{"__metadata__":{"k":3},"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}',
    "meta-list": '{"__metadata__":[1],"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}',
    "entry-list": '{"a":[1,2,3]}',
}


@pytest.mark.parametrize("kind", sorted(BAD_HEADERS))
@pytest.mark.parametrize("command", ["plan", "inspect", "merge"])
def test_malformed_headers_are_refused_in_one_line(wan, tmp_path, capsys, kind, command):
    bad = _raw_file(tmp_path / "bad.safetensors", BAD_HEADERS[kind])
    out = tmp_path / "out.safetensors"
    argv = {
        "plan": ["plan", str(bad), "--ff", "0.1", "--ffid", "1"],
        "inspect": ["inspect", str(bad)],
        "merge": ["merge", str(bad), str(wan / "d.safetensors"), "-o", str(out), "-q"],
    }[command]
    rc, err = run_cli(capsys, *argv)
    assert rc == 2, err
    assert not out.exists()


def test_a_device_or_fifo_is_not_read_as_a_model(tmp_path, capsys):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    rc, err = run_cli(capsys, "inspect", str(fifo))  # would block forever if opened
    assert rc == 2 and "regular file" in err


# 5. Temp files: unpredictable, exclusive, mode-keeping, regular targets only, stale ones cleaned --


def test_a_planted_symlink_at_the_old_temp_name_is_not_followed(tmp_path, wan):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "m.safetensors"
    for pid_guess in range(
        os.getpid() - 5, os.getpid() + 50
    ):  # the old name was .m.safetensors.{pid}.ffid-tmp
        (tmp_path / f".{out.name}.{pid_guess}{TEMP_SUFFIX}").symlink_to(victim)
    merge_checkpoint(wan / "base.safetensors", [wan / "d.safetensors"], out)
    assert victim.read_text() == "precious"
    assert out.is_file() and not out.is_symlink()


def test_replacing_an_output_keeps_its_mode(tmp_path, wan):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"old")
    out.chmod(0o600)
    merge_checkpoint(wan / "base.safetensors", [wan / "d.safetensors"], out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    new = tmp_path / "n.safetensors"
    merge_checkpoint(wan / "base.safetensors", [wan / "d.safetensors"], new)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~mask


def test_a_non_regular_output_is_refused(tmp_path, wan, capsys):
    fifo = tmp_path / "out.safetensors"
    os.mkfifo(fifo)
    for target in (str(fifo), "/dev/null"):
        rc, err = run_cli(
            capsys, "merge", str(wan / "base.safetensors"), str(wan / "d.safetensors"), "-o", target, "-q"
        )
        assert rc == 2 and "not a regular file" in err
    assert stat.S_ISFIFO(fifo.stat().st_mode) and stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_a_read_only_output_folder_is_one_line(tmp_path, wan, capsys, monkeypatch):
    import tempfile

    tuned = tmp_path / "tuned.safetensors"  # differs from the base: an empty delta is refused anyway
    merge_checkpoint(wan / "base.safetensors", [wan / "d.safetensors"], tuned)

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)  # root ignores chmod, so deny the create itself
    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    out = tmp_path / "m.safetensors"
    rc, err = run_cli(
        capsys, "merge", str(wan / "base.safetensors"), str(wan / "d.safetensors"), "-o", str(out), "-q"
    )
    assert rc == 2 and "not writable" in err
    rc, err = run_cli(capsys, "extract", str(wan / "base.safetensors"), str(tuned), "-o", str(out), "-q")
    assert rc == 2 and "not writable" in err
    rc, err = run_cli(
        capsys, "plan", "wan2.1-t2v-1.3b", "--ff", "0.01", "--ffid", "1", "--plot", str(tmp_path / "p.png")
    )
    assert rc == 2 and "not writable" in err
    with pytest.raises(ConfigError, match="not writable"):
        train(cfg_for(tmp_path, save_state=True, max_train_steps=1), task=TinyTask())


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(ConfigError, match="existing file"):
        train(cfg_for(tmp_path, max_train_steps=1), task=TinyTask())


def test_a_killed_trainers_temp_state_folders_are_cleaned(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    stale = out / f".run-step00000002-state.{pid}.abc123.tmp"
    stale.mkdir()
    (stale / "proxies.safetensors").write_bytes(b"half")
    train(cfg_for(tmp_path, save_state=True, max_train_steps=2), task=TinyTask())
    assert not stale.exists()
    assert (out / "run-step00000002-state" / "state.json").is_file()


def test_free_space_margin_scales_with_the_file(tmp_path, wan, monkeypatch):
    import shutil
    from collections import namedtuple

    from ffid.checkpoint.atomic import DiskSpaceError

    usage = namedtuple("usage", "total used free")
    size = (wan / "base.safetensors").stat().st_size
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9, 5 * 2**20))
    assert size < 3 * 2**20
    merge_checkpoint(wan / "base.safetensors", [wan / "d.safetensors"], tmp_path / "m.safetensors")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9, size // 2))
    with pytest.raises(DiskSpaceError, match=r"free but the file needs .*KiB \(\+1\.\d\d MiB margin\)"):
        merge_checkpoint(wan / "base.safetensors", [wan / "d.safetensors"], tmp_path / "n.safetensors")


# 7. Zero-size tensors and broken pipes ----------------------------------------------------------


@pytest.mark.parametrize("command", ["plan", "overlap", "estimate"])
def test_a_zero_size_tensor_is_not_a_division_by_zero(tmp_path, capsys, command):
    f = tmp_path / "z.safetensors"
    save_file({"blocks.0.w": torch.zeros(0, 64), "blocks.0.v": torch.ones(64, 64)}, str(f))
    empty = tmp_path / "z0.safetensors"
    save_file({"blocks.0.w": torch.zeros(0, 64)}, str(empty))
    argv = {"plan": ["--ffid", "1"], "overlap": [], "estimate": []}[command]
    rc, err = run_cli(capsys, command, str(f), "--ff", "0.01", *argv)
    assert rc == 0, err
    rc, err = run_cli(capsys, command, str(empty), "--ff", "0.01", *argv)
    assert rc == 2 and "no floating-point tensors with elements" in err


def test_attach_skips_zero_size_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(0, 4), torch.nn.Linear(4, 64))
    handle = ffid.attach(model, ff=0.05, ffid=1)
    assert handle.selection.selected > 0
    handle.detach()


def test_a_closed_pipe_ends_quietly(monkeypatch, capsys):
    import ffid.cli.inspect as inspect_cli

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(inspect_cli, "run", broken)
    assert main(["inspect", "x.safetensors"]) == 0
    assert capsys.readouterr().err == ""


# 9. Usage errors are one line ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,expect",
    [
        (["plan", "wan2.1-t2v-1.3b", "--ff", "-inf", "--ffid", "1"], "out of range"),
        (["plan", "wan2.1-t2v-1.3b", "--ff", "-1e-3", "--ffid", "1"], "out of range"),
        (["merge", "a", "b", "-o", "c", "--multiplier", "abc"], "invalid float value: 'abc'"),
        (["extract", "a", "b", "-o", "c", "--threshold", "abc"], "invalid float value: 'abc'"),
        (["train", "--learning_rat", "1"], "did you mean --learning_rate?"),
        (["plan", "wan2.1-t2v-1.3b", "--fff", "0.1"], "did you mean --ff?"),
        (["plan"], "required"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors_are_one_line(capsys, argv, expect):
    rc, err = run_cli(capsys, *argv)
    assert rc == 2 and expect in err and "usage:" not in err


# 8. Accepted when it should be refused -------------------------------------------------------------


def _index_key(tensors: dict) -> str:
    return next(k for k in sorted(tensors) if k.endswith(INDEX_SUFFIX) and tensors[k].numel() > 40)


def _indices(change):
    def apply(tensors, meta):
        key = _index_key(tensors)
        idx = tensors[key].to(torch.int64)
        tensors[key] = change(idx, tensors, key)

    return apply


def _short_values(idx, tensors, key):
    vkey = key[: -len(INDEX_SUFFIX)] + VALUE_SUFFIX
    tensors[vkey] = tensors[vkey][:-1].clone()
    return idx


DELTA_DAMAGE = {
    "unsorted": _indices(lambda i, t, k: i[torch.cat([i.new_tensor([1, 0]), torch.arange(2, i.numel())])]),
    "duplicate": _indices(lambda i, t, k: torch.cat([i[:1], i[:-1]])),
    "negative": _indices(lambda i, t, k: torch.cat([i.new_tensor([-5]), i[1:]])),
    "out-of-range": _indices(lambda i, t, k: torch.cat([i[:-1], i.new_tensor([10**9])])),
    "short-values": _indices(_short_values),
    "2-d-index": _indices(lambda i, t, k: i[: i.numel() // 2 * 2].reshape(2, -1)),
}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(DELTA_DAMAGE))
def test_a_damaged_delta_is_reported_as_damaged_not_as_another_base(wan, tmp_path, capsys, kind):
    bad = rewrite(wan / "d.safetensors", tmp_path / "bad.safetensors", DELTA_DAMAGE[kind])
    out = tmp_path / "m.safetensors"
    rc, err = run_cli(capsys, "merge", str(wan / "base.safetensors"), str(bad), "-o", str(out), "-q")
    assert rc == 2 and "another base" not in err and "not made from" not in err, err
    assert not out.exists()
    with pytest.raises(ModelFileError):
        apply_delta(tiny_wan(), bad)


def test_values_stored_in_another_dtype_than_the_metadata_says_are_refused(wan, tmp_path, capsys):
    def to_bf16(tensors, meta):
        key = first_value_key(tensors)
        tensors[key] = tensors[key].to(torch.bfloat16)

    bad = rewrite(wan / "d.safetensors", tmp_path / "bad.safetensors", to_bf16)
    rc, err = run_cli(capsys, "inspect", str(bad))
    assert rc == 2 and "metadata says F32" in err


def test_extract_refuses_fp8_values(wan, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    tuned = tmp_path / "t.safetensors"
    merge_checkpoint(wan / "base.safetensors", [wan / "d.safetensors"], tuned)
    rc, err = run_cli(capsys, "extract", str(wan / "base.safetensors"), str(tuned), "-o", str(out),
                      "--save_precision", "fp8", "-q")  # fmt: skip
    assert rc == 2 and "float8" in err and not out.exists()


def test_overlap_of_selections_on_different_models_is_refused():
    from ffid.errors import MismatchError

    a = ffid.plan(tiny_wan(), 0.05, 1)
    b = ffid.plan(TinyNet(), 0.05, 1)
    with pytest.raises(MismatchError, match="different models"):
        ffid.overlap(a, b)
    assert ffid.overlap(a, ffid.plan(tiny_wan(), 0.05, 2)) == 0


def test_a_block_pattern_that_finds_no_block_number_is_refused(capsys):
    rc, err = run_cli(capsys, "plan", "wan2.1-t2v-1.3b", "--ff", "0.01", "--ffid", "1",
                      "--block-pattern", r"blocks\.(\w+)\.attn")  # fmt: skip
    assert rc == 2 and "finds no block number" in err


# 6. Terminal injection ------------------------------------------------------------------------------

EVIL = "\x1b[2J\x1b[31mfake\nffid: all good\r\x9b31m\u202e"


def test_metadata_is_escaped_when_printed(tmp_path, capsys):
    f = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(4, 4)}, str(f), metadata={"ss_note" + EVIL: "value" + EVIL})
    for argv in (["inspect", str(f)], ["inspect", str(f), "--json"]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert not any(c in out for c in "\x1b\r\x9b\u202e")
        assert all(not line.startswith("ffid: all good") for line in out.splitlines())


@pytest.mark.parametrize("name", ["blocks.0.w\x1b[31m", "blocks.0.w\nfake line", "w\u202e"])
def test_tensor_names_with_control_characters_are_refused(tmp_path, capsys, name):
    f = tmp_path / "m.safetensors"
    save_file({name: torch.ones(4, 4), "blocks.1.v": torch.ones(4, 4)}, str(f))
    for argv in (["inspect", str(f)], ["plan", str(f), "--ff", "0.1", "--ffid", "1", "--list", "--plain"]):
        rc, err = run_cli(capsys, *argv)
        assert rc == 2 and "control characters" in err
        assert "\x1b" not in err and "\u202e" not in err


def test_printable_escapes_what_moves_the_cursor():
    from ffid.names import printable

    assert printable("blocks.0.q.weight") == "blocks.0.q.weight"
    assert printable("a\x1b[2Jb\nc\u202e") == "a\\x1b[2Jb\\nc\\u202e"


def test_unknown_task_args_keys_are_refused_with_the_nearest_one(tmp_path):
    from ffid.train.causal_lm import CausalLMTask
    from ffid.train.task import check_task_args

    class Declared(TinyTask):
        task_args_keys = frozenset({"noise"})

    with pytest.raises(ConfigError, match=r"task_args\.nois is not a key .* did you mean 'noise'\?"):
        train(cfg_for(tmp_path, task_args={"nois": 1}), task=Declared())
    with pytest.raises(ConfigError, match="reads no task_args"):
        check_task_args(CausalLMTask(), {"foo": 1})
    check_task_args(TinyTask(), {"anything": 1})  # a task that declares nothing accepts anything


def test_a_sharded_merge_into_a_folder_whose_index_is_a_fifo_writes_nothing(tmp_path):
    model = tiny_wan()
    model.save_pretrained(tmp_path / "base", max_shard_size="40KB")
    save_delta(StandInHandle(model, ffid.plan(model, 0.05, 1)), tmp_path / "d.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    index = next((tmp_path / "base").glob("*.index.json")).name
    os.mkfifo(out / index)
    with pytest.raises(ConfigError, match="not a regular file"):
        merge_checkpoint(tmp_path / "base", [tmp_path / "d.safetensors"], out)
    assert sorted(p.name for p in out.iterdir()) == [index]


# -- 10: an ffid train error is one line, with no optional library's warning before it ----------
@pytest.mark.parametrize(
    "flags",
    [
        ["--optimizer_type", "AdamW8bit", "--preserve_weight", "nan"],  # bitsandbytes named, never imported
        ["--learning_rate", "-1"],
    ],
)
def test_train_error_in_a_fresh_process_is_one_line(tmp_path: Path, flags: list[str]) -> None:
    """In a fresh interpreter (nothing imported by other tests), the error is the only output:
    optional libraries (bitsandbytes, accelerate, diffusers) are imported only when used."""
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "ffid", "train", "--model_type", "demo", "--ff", "0.01", "--ffid", "1",
        "--output_dir", str(out), *flags,
    ]
    env = dict(os.environ, PYTHONWARNINGS="default")  # show every warning that would be raised
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ffid train: error:"), proc.stderr
    assert proc.stdout == ""
    assert not out.exists()
