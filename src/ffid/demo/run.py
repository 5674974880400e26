"""``ffid demo`` end to end: pretrain a tiny Wan on real digits, teach two characters into two
disjoint ffid slices, merge, sample, judge, report.

Stages (everything under ``output_dir``):

1. ``base/``: the pretrained base (cached; reused while its recipe is unchanged, ``fresh`` redoes it).
2. ``character1/``: ``--ffid 1`` trained through :func:`ffid.train.train` on the held-out digit
   ``character1``; its delta file.
3. ``character2-plain/``, ``character2-rehearsed/`` and ``character2-preserved/``: ``--ffid 2``
   trained the same way on top of base + character1, three times from the same state: alone
   (plain), with character1's scans rehearsed in its data, and with preservation (no character1
   image: a second loss keeps the model's predictions for character1's recorded prompt, the
   empty prompt and the base prompts close to base + character1; the default and what we
   recommend); ``character2_mode`` can keep one of them only.
4. ``merged/``: character1's delta and the recommended character2 delta (preserved when it was
   trained) baked into a full checkpoint with :func:`ffid.checkpoint.merge_checkpoint`.
5. ``samples/*.png`` grids, ``report.md`` / ``report.json``, loss curves, TensorBoard ``logs/``.

The jobs live next door: :mod:`.config` (the knobs), :mod:`.pretrain` (the base),
:mod:`.characters` (the ffid runs), :mod:`.evaluate` (judging), :mod:`.plots` and :mod:`.report`.
This module only orders them and times them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .characters import model_with_deltas, train_character, train_character2
from .classifier import DigitJudge, fit_judge
from .config import DemoConfig
from .data import Concept, load_digit_images
from .evaluate import StageScores, evaluate, prompts_for
from .model import build_model, param_count
from .plots import plot_all_losses, write_grid
from .pretrain import load_or_pretrain
from .report import build_report, render_markdown, render_table, strict_report
from .task import load_model

Log = Callable[[Any], None]  # console.print: text or a rich renderable

# what the console says about each character2 variant as it starts
_HOW = {
    "plain": ", its own data only",
    "rehearsed": ", with character1's scans rehearsed",
    "preserved": ", its own data only, preserving base + character1 (no character1 scans)",
}


@dataclass
class DemoResult:
    """What :func:`run_demo` wrote: the output folder, the report (as in ``report.json``), the
    judged stages and the total seconds."""

    output_dir: Path
    report: dict[str, Any]
    stages: list[StageScores]
    seconds: float


@dataclass
class CharacterRun:
    """One ffid run of a character: its delta, loss curve, report entry and training seconds."""

    delta: Path
    losses: list[float]
    info: dict[str, Any]
    seconds: float


@dataclass
class Stage:
    """One judged stage: its scores, the strict judge's verdict per prompt
    (:meth:`ffid.demo.judge.Verdict.to_dict`) and the seconds sampling, judging and its grid took."""

    scores: StageScores
    seconds: float
    strict: dict[str, Any]


@dataclass
class Variant:
    """A character2 variant: its ffid run, its judged stage, and base + both deltas in memory."""

    run: CharacterRun
    stage: Stage
    model: torch.nn.Module


@dataclass(frozen=True)
class Judging:
    """Everything judging a stage needs besides the model (the same at every stage)."""

    cfg: DemoConfig
    judge: DigitJudge
    concepts: list[Concept]
    sample_dir: Path
    log: Log

    def stage(self, name: str, title: str, model: torch.nn.Module) -> Stage:
        """Sample and judge ``model``, write ``samples/{name}.png`` and log the scores."""
        from .judge import judge_stage

        t0 = time.perf_counter()
        scores, images = evaluate(name, model, self.cfg, self.judge, self.concepts)
        strict = {
            k: v.to_dict()
            for k, v in judge_stage(self.judge, images, self.concepts, seed=self.cfg.seed).items()
        }
        write_grid(images, self.concepts, self.sample_dir / f"{name}.png", title)
        seconds = time.perf_counter() - t0
        self.log(f"{name}: " + ", ".join(f"{k} {v:.0%}" for k, v in scores.accuracy.items()))
        return Stage(scores, seconds, strict)


def set_determinism(seed: int, threads: int) -> None:
    """Same seed, same numbers: fixed thread count (float sums depend on it), deterministic kernels."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(seed)


def run_demo(cfg: DemoConfig, console: Any = None) -> DemoResult:
    """Run the whole demo (see module docstring); returns the report it wrote."""
    cfg.validate()
    log: Log = (console or _console()).print
    t_start = time.perf_counter()
    set_determinism(cfg.seed, cfg.threads)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_digit_images(cfg.spec.image_size)
    total = _announce(cfg, out, log)

    t0 = time.perf_counter()
    judge = fit_judge(*data, seed=cfg.seed, calibrate=True)
    judge_s = time.perf_counter() - t0
    log(
        f"judge: RBF SVM on real digits, {judge.holdout_accuracy:.1%} accuracy on held-out real scans "
        f"({judge.holdout_confident:.1%} confident: calibrated p >= {judge.confident_at})"
    )
    t0 = time.perf_counter()
    base_path, base_losses, cached = load_or_pretrain(cfg, data, log)
    pretrain_s = time.perf_counter() - t0
    judging = Judging(cfg, judge, prompts_for(cfg), out / "samples", log)
    base = judging.stage("base", "pretrained base", model_with_deltas(base_path, []))

    log(f"[bold]3a[/] teaching character1 (digit {cfg.character1}) into --ffid {cfg.ffid1}")
    # Under projection character1 is projected too: off the base classes' and the empty prompt's
    # inputs (the loss method leaves character1 unpreserved, as the seed's recipe does).
    first_preserved = cfg.preserve_method == "projection"
    run1 = _timed(
        train_character,
        cfg,
        "character1",
        cfg.character1,
        cfg.ffid1,
        base_path,
        [],
        data,
        None,
        None,
        first_preserved,
    )
    stage1 = judging.stage(
        "character1", f"base + character1 (ffid {cfg.ffid1})", model_with_deltas(base_path, [run1.delta])
    )

    # 3b, once per variant, each from the same base + character1 state: the trainer starts from
    # the base file plus delta1 every time, so the variants differ only by their data or loss.
    variants = {v: _character2(cfg, v, base_path, run1.delta, data, judging) for v in cfg.character2_variants}
    merged_variant = cfg.character2_variants[-1]

    t0 = time.perf_counter()
    merged_path, merged = _merge(out, base_path, [run1.delta, variants[merged_variant].run.delta])
    merge_s = time.perf_counter() - t0
    merged_same = _same_weights(merged, variants[merged_variant].model)
    merged_stage = judging.stage(
        "merged", f"merged checkpoint (base + character1 + character2 {merged_variant})", merged.eval()
    )

    plot_all_losses(
        {
            "pretraining (base)": base_losses,
            "character1 (ffid)": run1.losses,
            **{f"character2 {v} (ffid)": var.run.losses for v, var in variants.items()},
        },
        out / "loss.png",
    )
    # key order is the order the stages ran in; report.md lists the timings in it
    timings = {
        "judge": judge_s,
        "pretrain": pretrain_s,
        "sample_base": base.seconds,
        "character1": run1.seconds,
        "sample_character1": stage1.seconds,
    }
    for v, var in variants.items():
        timings[f"character2_{v}"] = var.run.seconds
        timings[f"sample_character2_{v}"] = var.stage.seconds
    timings["merge"] = merge_s
    timings["sample_merged"] = merged_stage.seconds
    stages = [
        base.scores,
        stage1.scores,
        *(var.stage.scores for var in variants.values()),
        merged_stage.scores,
    ]
    report = build_report(
        cfg,
        stages,
        run1.info,
        {v: var.run.info for v, var in variants.items()},
        judge,
        total,
        merged_same,
        cached,
        timings,
        base_path,
        merged_path,
    )
    strict = {"base": base.strict, "character1": stage1.strict}
    strict |= {f"character2_{v}": var.stage.strict for v, var in variants.items()}
    strict["merged"] = merged_stage.strict
    report["strict"] = strict_report(strict, cfg.seed, judge, list(variants))
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    _write_report(report, out, log)
    return DemoResult(out, report, stages, report["seconds"])


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False)


def _announce(cfg: DemoConfig, out: Path, log: Log) -> int:
    """Log what the demo is about to do; returns the model's parameter count."""
    from ..train.monitor import format_bytes, peak_memory

    probe = build_model(cfg.spec, seed=cfg.seed)
    total = param_count(probe)
    weight_bytes = sum(p.numel() * p.element_size() for p in probe.parameters())
    recipe = cfg.run_recipe(preserve=False)
    trainable = round(recipe["ff"] * total)
    how = ""
    if cfg.preserve_method == "projection":
        how = f" (projection's recipe: whole rows of the blocks' Linears, lr {recipe['learning_rate']:g})"
    log(
        f"[bold]ffid demo[/]: tiny Wan DiT (diffusers WanTransformer3DModel, {cfg.spec.layers} blocks, "
        f"dim {cfg.spec.dim}) on scikit-learn's real handwritten digits, {cfg.spec.image_size}x"
        f"{cfg.spec.image_size} as 1-frame videos\n"
        f"  model params {total:,} ({format_bytes(weight_bytes)}); each character trains "
        f"--ff {recipe['ff']} = ~{trainable:,} weights ({recipe['ff']:.2%}) with selector "
        f"{recipe['selector']}{how}, "
        f"ids {cfg.ffid1} and {cfg.ffid2}\n"
        f"  character1 = digit {cfg.character1}, character2 = digit {cfg.character2} (both held out of "
        f"pretraining); seed {cfg.seed}, {cfg.threads} threads; {peak_memory(torch.device('cpu'))}\n"
        f"  output: {out.resolve()}"
    )
    return total


def _timed(teach: Any, *args: Any) -> CharacterRun:
    """``teach(*args)`` (:func:`train_character` or :func:`train_character2`), timed."""
    t0 = time.perf_counter()
    delta, losses, info = teach(*args)
    return CharacterRun(delta, losses, info, time.perf_counter() - t0)


def _character2(
    cfg: DemoConfig, variant: str, base_path: Path, delta1: Path, data: Any, judging: Judging
) -> Variant:
    """Teach character2 on top of base + character1 the ``variant`` way, then judge it."""
    judging.log(
        f"[bold]3b {variant}[/] teaching character2 (digit {cfg.character2}) into --ffid {cfg.ffid2} "
        "on top of character1" + _HOW[variant]
    )
    run = _timed(train_character2, cfg, variant, base_path, delta1, data)
    model = model_with_deltas(base_path, [delta1, run.delta])
    stage = judging.stage(
        f"character2_{variant}",
        f"base + character1 + character2 {variant} (ffids {cfg.ffid1}, {cfg.ffid2})",
        model,
    )
    return Variant(run, stage, model)


def _merge(out: Path, base_path: Path, deltas: list[Path]) -> tuple[Path, torch.nn.Module]:
    """Bake ``deltas`` into a full checkpoint under ``merged/``; returns its path and its model."""
    from ..checkpoint import merge_checkpoint

    merged_path = out / "merged" / "demo-merged.safetensors"
    merged_path.parent.mkdir(parents=True, exist_ok=True)
    if merged_path.exists():
        merged_path.unlink()  # the merge tool refuses to overwrite; this run owns the file
    merge_checkpoint(base_path, deltas, merged_path)
    merged, _ = load_model(merged_path)
    return merged_path, merged


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def _write_report(report: dict[str, Any], out: Path, log: Log) -> None:
    """``report.json`` and ``report.md`` (with the run's peak memory), and the table on the console."""
    from ..train.io import atomic_write_bytes
    from ..train.monitor import peak_memory

    report["peak_memory"] = peak_memory(torch.device("cpu"))
    atomic_write_bytes(out / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    atomic_write_bytes(out / "report.md", render_markdown(report).encode())
    log(render_table(report))
    log(
        f"wrote {out / 'report.md'}, {out / 'report.json'}, {out / 'samples'}/*.png, {out / 'loss.png'}, "
        f"TensorBoard logs in {out / 'logs'}; total {report['seconds']:.0f} s"
    )
