"""A refused command writes nothing: no output folder, no file, no overwritten file of an earlier run.

One test per class the hostile probe of issue 22 found; each failed before its fix.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tests.test_checkpoint import StandInHandle, save_state
from tests.test_hardening import run_cli
from tests.test_train import TinyTask, cfg_for
from tests.tiny_models import tiny_wan

import ffid
from ffid.checkpoint import merge_checkpoint, save_delta
from ffid.errors import ConfigError, FfidError, TrainingError
from ffid.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its bytes (None for folders)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def earlier(tmp_path_factory) -> Path:
    """An output folder holding a finished earlier run (config, losses, deltas, logs)."""
    work = tmp_path_factory.mktemp("earlier")
    train(cfg_for(work, max_train_steps=2, logging_dir=None), task=TinyTask())
    return work / "out"


class _NanGradTask(TinyTask):
    """A finite loss whose gradient is NaN (the optimizer guard refuses the step)."""

    def loss(self, model, batch, generator):
        loss = super().loss(model, batch, generator)
        out = loss * 1.0
        out.register_hook(lambda g: g * float("nan"))
        return out


@pytest.mark.parametrize("case", ["env", "nan-loss", "nan-grad"])
def test_a_run_refused_late_writes_nothing(earlier, tmp_path, monkeypatch, case):
    """Refused at attach (a bad FFID_GRAD_PATH) or at step 1 (NaN): neither a new output folder nor a
    changed file in the folder of an earlier run (its -config.json and -loss.json stay)."""
    task = {"env": TinyTask(), "nan-loss": TinyTask(poison_at=1), "nan-grad": _NanGradTask()}[case]
    if case == "env":
        monkeypatch.setenv("FFID_GRAD_PATH", "bogus")
    error = ConfigError if case == "env" else TrainingError
    work = tmp_path / "work"
    shutil.copytree(earlier.parent, work)
    before = _tree(work)
    # a changed setting, so a rewritten config would show
    with pytest.raises(error):
        train(cfg_for(work, max_train_steps=3, logging_dir=None, learning_rate=1e-3), task=task)
    assert _tree(work) == before
    fresh = tmp_path / "fresh"
    with pytest.raises(error):
        train(cfg_for(fresh, max_train_steps=3), task=type(task)() if case == "nan-grad" else task)
    assert not fresh.exists()


def test_a_run_that_fails_after_a_save_keeps_its_losses(tmp_path):
    """The rule is 'nothing before the first save': once a delta is saved, the config and the
    losses up to the failure are written next to it."""
    with pytest.raises(TrainingError):
        train(cfg_for(tmp_path, max_train_steps=6, save_every_n_steps=2), task=TinyTask(poison_at=4))
    out = tmp_path / "out"
    assert (out / "run-step00000002.safetensors").is_file()
    assert json.loads((out / "run-config.json").read_text())["max_train_steps"] == 6
    assert len(json.loads((out / "run-loss.json").read_text())["losses"]) == 3


@pytest.mark.parametrize("where", ["output_name", "output_dir"])
def test_an_over_long_output_name_leaves_no_folder(tmp_path, where):
    long = "a" * 300
    deep = str(tmp_path / "new" / long / "x")
    kw = {"output_name": long} if where == "output_name" else {"output_dir": deep}
    with pytest.raises(ConfigError, match=f"{where}.*(bytes|limit)"):
        train(cfg_for(tmp_path, max_train_steps=2, **kw), task=TinyTask())
    assert list(tmp_path.iterdir()) == []


def test_the_longest_output_name_allowed_is_written(tmp_path):
    from ffid.train.io import _NAME_OVERHEAD

    name = "n" * (255 - _NAME_OVERHEAD)
    train(cfg_for(tmp_path, max_train_steps=2, save_every_n_steps=1, save_state=True, output_name=name),
          task=TinyTask())  # fmt: skip
    assert (tmp_path / "out" / f"{name}-step00000001.safetensors").is_file()


# merge and extract ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wan(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wan")
    model = tiny_wan()
    save_state(model, tmp / "base.safetensors")
    save_state(model, tmp / "base16.safetensors", torch.float16)
    model.save_pretrained(tmp / "sharded", max_shard_size="40KB")
    save_delta(StandInHandle(model, ffid.plan(model, 0.05, 1)), tmp / "d.safetensors")
    return tmp


def test_a_sharded_merge_refused_while_writing_leaves_no_folder(wan, tmp_path, capsys):
    out = tmp_path / "merged"
    rc, err = run_cli(
        capsys, "merge", str(wan / "sharded"), str(wan / "d.safetensors"), "--no-verify", "-o", str(out),
        "--multiplier", "1e30", "--dtype", "fp16", "-q",
    )  # fmt: skip
    assert rc == 2 and "overflow" in err
    assert list(tmp_path.iterdir()) == []


def test_an_absurd_total_size_is_not_copied_into_the_output(wan, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(wan / "sharded", base)
    index = next(base.glob("*.index.json"))
    data = json.loads(index.read_text())
    true_size = data["metadata"]["total_size"]
    data["metadata"]["total_size"] = 10**30
    index.write_text(json.dumps(data))
    merge_checkpoint(base, [wan / "d.safetensors"], tmp_path / "out")
    written = json.loads((tmp_path / "out" / index.name).read_text())
    assert written["metadata"]["total_size"] == true_size


def _copy(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


@pytest.mark.parametrize(
    "case,extra,expect",
    [
        ("identical", [], "no position differs"),
        ("identical", ["--threshold", "0.5"], "no position differs by more than"),
        ("other-dtype", [], "in tuned"),
        ("other-dtype", ["--threshold", "inf"], "finite"),
        ("other-dtype", ["--threshold", "nan"], "finite"),
    ],
)
def test_extract_refusals_write_nothing(wan, tmp_path, capsys, case, extra, expect):
    base = wan / "base.safetensors"
    tuned = wan / "base16.safetensors" if case == "other-dtype" else _copy(base, tmp_path / "t")
    out = tmp_path / "x.safetensors"
    before = _tree(tmp_path)
    rc, err = run_cli(capsys, "extract", str(base), str(tuned), "-o", str(out), *extra, "-q")
    assert rc == 2 and expect in err, err
    assert _tree(tmp_path) == before


def test_extract_across_dtypes_with_a_threshold_still_works(wan, tmp_path):
    out = tmp_path / "x.safetensors"
    from ffid.checkpoint import extract_delta

    with pytest.raises(FfidError, match="no position differs by more than"):  # fp16 rounding is small
        extract_delta(wan / "base.safetensors", wan / "base16.safetensors", out, threshold=0.01)
    assert not out.exists()
    res = extract_delta(wan / "base.safetensors", wan / "base16.safetensors", out, threshold=1e-6)
    assert res.elements > 0 and out.is_file()


# terminal escapes in messages ----------------------------------------------------------------

ESC = "\x1b[2J\x1b]0;pwned\x07\u202e"


@pytest.mark.parametrize(
    "field", ["manifest_fingerprint", "selection_fingerprint", "trajectory_keys", "world_size", "format"]
)
def test_a_crafted_state_prints_no_terminal_escape(tmp_path, field):
    """A value read from a crafted ``state.json`` reaches the resume error escaped (\\x1b shown)."""
    train(cfg_for(tmp_path, save_state=True, max_train_steps=2, logging_dir=None), task=TinyTask())
    state = tmp_path / "out" / "run-step00000002-state"
    meta = json.loads((state / "state.json").read_text())
    meta[field] = ESC
    if field == "trajectory_keys":  # its keys are quoted when the config hash differs
        meta["config_hash"], meta[field] = "other", {ESC: 1}
    (state / "state.json").write_text(json.dumps(meta))
    with pytest.raises(FfidError) as info:
        train(cfg_for(tmp_path, resume=str(state), max_train_steps=4, logging_dir=None), task=TinyTask())
    text = str(info.value)
    assert "\\x1b[2J" in text and not any(c in text for c in "\x1b\x07\u202e"), text


def test_every_ffid_error_escapes_what_it_quotes(capsys):
    """The rule is in the base class: no raise site can forget it, the CLI line included."""
    from ffid import errors

    for cls in (errors.ConfigError, errors.ModelFileError, errors.MissingFileError, errors.MismatchError,
                errors.TrainingError, errors.AttachError, errors.CapacityError):  # fmt: skip
        assert str(cls(f"name {ESC} here")) == "name \\x1b[2J\\x1b]0;pwned\\x07\\u202e here"
    rc, err = run_cli(capsys, "inspect", f"/nonexistent/{ESC}.safetensors")
    assert rc == 2 and "\x1b" not in err and "\\x1b[2J" in err


# NaN/inf in caches -----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["latents", "text_embeds"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_ffid_cache_refuses_nonfinite_latents_and_writes_nothing(tmp_path, capsys, bad, value):
    from safetensors.torch import save_file

    lat, txt = torch.randn(3, 4, 8, 8), torch.randn(3, 6, 32)
    {"latents": lat, "text_embeds": txt}[bad][2].view(-1)[5] = value  # the last item: none may be written
    save_file({"latents": lat}, str(tmp_path / "lat.safetensors"))
    save_file({"text_embeds": txt}, str(tmp_path / "txt.safetensors"))
    out = tmp_path / "cache"
    rc, err = run_cli(
        capsys, "cache", "--latents", str(tmp_path / "lat.safetensors"),
        "--text_embeds", str(tmp_path / "txt.safetensors"), "--output_dir", str(out),
    )  # fmt: skip
    assert rc == 2 and f"{bad} of item_000002.safetensors hold 1 NaN/inf" in err, err
    assert not out.exists()


# zero-size tensors ---------------------------------------------------------------------------


@pytest.fixture
def with_empty(tmp_path) -> Path:
    """A base holding a zero-size tensor, a tuned copy that changed two other positions, and the
    extracted delta's tensors and metadata, to craft broken deltas from."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    base = {"a.weight": torch.randn(8, 8), "empty.weight": torch.zeros(0, 8), "b.bias": torch.randn(8)}
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["a.weight"][0, 0] += 1
    tuned["b.bias"][3] -= 1
    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    return tmp_path


def test_a_zero_size_tensor_is_carried_through_extract_and_merge(with_empty, capsys):
    from safetensors.torch import load_file

    d = with_empty
    for extra in ([], ["--ff", "0.05", "--ffid", "1", "--outside", "warn", "--indices", "implicit"]):
        out, merged = d / "d.safetensors", d / "m.safetensors"
        rc, err = run_cli(capsys, "extract", str(d / "base.safetensors"), str(d / "tuned.safetensors"),
                          "-o", str(out), *extra, "-q")  # fmt: skip
        assert rc == 0, err
        rc, err = run_cli(capsys, "merge", str(d / "base.safetensors"), str(out), "-o", str(merged), "-q")
        assert rc == 0, err
        got = load_file(merged)
        assert got["empty.weight"].shape == (0, 8)
        if not extra:  # the whole difference: merging gives the tuned model back
            tuned = load_file(d / "tuned.safetensors")
            assert all(torch.equal(got[k], tuned[k]) for k in tuned)
        out.unlink()
        merged.unlink()


def _crafted(d: Path, entries: dict[str, torch.Tensor], fingerprints: dict | None = None) -> Path:
    """The unrestricted delta of ``with_empty`` with ``entries`` replacing or adding tensors and
    ``fingerprints`` added to its base fingerprint."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    src = d / "full.safetensors"
    ffid.extract_delta(d / "base.safetensors", d / "tuned.safetensors", src)
    with safe_open(str(src), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    fps = json.loads(meta["ffid.base_fingerprint"])
    meta["ffid.base_fingerprint"] = json.dumps({**fps, **(fingerprints or {})})
    save_file({**tensors, **entries}, d / "bad.safetensors", metadata=meta)
    return d / "bad.safetensors"


@pytest.mark.parametrize(
    "case,expect",
    [
        ("positions-in-empty", "within [0, 0)"),  # a zero-size base tensor cannot take a position
        ("no-values", "malformed"),  # a zero-size value tensor for one index
        ("no-positions", "other values"),  # an emptied entry no longer matches its fingerprint
    ],
)
def test_merge_refuses_a_zero_size_delta_entry_and_writes_nothing(with_empty, capsys, case, expect):
    d = with_empty
    index, value = torch.uint8, torch.float32  # as the extracted delta stores them (an 8x8 tensor)
    if case == "positions-in-empty":  # with a fingerprint entry, so the positions are what is checked
        entries = {"empty.weight.ffid_index": torch.tensor([3], dtype=index),
                   "empty.weight.ffid_value": torch.ones(1, dtype=value)}  # fmt: skip
        delta = _crafted(d, entries, {"empty.weight": [[0, 8], "0" * 16]})
    elif case == "no-values":
        delta = _crafted(d, {"a.weight.ffid_value": torch.zeros(0, dtype=value)})
    else:
        entries = {"a.weight.ffid_index": torch.zeros(0, dtype=index),
                   "a.weight.ffid_value": torch.zeros(0, dtype=value)}  # fmt: skip
        delta = _crafted(d, entries)
    before = _tree(d)
    rc, err = run_cli(
        capsys, "merge", str(d / "base.safetensors"), str(delta), "-o", str(d / "m.safetensors"), "-q"
    )
    assert rc == 2 and expect in err, err
    assert _tree(d) == before


def test_extract_refuses_a_zero_size_tensor_of_another_shape_and_writes_nothing(with_empty, capsys):
    from safetensors.torch import load_file, save_file

    d = with_empty
    tuned = load_file(d / "tuned.safetensors")
    save_file({**tuned, "empty.weight": torch.zeros(0, 4)}, d / "tuned.safetensors")
    before = _tree(d)
    rc, err = run_cli(capsys, "extract", str(d / "base.safetensors"), str(d / "tuned.safetensors"),
                      "-o", str(d / "x.safetensors"), "-q")  # fmt: skip
    assert rc == 2 and "'empty.weight' is [0, 8] in base but [0, 4] in tuned" in err, err
    assert _tree(d) == before
