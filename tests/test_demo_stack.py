"""``ffid demo --characters ...``: N characters stacked (sequential with a plain contrast, or
parallel then merged), judged strictly; bad ``--characters`` refused before anything is written;
and the demo's first line of output is its own, not a library's."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ffid.cli import main
from ffid.demo.config import quick_config
from ffid.demo.stack_report import render_stack_markdown

pytest.importorskip("sklearn")
pytest.importorskip("diffusers")

TINY_RUN = {"pretrain_steps": 3, "steps": 2, "character_samples": 4, "samples": 2, "sample_steps": 2}


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--characters", "7", "4", "7"], "--characters gives digit 7 twice"),
        (["--characters", "7", "x"], "--characters 'x' is not a digit 0..9"),
        (["--characters", "7", "12"], "--characters '12' is not a digit 0..9"),
        # compat-v2 has 8 pools, ids 0..7: 8 characters need id 8
        (
            ["--preserve_method", "loss", "--selector", "compat-v2", "--characters", *"01235689"],
            "more than the selection layout holds",
        ),
        # spread's 16 slots give each id 1/16 of every tensor: --ff 0.07 fits in no id
        (
            ["--preserve_method", "loss", "--ff", "0.07", "--characters", "7", "4"],
            "not even id 1 holds --ff 0.07",
        ),
        (["--characters", "7", "2", "--held_out", "7", "4"], "digit 2 is a base class"),
        (
            ["--characters", "7", "4", "--character1", "3"],
            "--characters is for stacked characters, but --character1 asks for the two-character demo",
        ),
        (["--pair", "--stacking", "parallel"], "--stacking is for stacked characters, but --pair asks"),
        (["--characters", *"012345678"], "at most 8"),
        # the stacked demo trains projection's recipe: the loss method's knobs would do nothing
        (["--ff", "0.005"], "--ff sets the loss method's recipe"),
        (["--learning_rate", "0.01"], "--learning_rate sets the loss method's recipe"),
    ],
)
def test_bad_characters_exit_2_with_one_line_and_write_nothing(tmp_path: Path, capsys, flags, says) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--no_progress", "--output_dir", str(out), *flags]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("ffid demo: error:") and says in err, err
    assert len(err.splitlines()) == 1
    assert any(w in err for w in ("add", "give", "pick", "lower", "drop"))  # the fix, not only the fault
    assert captured.out == ""
    assert not out.exists()


def test_ids_beyond_the_layout_are_refused_by_the_config() -> None:
    from ffid.errors import ConfigError

    # projection's rows layout has 10 slots: ids 0..9, so 9 characters at most (and 8 by held-out)
    cfg = quick_config(characters=(7, 4, 1), preserve_method="projection")
    assert cfg.validate().held_out == (7, 4, 1)
    with pytest.raises(ConfigError, match="stacking 'both' is not one of sequential, parallel"):
        quick_config(characters=(7, 4), stacking="both").validate()
    from ffid.cli.demo import STACKINGS as CLI_STACKINGS
    from ffid.demo.config import STACKINGS

    assert CLI_STACKINGS == STACKINGS  # the CLI spells them without importing the demo


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    from ffid.demo.stacking import run_stack

    tmp = tmp_path_factory.mktemp("stack")
    cfg = quick_config(
        output_dir=str(tmp / "seq"), cache_dir=str(tmp / "cache"), characters=(7, 4), progress=False
    )
    for k, v in TINY_RUN.items():
        setattr(cfg, k, v)
    return run_stack(cfg), tmp


def test_sequential_stack_reports_every_stage_strictly(sequential) -> None:
    result, _ = sequential
    out, report = result.output_dir, result.report
    assert report["kind"] == "stack" and report["stacking"] == "sequential"
    assert list(report["sequences"]) == ["preserved", "plain"]
    assert [c["digit"] for c in report["characters"]] == [7, 4]
    assert report["base_classes"] == ["zero", "one", "two", "three", "five", "six", "eight", "nine"]
    for method, seq in report["sequences"].items():
        assert [s["name"] for s in seq["stages"]] == ["character1", "character2"]
        assert seq["stages"][0]["taught"] == [1] and seq["stages"][1]["taught"] == [1, 2]
        # a character is judged from its own stage on, the base classes at every stage
        assert set(seq["stages"][0]["scores"]) == {"character1", *report["base_classes"]}
        for stage in seq["stages"]:
            for name, score in stage["scores"].items():
                n = 4 if name.startswith("character") else 2
                for measure in ("confident", "argmax"):
                    e = score[measure]
                    assert e["n"] == n and 0 <= e["low"] <= e["value"] <= e["high"] <= 1, (method, name)
        # character2 is preserved (it has an earlier character), character1 not (as the two-character demo)
        assert [r["preserved"] for r in seq["runs"]] == (
            [False, True] if method == "preserved" else [False, False]
        )
        assert (out / method / "character2" / "character2.safetensors").is_file()
    # the same character1 run both ways: same data, same seed, no preservation
    pres, plain = (report["sequences"][m]["stages"][0]["scores"] for m in ("preserved", "plain"))
    assert pres == plain
    # ... so the plain sequence reuses it instead of training it again
    assert report["sequences"]["plain"]["stages"][0]["reused"] == "preserved"
    assert report["sequences"]["plain"]["runs"][0] == report["sequences"]["preserved"]["runs"][0]
    assert not (out / "plain" / "character1").exists()
    merged = report["merged"]
    assert (
        merged["method"] == "preserved" and merged["same_as_deltas"] is True and merged["resampled"] is False
    )
    assert merged["scores"] == report["sequences"]["preserved"]["stages"][-1]["scores"]
    assert Path(merged["path"]).is_file()
    summary = report["summary"]
    assert set(summary["preserved"]["retention"]) == {"character1"} == set(summary["plain"]["retention"])
    whats = [d["what"] for d in report["differences"]]
    assert "character2 after its own run: preserved minus plain" in whats
    assert "character1 after all: preserved minus plain" in whats
    assert "preserved: base classes merged file minus before" in whats
    for d in report["differences"]:
        e = d["difference"]
        assert e["low"] <= e["value"] <= e["high"] and d["beyond_noise"] == (not e["low"] <= 0 <= e["high"])
    for rel in (
        "report.md",
        "report.json",
        "loss.png",
        "samples/base.png",
        "samples/preserved-character2.png",
    ):
        assert (out / rel).is_file(), rel


def test_report_md_is_rebuilt_from_report_json_alone(sequential) -> None:
    result, _ = sequential
    saved = json.loads((result.output_dir / "report.json").read_text())
    md = render_stack_markdown(saved)
    assert md == (result.output_dir / "report.md").read_text()
    for text in (
        "## sequential, preserved",
        "## sequential, plain (no preservation)",
        "| prompt | before | after character1 | after character2 | merged file |",
        "| character1 (digit 7, id 1) |",
        "**base classes (8, pooled)**",
        "## Differences and their noise",
        "Share of each character's confident gain kept (merged file): character1",
    ):
        assert text in md, text


def test_parallel_stack_merges_and_judges_the_merged_file(sequential) -> None:
    from ffid.demo.stacking import run_stack

    _, tmp = sequential
    cfg = quick_config(
        output_dir=str(tmp / "par"),
        cache_dir=str(tmp / "cache"),
        characters=(7, 4),
        stacking="parallel",
        progress=False,
    )
    for k, v in TINY_RUN.items():
        setattr(cfg, k, v)
    report = run_stack(cfg).report
    assert report["files"]["base_cached"] is True  # the sequential run's base: same held-out digits
    (seq,) = report["sequences"].values()
    assert list(report["sequences"]) == ["parallel"]
    # each character alone on the base: only its own prompt is judged before the merge
    assert [s["taught"] for s in seq["stages"]] == [[1], [2]]
    assert [s["label"] for s in seq["stages"]] == ["character1 alone", "character2 alone"]
    assert [r["preserved"] for r in seq["runs"]] == [False, False]
    merged = report["merged"]
    assert merged["method"] == "parallel" and merged["resampled"] is True and merged["same_as_deltas"] is True
    assert set(merged["scores"]) >= {"character1", "character2"}
    # both characters' retention into the merged file
    assert set(report["summary"]["parallel"]["retention"]) == {"character1", "character2"}
    md = (tmp / "par" / "report.md").read_text()
    assert "| prompt | before | after character1 alone | after character2 alone | merged file |" in md


def test_the_kernels_warning_is_dropped_and_nothing_else() -> None:
    import ffid.demo  # noqa: F401  (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    try:
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "x")
        logger.warning("something else went wrong")
    finally:
        logger.removeHandler(handler)
    assert seen == ["something else went wrong"]


@pytest.mark.parametrize("flags", [["--quick"], ["--quick", "--characters", "7", "4"]])
def test_the_first_line_of_ffid_demo_is_ffids(tmp_path: Path, flags: list[str]) -> None:
    """A fresh interpreter, as a newcomer runs it: the first line (stdout and stderr together) is
    the demo's, not a library's warning. The run is stopped after that line."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    argv = [
        sys.executable,
        "-m",
        "ffid",
        "demo",
        *flags,
        "--no_progress",
        "--output_dir",
        str(tmp_path / "o"),
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        first = proc.stdout.readline()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert first.startswith("ffid demo:"), first


def test_two_character_report_has_the_strict_judge(tmp_path: Path) -> None:
    from ffid.demo.report import render_markdown
    from ffid.demo.run import run_demo

    cfg = quick_config(
        output_dir=str(tmp_path / "two"),
        cache_dir=str(tmp_path / "cache"),
        character2_mode="all",
        progress=False,
    )
    for k, v in TINY_RUN.items():
        setattr(cfg, k, v)
    report = run_demo(cfg).report
    strict = report["strict"]
    assert list(strict["stages"]) == list(report["stages"])  # every stage, merged included
    for stage, scores in strict["stages"].items():
        # the argmax share is the demo's historical score, now with an interval
        for name, score in scores.items():
            assert score["argmax"]["value"] == pytest.approx(report["stages"][stage][name], abs=1e-4)
            assert score["argmax"]["n"] == 2 and score["confident"]["low"] <= score["confident"]["value"]
    assert set(strict["retention_character1"]) == {"plain", "rehearsed", "preserved"}
    whats = [d["what"] for d in strict["differences"]]
    assert "character2 after 3b: preserved minus plain" in whats
    assert "base classes after 3b preserved minus before" in whats
    md = (tmp_path / "two" / "report.md").read_text()
    assert "## Strict judge" in md and "Share of character1's confident gain kept after 3b" in md
    assert md == render_markdown(json.loads((tmp_path / "two" / "report.json").read_text()))


def test_the_default_demo_is_three_characters_stacked_by_projection() -> None:
    """``ffid demo`` alone: characters 7 4 1 in the 128-wide model, projection, the plain
    contrast, on the shipped base's recipe (1 4 7 9 held out); ``--pair`` and the two-character
    flags give the two-character demo with DemoConfig's own defaults."""
    from ffid.cli import build_parser
    from ffid.cli.demo import config_from_args
    from ffid.demo.config import DemoConfig
    from ffid.demo.shipped import find_shipped

    def cfg(*flags: str) -> DemoConfig:
        return config_from_args(build_parser().parse_args(["demo", *flags]))

    c = cfg()
    assert c.characters == (7, 4, 1) and c.preserve_method == "projection" and c.plain_contrast
    assert c.spec.dim == 128 and c.held_out == (1, 4, 7, 9) and c.stacking == "sequential"
    assert find_shipped(c.base_recipe()) is not None  # no pretraining on a fresh install
    assert cfg("--characters", "7", "4", "1", "9").held_out == (1, 4, 7, 9)
    assert cfg("--characters", "2", "5").held_out == (2, 5)  # outside the shipped base's digits
    assert cfg("--width", "64").spec.dim == 64
    assert cfg("--preserve_method", "loss", "--ff", "0.02").run_recipe(False)["ff"] == 0.02
    for pair in (cfg("--pair"), cfg("--character2_mode", "preserved")):
        assert pair.characters == () and pair.spec == DemoConfig().spec and pair.preserve_method == "loss"
    quick = cfg("--quick")
    assert quick.characters == (7, 4, 1) and quick.spec.dim == 32


def test_projection_rate_follows_the_budget_the_rule_measured() -> None:
    """DemoConfig's projection rate: the rule's choice at the measured budgets (3e-3 at ff 0.05,
    1e-2 at ff 0.01), the power law through them between, the grid's range outside; a rate the
    user gives wins."""
    from ffid.demo.config import DemoConfig, projection_rate

    def rate(**kw: object) -> float:
        return DemoConfig(preserve_method="projection", **kw).preserved_recipe()["learning_rate"]  # type: ignore[arg-type]

    assert rate() == 3e-3 and rate(projection_ff=0.01) == 1e-2
    assert rate(projection_ff=0.01, projection_lr=5e-4) == 5e-4
    assert 3e-3 < projection_rate(0.02) < 1e-2
    assert projection_rate(1e-4) == 3e-2 and projection_rate(0.5) == 1e-3
