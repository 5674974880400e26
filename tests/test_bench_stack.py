"""CI smoke of ``bench/stack.py --quick``: two characters stacked by ffid plain and LoRA, judged by
the strict judge; the report has every stage, interval, retention and target line.

Whether targets are met is the benchmark's own report; here only that the harness works end to
end on a tiny model with a couple of steps, and that bad input is refused before anything runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"

pytest.importorskip("peft")
pytest.importorskip("sklearn")
pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def stack(bench_script):
    return bench_script("stack")  # by its own name, as bench/interference.py --stack imports it


@pytest.fixture(scope="module")
def quick_run(stack, tmp_path_factory):
    out = tmp_path_factory.mktemp("stack")
    argv = ["--quick", "--characters", "7", "4", "--methods", "plain", "lora", "--steps", "2"]
    argv += ["--out", str(out), "--cache", str(out / "cache"), "--resamples", "200"]
    assert stack.main(argv) == 0
    return out, json.loads((out / "stack-quick.json").read_text())


def _estimate_ok(e: dict) -> bool:
    return e["low"] <= e["value"] <= e["high"] and e["low"] >= 0.0 and e["high"] <= 1.0


def test_quick_run_reports_every_stage_with_intervals(quick_run) -> None:
    _, data = quick_run
    assert list(data["methods"]) == ["plain", "lora"]
    (run,) = data["seeds"]
    assert run["config"]["characters"] == [7, 4] and sorted(run["config"]["held_out"]) == [4, 7]
    bases = {"zero", "one", "two", "three", "five", "six", "eight", "nine"}
    assert set(run["before"]) == {"character1", "character2"} | bases
    for method in ("plain", "lora"):
        stages = run["methods"][method]["stages"]
        assert [s["name"] for s in stages] == ["character1", "character2"]
        # a character is judged from its own stage on; the base classes at every stage
        assert set(stages[0]["scores"]) == {"character1"} | bases
        assert set(stages[1]["scores"]) == {"character1", "character2"} | bases
        for stage in stages:
            for name, score in stage["scores"].items():
                assert score["confident"]["n"] == 4 == len(score["hits"]["confident"]), (method, name)
                assert _estimate_ok(score["confident"]) and _estimate_ok(score["argmax"]), (method, name)
                assert 0.0 <= score["mean_p"] <= 1.0, (method, name)
        s = run["methods"][method]["summary"]
        assert set(s["retention"]) == {"character1"}  # the last character has no later stage
        for key in ("mean_confident_own", "mean_confident_after_all", "base_confident_after_all"):
            assert _estimate_ok(s[key]), (method, key)
    plain = run["methods"]["plain"]
    assert plain["recipe"]["selector"] == "spread"
    assert all(s["run"]["trainable"] == run["ffid_trainable"] for s in plain["stages"])
    targets = [c["target"] for c in plain["checks"]]
    assert len(targets) == 3
    assert targets[0].startswith("character1 keeps") and "base classes" in targets[1] and "LoRA" in targets[2]
    assert "mean_confident_minus_lora" in plain["summary"]
    own = plain["summary"]["mean_confident_own_minus_lora"]  # learning against LoRA's, same judge
    assert own["low"] <= own["value"] <= own["high"]
    assert "checks" not in run["methods"]["lora"]  # the reference is not checked against itself


def test_report_is_rebuilt_from_the_json_alone(stack, quick_run) -> None:
    out, data = quick_run
    from stack_report import render, summarize

    record = json.loads(json.dumps(data["seeds"][0]))
    for run in record["methods"].values():
        run.pop("summary"), run.pop("checks", None)
    again = summarize(record, list(data["methods"]))
    assert again["methods"]["plain"]["summary"] == data["seeds"][0]["methods"]["plain"]["summary"]
    md = render(data, 1.0)
    saved = (out / "stack-quick.md").read_text()
    assert md.split("\n", 3)[3] == saved.split("\n", 3)[3]  # all but the command line's timing
    for text in (
        "### ffid plain",
        "### LoRA sequential",
        "| prompt | before | after character1 | after character2 |",
        "| character1 (digit 7) |",
        "base classes (8, pooled)",
        "mean confident, after all",
    ):
        assert text in md, text
    assert md.count("- PASS") + md.count("- MISS") == 3


def test_stack_config_holds_out_every_character(stack, tmp_path) -> None:
    from ffid.demo.task import base_concepts

    args = stack.parse_args(["--quick", "--characters", "7", "4", "1", "--cache", str(tmp_path)])
    cfg = stack.stack_config(args, 0, tmp_path)
    assert cfg.held_out == (7, 4, 1)
    assert cfg.base_recipe()["held_out"] == [1, 4, 7]  # its own cached base
    assert {c.digit for c in base_concepts(cfg.held_out)} == {0, 2, 3, 5, 6, 8, 9}
    args = stack.parse_args(["--quick", "--characters", "3", "--width", "128", "--cache", str(tmp_path)])
    one = stack.stack_config(args, 0, tmp_path)
    assert one.held_out == (3,) and one.spec.dim == 128 and one.spec.heads == 8 and one.spec.ffn_dim == 256


def test_projection_needs_the_preserve_method_field(stack, tmp_path) -> None:
    cfg = stack.stack_config(stack.parse_args(["--quick", "--cache", str(tmp_path)]), 0, tmp_path)
    pcfg, note = stack.projection_config(cfg)
    if "preserve_method" in {f.name for f in fields(cfg)}:
        assert note is None and pcfg is not None and pcfg.preserve_method == "projection"
        assert pcfg.held_out == cfg.held_out  # still the stacking config
    else:
        assert pcfg is None and "preserve_method" in note
    # with the field (as main's DemoConfig gains it), the method is set and the rest kept

    @dataclass
    class WithField(stack.StackConfig):
        preserve_method: str = "loss"

    values = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    pcfg, note = stack.projection_config(WithField(**values))
    assert note is None and pcfg.preserve_method == "projection"
    assert pcfg.held_out == cfg.held_out and pcfg.output_dir == cfg.output_dir


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--characters", "7", "7"], "twice"),
        (["--characters", "7", "12"], "not a digit"),
        (["--characters", "7", "x"], "invalid int"),
        (["--characters", *"012345678"], "at most 8"),
        (["--methods", "plain", "plain"], "twice"),
        (["--samples", "0"], "at least 1"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(stack, tmp_path, capsys, argv, says) -> None:
    with pytest.raises(SystemExit) as exc:
        stack.main([*argv, "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_interference_stack_delegates(stack, monkeypatch, tmp_path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_interference_stack", BENCH / "interference.py")
    interference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(interference)
    seen = []
    monkeypatch.setattr(stack, "main", lambda argv: seen.append(argv) or 0)
    argv = ["--stack", "3", "--seeds", "0", "1", "--quick", "--out", str(tmp_path), "--cache", str(tmp_path)]
    assert interference.main(argv) == 0
    (got,) = seen
    assert got[got.index("--characters") + 1 : got.index("--seeds")] == ["7", "4", "1"]
    assert got[got.index("--seeds") + 1 : got.index("--cache")] == ["0", "1"]
    assert "--quick" in got and got[got.index("--out") + 1] == str(tmp_path)
    with pytest.raises(SystemExit) as exc:
        interference.main(["--stack", "9"])
    assert exc.value.code == 2


def test_seconds_per_step_and_the_ratio_to_lora(stack, quick_run) -> None:
    """Each method's training seconds per step come from its own stages (2 characters x 2
    steps here), and the summary shows them beside LoRA's, measured in the same process."""
    _, data = quick_run
    from stack_report import render, train_seconds_per_step

    record = data["seeds"][0]
    plain, lora = (record["methods"][m] for m in ("plain", "lora"))
    expected = sum(s["train_s"] for s in plain["stages"]) / (2 * 2)
    assert train_seconds_per_step(record, plain) == pytest.approx(expected)
    assert train_seconds_per_step(record, {}) is None
    md = render(data, 1.0)
    assert "| train s per step |" in md
    assert "- ffid plain minus LoRA sequential: after own runs " in md
    lora_s = train_seconds_per_step(record, lora)
    if lora_s:  # stage times are stored to 0.1 s: a quick run's LoRA stages may round to 0
        assert f"{expected:.3f} ({expected / lora_s:.2f}x LoRA)" in md
    else:
        assert f"| {expected:.3f} |" in md


def test_the_grid_rule_picks_the_best_lower_end_on_development_runs_only(stack) -> None:
    """bench/stack_grid.py: the highest lower end of the mean after all, per width and budget,
    on the first seed and digit set; ties to the lower rate, then the higher energy; other seeds
    never choose."""
    from stack_grid import Setting, choose

    def one(seed: int, lr: float, energy: float, low: float, ff: float = 0.01) -> Setting:
        est = {"value": low + 0.02, "low": low, "high": low + 0.04, "n": 64}
        return Setting("f", 128, seed, (7, 4), ff, lr, energy, est, est, None, None)

    dev = [one(0, 3e-3, 0.99, 0.82), one(0, 1e-2, 0.99, 0.93), one(0, 3e-2, 0.99, 0.93)]
    dev += [one(0, 1e-2, 0.999, 0.93), one(0, 3e-3, 0.99, 1.0, ff=0.05)]
    later = one(1, 3e-1, 0.99, 0.99)  # best of all, but a validation run: it cannot be chosen
    chosen, validation = choose([*dev, later])
    assert validation == [later]
    assert chosen[(128, 0.01)] is dev[3]  # 0.93 three times: lower rate (1e-2), then higher energy
    assert chosen[(128, 0.05)] is dev[4]
