"""Preservation: recorded prompts, the preserved run's effect, resume, refusals (demo task, tiny spec)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ffid.cli import main
from ffid.demo.data import encode_prompt
from ffid.demo.model import ModelSpec, build_model, predict
from ffid.demo.task import DemoTask, load_model, save_model
from ffid.errors import ConfigError
from ffid.preserve import (
    PROMPTS_KEY,
    Preserver,
    PreserveSettings,
    Protected,
    protected_prompts,
    recorded_prompts,
)
from ffid.train import config_from_mapping, train

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = ModelSpec(dim=32, heads=2, layers=2, ffn_dim=64, freq_dim=16)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("preserve") / "base.safetensors"
    save_model(build_model(SPEC, seed=0), SPEC, path)
    return path


def settings(out: Path, base: Path, name: str, digit: int, ffid: int, **extra: object) -> dict:
    return {
        "model_type": "demo",
        "model_path": str(base),
        "ff": 0.05,
        "ffid": ffid,
        "learning_rate": 3e-2,
        "max_train_steps": 6,
        "batch_size": 8,
        "seed": 5,
        "output_dir": str(out),
        "output_name": name,
        "logging_dir": "none",
        "progress": False,
        "task_args": {
            "concepts": {name: digit},
            "caption_dropout": 0.0,
            "prior": {"zero": 0, "one": 1},
            "prior_per_class": 4,
        },
        **extra,
    }


def run(out: Path, base: Path, name: str, digit: int, ffid: int, **extra: object):
    result = train(config_from_mapping(settings(out, base, name, digit, ffid, **extra)))
    result.handle.detach()
    return result


@pytest.fixture(scope="module")
def delta1(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("char1")
    return run(out, base, "character1", 7, 1, trigger_words=["character1"]).final


def drift(base: Path, deltas: list[Path], reference: list[Path], prompt: str) -> float:
    """Mean squared difference of predictions for ``prompt`` between two weight sets."""
    from ffid.checkpoint import apply_delta

    def model(ds: list[Path]):
        m, _ = load_model(base)
        for d in ds:
            apply_delta(m, d)
        return m.eval()

    g = torch.Generator().manual_seed(11)
    x = torch.randn(16, 1, 1, 16, 16, generator=g)
    t = torch.rand(16, generator=g)
    text = encode_prompt(prompt).expand(16, -1, -1)
    with torch.no_grad():
        a, b = predict(model(deltas), x, t, text), predict(model(reference), x, t, text)
    return float((a - b).pow(2).mean())


def test_a_run_records_its_prompts_and_trigger_words(
    delta1: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with safe_open(str(delta1), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta[PROMPTS_KEY]) == ["a digit character1"]
    assert recorded_prompts(delta1) == ["a digit character1", "character1"]
    prompts = protected_prompts([delta1], regularisation=["a digit zero"], extra=["mine"])
    assert [(p.prompt, p.source) for p in prompts] == [
        ("a digit character1", delta1.name),
        ("character1", delta1.name),
        ("mine", "user"),
        ("a digit zero", "regularisation"),
        ("", "empty"),
    ]
    assert main(["inspect", str(delta1)]) == 0
    out = capsys.readouterr().out
    assert "trigger words 'character1'" in out and "prompts trained 'a digit character1'" in out


def test_preserved_run_trains_only_its_slice_and_keeps_character1(
    base: Path, delta1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = run(tmp_path / "plain", base, "character2", 4, 2, base_deltas=[str(delta1)], preserve="off")
    kept = run(
        tmp_path / "kept", base, "character2", 4, 2, base_deltas=[str(delta1)], preserve_weight=20.0
    )
    out = capsys.readouterr().out
    assert "preservation: off (preserve = off)" in out
    assert "preservation: weight 20.0, 2 protected inputs every 1 step(s)" in out  # auto: on
    assert "'a digit character1' (character1.safetensors)" in out

    # the same slice, disjoint from character1's
    assert plain.selection.fingerprint == kept.selection.fingerprint
    with safe_open(str(kept.final), framework="pt") as f2, safe_open(str(delta1), framework="pt") as f1:
        names = [k for k in f2.keys() if k.endswith(".ffid_index")]  # noqa: SIM118
        assert names
        for k in names:
            if k in f1.keys():  # noqa: SIM118
                both = set(f2.get_tensor(k).tolist()) & set(f1.get_tensor(k).tolist())
                assert not both, k
    # character2's own delta records character2, not character1
    assert recorded_prompts(kept.final) == ["a digit character2"]

    # with preservation, predictions for character1's prompt stay closer to base + character1
    plain_drift = drift(base, [delta1, plain.final], [delta1], "a digit character1")
    kept_drift = drift(base, [delta1, kept.final], [delta1], "a digit character1")
    assert kept_drift < 0.5 * plain_drift, (kept_drift, plain_drift)
    # ... and it still learns character2 (its loss falls like the plain run's)
    assert kept.losses[-1] < kept.losses[0]


def test_resume_with_preservation_is_bit_identical(base: Path, delta1: Path, tmp_path: Path) -> None:
    extra = {"base_deltas": [str(delta1)], "preserve_items": 3, "preserve_every": 2}
    whole = run(tmp_path / "whole", base, "character2", 4, 2, **extra)
    run(tmp_path / "part", base, "character2", 4, 2, save_every_n_steps=3, save_state=True, **extra)
    state = tmp_path / "part" / "character2-step00000003-state"
    assert state.is_dir()
    resumed = run(tmp_path / "part", base, "character2", 4, 2, resume=str(state), **extra)
    assert resumed.losses == whole.losses
    with safe_open(str(whole.final), framework="pt") as a, safe_open(str(resumed.final), framework="pt") as b:
        for k in a.keys():  # noqa: SIM118
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


def test_preserver_in_a_custom_loop(base: Path, delta1: Path) -> None:
    from ffid import attach
    from ffid.checkpoint import apply_delta

    model, spec = load_model(base)
    apply_delta(model, delta1)
    handle = attach(model, ff=0.05, ffid=2)
    task = DemoTask(spec=spec)
    preserver = Preserver(handle, task, protected_prompts([delta1]), PreserveSettings(items=4, every=2))
    g = torch.Generator().manual_seed(0)
    first = preserver.step(model, 0, g)
    assert first is not None and first.distance < 1e-10  # untrained slice: student == teacher
    assert preserver.step(model, 1, g) is None  # every 2nd step
    # step 2 is the 2nd preservation step: items 4..7 of the list, round robin
    assert [p.prompt for p in preserver.chosen(2)] == ["character1", "", "a digit character1", "character1"]
    opt = handle.guard(torch.optim.AdamW(handle.parameters(), lr=5e-2))
    for p in opt.param_groups[0]["params"]:
        p.data.add_(0.05 * torch.randn(p.shape, generator=g))  # move the slice away from the teacher
    kept = preserver.step(model, 2, g)
    assert kept is not None and kept.distance > 0
    kept.loss.backward()
    assert all(p.grad is not None for p in handle.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert set(kept.per_prompt) == {"a digit character1", "character1", "<empty>"}


def test_refusals(base: Path, delta1: Path, tmp_path: Path) -> None:
    from ffid import attach

    def refused(match: str, **extra: object) -> None:
        out = tmp_path / "refused"
        with pytest.raises(ConfigError, match=match):
            run(out, base, "character2", 4, 2, **extra)
        assert not out.exists()

    refused(
        "no protected prompt",
        preserve="on",
        preserve_empty=False,
        preserve_regularisation=False,
    )
    refused("preserve_weight = -1.0 must be a positive", base_deltas=[str(delta1)], preserve_weight=-1)
    refused("preserve_weight = nan must be a positive", base_deltas=[str(delta1)], preserve_weight="nan")

    # a delta that recorded no prompts (saved straight from a handle, as older ffid did)
    model, _ = load_model(base)
    handle = attach(model, ff=0.05, ffid=3)
    silent = tmp_path / "silent.safetensors"
    handle.save_delta(silent)
    handle.detach()
    assert recorded_prompts(silent) is None
    refused(
        r"base delta 'silent.safetensors' records no prompts .* preserve_prompts", base_deltas=[str(silent)]
    )
    # ... which giving the prompts fixes
    ok = run(tmp_path / "ok", base, "character2", 4, 2, base_deltas=[str(silent)],
             preserve_prompts=["a digit character3"], max_train_steps=1)
    assert ok.steps == 1


def test_cli_refusal_is_one_line_and_writes_nothing(
    base: Path, delta1: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli"
    args = [
        "train", "--model_type", "demo", "--model_path", str(base), "--ff", "0.05", "--ffid", "2",
        "--output_dir", str(out), "--task_args", "concepts=character2=4",
        "--base_deltas", str(delta1), "--preserve_weight", "nan",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "preserve_weight = nan" in err[0]
    assert not out.exists()


def test_protected_label_is_short() -> None:
    assert Protected("", "empty").label == "<empty>"
    assert len(Protected("x" * 100, "user").label) == 40
