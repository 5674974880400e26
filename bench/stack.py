#!/usr/bin/env python
"""Stacking: N characters taught one after another into one demo model, method by method.

The ``ffid demo`` setting (tiny Wan DiT, scikit-learn's real digits), with N digits held out of
pretraining instead of two: character i is digit ``--characters[i-1]``, the base classes are the
other digits. Every method starts from the same pretrained base (one per seed, cached by recipe
hash) and teaches character1, then character2 on top, ... up to characterN:

- ``plain``: ffid, character i into ``--ffid i`` on top of the earlier deltas, no preservation;
- ``projection``: the same with preservation by projection (``DemoConfig.preserve_method =
  "projection"``, which also picks that method's recipe); skipped, with a note, where this
  checkout's ``DemoConfig`` has no ``preserve_method``;
- ``preserved``: the same with the preservation loss (the demo's preserved character2 recipe);
- ``parallel``: ffid, each character from the base alone in its own id, then all merged;
- ``lora``: PEFT LoRA rank-matched to ffid's trainable count (spread, the demo's ff), merged
  after each character, a new LoRA on top for the next;
- ``full``: full finetuning, one character after another.

After every stage the characters taught so far and the base classes are sampled (the demo's
sampler, the same seeds at every stage) and judged by the strict judge
(:mod:`ffid.demo.judge`): argmax and confident accuracy with bootstrap 95% intervals, and each
earlier character's retention of its confident gain. The report (bench/stack_report.py) has a
retention matrix per method and checks the targets of issue 20.

    python bench/stack.py                                            # characters 7 4 1 9, seed 0
    python bench/stack.py --characters 7 4 1 --seeds 0 1 2
    python bench/stack.py --methods plain projection lora --samples 256 --width 128
    python bench/stack.py --quick --characters 7 4 --methods plain lora   # CI smoke (numbers mean nothing)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from interference_methods import FULL_LR, LORA_LR, demo_config, lora_rank, train_dense  # noqa: E402
from stack_report import render, summarize  # noqa: E402

from ffid.demo.config import DemoConfig  # noqa: E402

# Digits in the order characters are added: ``--stack N`` of bench/interference.py takes the first
# N. 7 and 4 first, as in the demo; at most 8, so at least two base classes remain.
ORDER = (7, 4, 1, 9, 2, 5, 3, 8)
DEFAULT_CHARACTERS = ORDER[:4]
METHODS = {
    "plain": "ffid plain",
    "projection": "ffid projection",
    "preserved": "ffid preserved (loss)",
    "parallel": "ffid parallel + merge",
    "lora": "LoRA sequential",
    "full": "full FT sequential",
}
DEFAULT_METHODS = ("plain", "projection", "lora", "full")
SAMPLES = 128  # per prompt and stage: a 95% interval of about +-8 points at 50%, +-5 at 90%
Log = Callable[[str], None]


@dataclass
class StackConfig(DemoConfig):
    """The demo's config with N characters (``DemoConfig.characters``) held out of pretraining
    instead of two, ``DEFAULT_CHARACTERS`` unless given.

    Everything that reads ``held_out`` (the base's pretraining classes and its cache key, the
    base classes mixed into each character's data as prior images) then sees all N characters,
    so no character is ever a base class.
    """

    characters: tuple[int, ...] = DEFAULT_CHARACTERS


def stack_config(args: argparse.Namespace, seed: int, work: Path) -> StackConfig:
    """The interference benchmark's demo config (same recipe, ``--quick`` the same) for N characters."""
    base = demo_config(seed, args.quick, work, Path(args.cache), args.threads)
    values = {f.name: getattr(base, f.name) for f in fields(base)}
    chars = tuple(args.characters)
    # DemoConfig checks two distinct characters; with N = 1 the second is any other digit, unused
    spare = next(d for d in range(10) if d not in chars)
    values.update(character1=chars[0], character2=chars[1] if len(chars) > 1 else spare)
    values["samples"] = args.samples
    if args.steps is not None:
        values["steps"] = args.steps
    if args.width is not None:
        # heads of 16 channels and an FFN twice the width, as the default 64-wide model has
        values["spec"] = replace(base.spec, dim=args.width, heads=args.width // 16, ffn_dim=2 * args.width)
    values["characters"] = chars
    cfg = StackConfig(**values)
    cfg.validate()
    return cfg


def projection_config(
    cfg: StackConfig, overrides: dict[str, Any] | None = None
) -> tuple[StackConfig | None, str | None]:
    """``cfg`` with projection preservation, or ``None`` and why it cannot be had here.
    ``overrides``: DemoConfig's projection fields (``projection_ff``, ``projection_lr``,
    ``preserve_energy``) where the run departs from the recipe."""
    if "preserve_method" not in {f.name for f in fields(cfg)}:
        return None, (
            "skipped: this checkout's DemoConfig has no preserve_method field (projection preservation "
            "not landed); `--methods preserved` runs the preservation loss instead"
        )
    # the field's own recipe (selector, ff, lr) comes with it: DemoConfig picks it, not this bench
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    pcfg = replace(cfg, **{"preserve_method": "projection", **given})
    pcfg.validate()
    return pcfg, None


@dataclass
class Context:
    """What every method of one seed shares: config, data, the base, the judge and its bookkeeping."""

    args: argparse.Namespace
    cfg: StackConfig
    work: Path
    data: Any
    base_path: Path
    judge_model: Callable[[Any, Sequence[int]], dict[str, Any]]
    log: Log


def run_method(ctx: Context, method: str) -> dict[str, Any]:
    """Teach every character the ``method`` way; one judged stage after each (and after the merge)."""
    from ffid.demo.characters import model_with_deltas
    from ffid.demo.stacking import teach_characters
    from ffid.demo.task import load_model

    cfg, chars = ctx.cfg, ctx.cfg.characters
    stages: list[dict[str, Any]] = []

    def stage(
        name: str, model: Any, taught: Sequence[int], train_s: float, extra: dict[str, Any] | None = None
    ) -> None:
        t = time.perf_counter()
        scores = ctx.judge_model(model, taught)
        judge_s = time.perf_counter() - t
        stages.append(
            {
                "name": name,
                "taught": list(taught),
                "train_s": round(train_s, 1),
                "judge_s": round(judge_s, 1),
                "scores": {k: v.to_dict() for k, v in scores.items()},
                **(extra or {}),
            }
        )
        own = scores[f"character{list(taught)[-1]}"]
        ctx.log(
            f"  {METHODS[method]}: {name}: own confident {own.confident.value:.0%} "
            f"(argmax {own.argmax.value:.0%}), train {train_s:.0f} s, judge {judge_s:.0f} s"
        )

    if method in ("lora", "full"):
        lr = ctx.args.lora_lr if method == "lora" else ctx.args.full_lr
        model, _ = load_model(ctx.base_path)
        for i, digit in enumerate(chars, 1):
            t = time.perf_counter()
            model, _ = train_dense(method, cfg, model, f"character{i}", digit, i, ctx.data, lr)
            stage(f"character{i}", model, range(1, i + 1), time.perf_counter() - t)
        return {"stages": stages}

    mcfg = replace(cfg, output_dir=str(ctx.work / method))
    if method == "projection":
        a = ctx.args
        pcfg, note = projection_config(
            mcfg,
            {
                "projection_ff": a.projection_ff,
                "projection_lr": a.projection_lr,
                "preserve_energy": a.preserve_energy,
            },
        )
        if pcfg is None:
            ctx.log(f"  {METHODS[method]}: {note}")
            return {"skipped": note}
        mcfg = pcfg
    # the demo's own loop (ffid demo --characters runs it too); character1 preserved as well:
    # with no earlier delta the preservation keeps the base classes and the empty prompt
    teach = {"projection": "preserved", "preserved": "preserved"}.get(method, method)
    taught = teach_characters(
        mcfg,
        teach,
        ctx.base_path,
        ctx.data,
        stage,
        preserve_first=True,
    )
    deltas = [t.delta for t in taught]
    keys = ("delta", "trainable", "steps", "final_loss", "preserved")
    infos = [{k: t.info[k] for k in keys} for t in taught]
    if method == "parallel":
        # base + every delta in memory is what `ffid merge` writes (the demo checks it bit for bit)
        stage("merged", model_with_deltas(ctx.base_path, deltas), range(1, len(chars) + 1), 0.0)
    preserving = method in ("projection", "preserved")
    recipe = (
        mcfg.preserved_recipe()
        if preserving
        else {k: getattr(mcfg, k) for k in ("selector", "ff", "learning_rate")}
    )
    return {"stages": stages, "recipe": {**recipe, "trainable": infos[0]["trainable"]}}


def run_seed(
    args: argparse.Namespace, seed: int, log: Log, save: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    """Every method of ``args.methods`` on one seed's base; ``save(partial)`` after each method."""
    import ffid
    from ffid.demo.classifier import fit_judge
    from ffid.demo.data import Concept, load_digit_images
    from ffid.demo.evaluate import evaluate
    from ffid.demo.judge import judge_stage
    from ffid.demo.pretrain import load_or_pretrain
    from ffid.demo.run import set_determinism
    from ffid.demo.task import base_concepts, load_model

    t_seed = time.perf_counter()
    work = Path(args.work) / f"seed{seed}"
    cfg = stack_config(args, seed, work)
    set_determinism(cfg.seed, cfg.threads)
    data = load_digit_images(cfg.spec.image_size)
    judge = fit_judge(*data, seed=cfg.seed, calibrate=True)
    t0 = time.perf_counter()
    base_path, _, cached = load_or_pretrain(cfg, data, log)
    pretrain_s = time.perf_counter() - t0
    characters = [Concept(f"character{i}", d) for i, d in enumerate(cfg.characters, 1)]
    bases = base_concepts(cfg.held_out)

    def judge_model(model: Any, taught: Sequence[int]) -> dict[str, Any]:
        # only the characters (ids) ``taught`` into this model: another's prompt means nothing
        # there (the sampler seeds each image alone: a prompt's samples do not depend on the others)
        concepts = [characters[i - 1] for i in taught] + bases
        _, images = evaluate("stage", model, cfg, judge, concepts)
        return judge_stage(judge, images, concepts, resamples=args.resamples, seed=cfg.seed)

    ctx = Context(args, cfg, work, data, base_path, judge_model, log)
    base_model, _ = load_model(base_path)
    before = {k: v.to_dict() for k, v in judge_model(base_model, range(1, len(characters) + 1)).items()}
    k = ffid.plan(base_model, cfg.ff, 1, cfg.selector).selected
    record: dict[str, Any] = {
        "seed": seed,
        "base": str(base_path),
        "base_cached": cached,
        "pretrain_s": round(pretrain_s, 1),
        "config": {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "spec"}
        | {"spec": cfg.spec.to_dict(), "held_out": list(cfg.held_out)},
        "judge": {
            "holdout_argmax": judge.holdout_accuracy,
            "holdout_confident": judge.holdout_confident,
            "confident_at": judge.confident_at,
        },
        "resamples": args.resamples,
        "ffid_trainable": k,
        "lora_rank": lora_rank(base_model, k),
        "before": before,
        "methods": {},
    }
    for method in args.methods:
        log(f"seed {seed}: {METHODS[method]}")
        t = time.perf_counter()
        result = run_method(ctx, method)
        result["seconds"] = round(time.perf_counter() - t, 1)
        record["methods"][method] = result
        record["seconds"] = round(time.perf_counter() - t_seed, 1)
        save(record)
    return record


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--characters", type=int, nargs="+", default=list(DEFAULT_CHARACTERS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(DEFAULT_METHODS))
    ap.add_argument("--samples", type=int, default=None, help=f"per prompt and stage (default {SAMPLES})")
    ap.add_argument(
        "--steps", type=int, default=None, help="training steps per character (default the demo's)"
    )
    ap.add_argument("--width", type=int, choices=(64, 128, 256), default=None, help="the demo model's dim")
    ap.add_argument("--projection-ff", type=float, default=None, help="projection's budget (default: recipe)")
    ap.add_argument("--projection-lr", type=float, default=None, help="projection's rate (default: recipe)")
    ap.add_argument(
        "--preserve-energy", type=float, default=None, help="projection's energy share (default: recipe)"
    )
    ap.add_argument("--quick", action="store_true", help="CI smoke: tiny model, a few steps")
    ap.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples per interval")
    ap.add_argument("--lora-lr", type=float, default=LORA_LR)
    ap.add_argument("--full-lr", type=float, default=FULL_LR)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="folder for the .md/.json (default bench/results)")
    ap.add_argument("--stem", default=None, help="file name of the results (default from the run)")
    ap.add_argument("--work", default=None, help="folder for deltas (default: a temporary folder)")
    ap.add_argument("--cache", default=None, help="pretrained bases (default ~/.cache/ffid/interference)")
    args = ap.parse_args(argv)
    chars = args.characters
    bad = [d for d in chars if not 0 <= d <= 9]
    if bad:
        ap.error(f"--characters {bad[0]} is not a digit 0..9; give digits such as 7 4 1 9")
    if len(set(chars)) != len(chars):
        twice = next(d for d in chars if chars.count(d) > 1)
        ap.error(f"--characters gives digit {twice} twice; each character needs its own digit")
    if len(chars) > len(ORDER):
        ap.error(f"--characters gives {len(chars)} digits; at most {len(ORDER)}, so two base classes remain")
    if len(set(args.methods)) != len(args.methods):
        ap.error("--methods names a method twice")
    _check_ids(ap, len(chars))
    if args.samples is None:
        args.samples = 4 if args.quick else SAMPLES
    for name in ("samples", "resamples", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} {getattr(args, name)} must be at least 1")
    if args.steps is not None and args.steps < 1:
        ap.error(f"--steps {args.steps} must be at least 1")
    import os

    args.cache = args.cache or os.path.join(os.path.expanduser("~"), ".cache", "ffid", "interference")
    return args


def _check_ids(ap: argparse.ArgumentParser, n: int) -> None:
    """N characters need ids 1..N in the demo's selection layout."""
    from ffid.errors import ConfigError
    from ffid.select import SelectionSettings

    cfg = DemoConfig()
    try:
        SelectionSettings.create(cfg.ff, n, cfg.selector)
    except ConfigError as e:
        ap.error(f"--characters gives {n} digits, but the demo's selection has no id {n}: {e}")


def main(argv: Sequence[str] | None = None) -> int:
    from compare import quiet

    args = parse_args(argv)
    quiet()
    start = time.perf_counter()
    given = list(argv) if argv is not None else sys.argv[1:]
    command = ("python bench/stack.py " + " ".join(given)).rstrip()
    out = Path(args.out or HERE / "results")
    chars = "".join(str(d) for d in args.characters)
    seeds = "-".join(str(s) for s in args.seeds)
    stem = args.stem or ("stack-quick" if args.quick else f"stack-{chars}-seed{seeds}")
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="ffid-stack-")
        args.work = tmp.name

    def log(msg: str) -> None:
        print(msg, flush=True)

    done: list[dict[str, Any]] = []

    def save(record: dict[str, Any]) -> None:
        # after every method: a run cut short keeps what finished
        payload = {
            "command": command,
            "args": vars(args),
            "methods": {m: METHODS[m] for m in args.methods},
            "seeds": [*done, summarize(record, args.methods)],
        }
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")
        (out / f"{stem}.md").write_text(render(payload, time.perf_counter() - start))

    try:
        for seed in args.seeds:
            digits = " ".join(map(str, args.characters))
            log(f"seed {seed}: characters {digits}, methods {' '.join(args.methods)}")
            done.append(summarize(run_seed(args, seed, log, save), args.methods))
    finally:
        if tmp is not None:
            tmp.cleanup()
    print((out / f"{stem}.md").read_text())
    log(f"wrote {out / stem}.md/.json in {time.perf_counter() - start:.0f} s")
    return 0


def _jsonable(x: Any) -> Any:
    """JSON for what ``json`` cannot write by itself (paths, dataclasses such as the model spec)."""
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "__dataclass_fields__"):
        return asdict(x)
    raise TypeError(f"cannot write {type(x).__name__} to JSON")


if __name__ == "__main__":
    sys.exit(main())
