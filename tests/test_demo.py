"""Tests of ``ffid demo``: its pieces (text conditioning, data, sampler, judge, task) and a
shortened end-to-end run (files written, same seed -> same numbers, bad flags -> exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ffid.cli import main
from ffid.demo.classifier import fit_judge
from ffid.demo.config import DemoConfig, quick_config
from ffid.demo.data import encode_prompt, load_digit_images, word_embedding
from ffid.demo.model import ModelSpec, build_model, flow_matching_loss, sample
from ffid.demo.pretrain import load_or_pretrain
from ffid.demo.run import run_demo, set_determinism
from ffid.demo.task import DemoTask, load_model, parse_concepts, save_model
from ffid.errors import ConfigError, ModelFileError

TINY = ModelSpec(dim=32, heads=2, layers=2, ffn_dim=64, freq_dim=16)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    return load_digit_images()


def test_text_conditioning_is_a_fixed_function_of_the_words() -> None:
    a = encode_prompt("a digit three")
    assert torch.equal(a, encode_prompt("A digit  three"))  # case and spacing do not matter
    assert a.shape == (4, 32)
    assert torch.equal(a[3], torch.zeros(32))  # padding slot, like Wan's zero-padded text
    assert torch.equal(a[2], word_embedding("three"))
    assert not torch.allclose(word_embedding("character1"), word_embedding("character2"))
    assert torch.equal(encode_prompt(""), torch.zeros(4, 32))
    with pytest.raises(ValueError, match="holds 4"):
        encode_prompt("one two three four five")


def test_digits_are_the_real_bundled_scans_upscaled(digits) -> None:
    images, labels = digits
    assert images.shape == (1797, 1, 1, 16, 16)
    assert images.min() == -1 and images.max() == 1
    assert sorted(labels.unique().tolist()) == list(range(10))


def test_judge_trained_on_real_digits_is_accurate(digits) -> None:
    judge = fit_judge(*digits, seed=0)
    assert judge.holdout_accuracy > 0.95
    # Noise is not a digit the judge is sure of: it does not call everything the same class.
    noise = torch.rand(20, 1, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert judge.predict(noise).shape == (20,)


def test_sampler_is_deterministic_per_seed_and_batch_independent() -> None:
    model = build_model(TINY, seed=3)
    a = sample(model, ["a digit one", "a digit two"], [5, 6], steps=3, spec=TINY)
    b = sample(model, ["a digit two"], [6], steps=3, spec=TINY)
    assert a.shape == (2, 1, 1, 16, 16)
    assert torch.allclose(a[1], b[0], atol=1e-5)  # an image depends on its own seed only
    c = sample(model, ["a digit one", "a digit two"], [5, 6], steps=3, spec=TINY)
    assert torch.equal(a, c)


def test_flow_matching_target_is_noise_minus_data() -> None:
    model = build_model(TINY, seed=0)
    x0 = torch.zeros(2, 1, 1, 16, 16)
    noise = torch.ones_like(x0)
    t = torch.tensor([0.3, 0.8])
    text = torch.stack([encode_prompt("a digit one")] * 2)
    loss = flow_matching_loss(model, x0, text, noise, t)
    # A model that predicted exactly noise - x0 would score 0; the untrained one does not.
    assert loss.item() > 0 and torch.isfinite(loss)


def test_parse_concepts_forms_and_errors() -> None:
    assert [(c.name, c.digit) for c in parse_concepts("character1=7, character2=4")] == [
        ("character1", 7),
        ("character2", 4),
    ]
    assert parse_concepts({"character1": 7})[0].prompt == "a digit character1"
    for bad in ("character1", "character1=12", {"two words": 3}, {}):
        with pytest.raises(ConfigError):
            parse_concepts(bad)


def test_model_file_round_trip_and_foreign_file(tmp_path: Path) -> None:
    model = build_model(TINY, seed=1)
    path = save_model(model, TINY, tmp_path / "m.safetensors")
    loaded, spec = load_model(path)
    assert spec == TINY
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True)
    )
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ModelFileError, match="not written by ffid demo"):
        load_model(tmp_path / "foreign.safetensors")


def test_demo_task_trains_through_the_trainer(tmp_path: Path, digits) -> None:
    """``ffid train --model_type demo`` path: the task is built from task_args and a saved base."""
    from ffid.train import config_from_mapping, get_task, train

    base = save_model(build_model(TINY, seed=0), TINY, tmp_path / "base.safetensors")
    task = get_task("demo")
    assert isinstance(task, DemoTask)
    cfg = config_from_mapping(
        {
            "model_type": "demo",
            "model_path": str(base),
            "ff": 0.05,
            "ffid": 1,
            "learning_rate": 1e-2,
            "max_train_steps": 3,
            "batch_size": 8,
            "output_dir": str(tmp_path / "out"),
            "output_name": "c1",
            "logging_dir": "none",
            "progress": False,
            "task_args": {"concepts": {"character1": 7}},
        }
    )
    result = train(cfg, task)
    assert len(task.dataset(cfg)) == int((digits[1] == 7).sum())
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert (tmp_path / "out" / "c1.safetensors").is_file()
    result.handle.detach()


def test_demo_task_needs_concepts(tmp_path: Path) -> None:
    from ffid.train import config_from_mapping

    with pytest.raises(ConfigError, match="concepts"):
        DemoTask().dataset(config_from_mapping({"model_type": "demo"}))
    with pytest.raises(ConfigError, match="model_path"):
        DemoTask().build_model(config_from_mapping({"model_type": "demo"}))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--ffid1", "2", "--ffid2", "2"], "two different ids"),
        (["--pair", "--ff", "1.5"], "out of range"),
        (["--character1", "4", "--character2", "4"], "two different digits"),
        (["--character1", "12"], "0..9"),
        (["--steps", "0"], "at least 1"),
    ],
)
def test_bad_flags_exit_2_and_write_nothing(tmp_path: Path, capsys, flags: list[str], message: str) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output_dir", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ffid demo: error:") and message in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def _numbers(report: dict) -> dict:
    return {k: report[k] for k in ("summary", "stages", "predictions", "model_params")} | {
        k: {c: info[k] for c, info in report["characters"].items()}
        for k in ("trainable", "fingerprint", "final_loss")
    }


@pytest.mark.slow  # the whole shortened demo, twice: ~50 s on 2 cores
def test_quick_demo_end_to_end_is_reproducible(tmp_path: Path) -> None:
    """A shortened demo writes every promised file; a second run with the same seed takes the base
    from the cache and repeats every number (pretraining's own determinism is tested below)."""
    cache = tmp_path / "cache"
    runs = [
        run_demo(quick_config(output_dir=str(tmp_path / name), cache_dir=str(cache), progress=False))
        for name in ("a", "b")
    ]
    out = runs[0].output_dir
    for rel in (
        "report.md",
        "report.json",
        "loss.png",
        "samples/base.png",
        "samples/character1.png",
        "samples/character2_plain.png",
        "samples/character2_rehearsed.png",
        "samples/character2_preserved.png",
        "samples/merged.png",
        "character1/character1.safetensors",
        "character2-plain/character2-plain.safetensors",
        "character2-rehearsed/character2-rehearsed.safetensors",
        "character2-preserved/character2-preserved.safetensors",
        "merged/demo-merged.safetensors",
    ):
        assert (out / rel).is_file(), rel
    assert any((out / "logs").rglob("events.out.tfevents.*"))
    assert list(cache.glob("base-*.safetensors")) and list(cache.glob("base-*-loss.png"))
    report = json.loads((out / "report.json").read_text())
    summary = report["summary"]
    assert summary["merged_equals_deltas"] is True
    assert list(report["stages"]) == [
        "base",
        "character1",
        "character2_plain",
        "character2_rehearsed",
        "character2_preserved",
        "merged",
    ]
    for value in summary.values():
        assert value is True or 0.0 <= value <= 1.0
    # The character2 variants ran from the same state into the same slice; only their data or
    # loss differs, so they select the same weights but learn different values.
    chars = report["characters"]
    fingerprints = {chars[f"character2_{v}"]["fingerprint"] for v in ("plain", "rehearsed", "preserved")}
    assert len(fingerprints) == 1
    assert chars["character2_plain"]["rehearsed"] == chars["character2_preserved"]["rehearsed"] == []
    assert chars["character2_rehearsed"]["rehearsed"] == ["character1"]
    assert [chars[f"character2_{v}"]["preserved"] for v in ("plain", "rehearsed", "preserved")] == [
        False,
        False,
        True,
    ]
    assert report["character2_merged"] == "preserved"
    assert chars["character2"] == chars["character2_preserved"]
    assert report["files"]["delta2"] == report["files"]["delta2_preserved"] != report["files"]["delta2_plain"]
    assert summary["character1_after_3b"] == summary["character1_after_3b_preserved"]
    assert summary["character2_after_3b"] == summary["character2_after_3b_preserved"]
    assert report["stages"]["merged"] == report["stages"]["character2_preserved"]
    from safetensors.torch import load_file

    deltas = [load_file(report["files"][f"delta2_{v}"]) for v in ("plain", "rehearsed", "preserved")]
    assert deltas[0].keys() == deltas[1].keys() == deltas[2].keys()
    for other in deltas[1:]:
        assert any(not torch.equal(deltas[0][k], other[k]) for k in deltas[0])
    assert report["characters"]["character1"]["trainable"] == round(0.01 * report["model_params"])
    md = (out / "report.md").read_text()
    assert "character1 accuracy after 3a" in md and "| 3b plain | 3b rehearsed | 3b preserved |" in md
    assert report["files"]["base_cached"] is False
    assert runs[1].report["files"]["base_cached"] is True
    assert _numbers(report) == _numbers(json.loads((runs[1].output_dir / "report.json").read_text()))


def test_pretraining_is_deterministic_and_fresh_redoes_it(tmp_path: Path, digits) -> None:
    from safetensors.torch import load_file

    cfg = quick_config(output_dir=str(tmp_path), pretrain_steps=3, progress=False)
    set_determinism(cfg.seed, cfg.threads)
    path, losses, cached = load_or_pretrain(cfg, digits, lambda _: None)
    assert not cached and len(losses) == 3
    first = load_file(str(path))
    path2, losses2, cached2 = load_or_pretrain(cfg, digits, lambda _: None)
    assert cached2 and path2 == path and losses2 == losses
    cfg.fresh = True
    path3, losses3, cached3 = load_or_pretrain(cfg, digits, lambda _: None)
    assert not cached3 and losses3 == losses
    again = load_file(str(path3))  # safetensors may order header keys differently: compare tensors
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
    # A different recipe is a different cache entry, never a stale hit.
    other, _, cached4 = load_or_pretrain(
        quick_config(output_dir=str(tmp_path), pretrain_steps=4, progress=False), digits, lambda _: None
    )
    assert not cached4 and other != path


def test_single_character2_mode_trains_and_merges_that_variant(tmp_path: Path) -> None:
    cfg = quick_config(
        output_dir=str(tmp_path / "p"),
        cache_dir=str(tmp_path / "cache"),
        character2_mode="plain",
        pretrain_steps=3,
        steps=2,
        samples=2,
        sample_steps=2,
        progress=False,
    )
    report = run_demo(cfg).report
    assert list(report["stages"]) == ["base", "character1", "character2_plain", "merged"]
    assert report["character2_variants"] == ["plain"] and report["character2_merged"] == "plain"
    assert report["files"]["delta2"] == report["files"]["delta2_plain"]
    assert "delta2_rehearsed" not in report["files"]
    assert report["summary"]["merged_equals_deltas"] is True
    assert not (tmp_path / "p" / "character2-rehearsed").exists()


def test_default_config_is_the_documented_story() -> None:
    cfg = DemoConfig().validate()
    assert cfg.character2_mode == "all"
    assert cfg.character2_variants == ["plain", "rehearsed", "preserved"]
    assert (cfg.ff, cfg.ffid1, cfg.ffid2, cfg.selector) == (0.01, 1, 2, "spread")
    assert cfg.output_dir == "ffid-demo"
    assert cfg.held_out == (7, 4)
    with pytest.raises(
        ConfigError, match="character2_mode 'mixed' is not one of all, plain, rehearsed, preserved"
    ):
        DemoConfig(character2_mode="mixed").validate()


def test_prior_scans_are_a_fixed_share_per_class(digits) -> None:
    from ffid.demo.data import Concept
    from ffid.demo.task import ConceptDataset

    images, labels = digits
    main_only = ConceptDataset([Concept("character1", 7)], images, labels)
    with_prior = ConceptDataset(
        [Concept("character1", 7)],
        images,
        labels,
        prior=[Concept("one", 1), Concept("two", 2)],
        prior_per_class=5,
    )
    assert len(with_prior) == len(main_only) + 10
    # Prior items keep their own prompts and are the first scans of their class.
    assert torch.equal(with_prior[len(main_only)]["text"], encode_prompt("a digit one"))
    assert torch.equal(with_prior[len(main_only)]["latents"], images[labels == 1][0])
