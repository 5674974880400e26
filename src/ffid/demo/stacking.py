"""``ffid demo --characters 7 4 1``: N characters stacked into one model, judged strictly.

Character i is the held-out digit ``characters[i-1]`` taught as ``a digit character{i}`` into
``--ffid i`` through :func:`ffid.train.train` (the same path as ``ffid train``). Two ways to
stack them (``--stacking``):

- ``sequential`` (default): each character on top of all earlier deltas, with the demo's
  preservation (``--preserve_method``: projection in ``ffid demo``'s default config) keeping the
  earlier characters, the base classes and the empty prompt; then, as the contrast
  (``plain_contrast``, on by default), characters 2..N again without preservation on top of the
  same character1, which shows what preservation is for. The merged checkpoint holds the
  preserved deltas.
- ``parallel``: each character from the base alone in its own id, then all deltas merged.

After every run the characters taught so far and the base classes are sampled (the same seeds at
every stage) and judged by the strict judge (:mod:`.judge`); the report
(:mod:`.stack_report`) has every character's score after each stage and in the merged file.

:func:`teach_characters` is the training loop shared with ``bench/stack.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .characters import model_with_deltas, train_character
from .classifier import DigitJudge, fit_judge
from .config import DemoConfig
from .data import Concept, load_digit_images
from .judge import judge_images
from .model import build_model, param_count, sample
from .plots import plot_all_losses, write_grid
from .pretrain import load_or_pretrain
from .shipped import is_shipped
from .stack_report import METHOD_TITLES
from .task import base_concepts

Log = Callable[[Any], None]
# stage(name, model, ids taught so far, training seconds, extra keys of the stage's record)
StageFn = Callable[[str, torch.nn.Module, Sequence[int], float, dict[str, Any]], None]
GRID_COLUMNS = 8


@dataclass
class Taught:
    """One character's ffid run: its delta, its trainer report entry and its loss curve."""

    delta: Path
    info: dict[str, Any]
    losses: list[float]


def methods_of(cfg: DemoConfig) -> list[str]:
    """The sequences a stacked run trains, the merged one first."""
    if cfg.stacking == "parallel":
        return ["parallel"]
    # one character has nothing earlier to keep: the contrast would repeat the same run
    return ["preserved", "plain"] if cfg.plain_contrast and len(cfg.characters) > 1 else ["preserved"]


def teach_characters(
    cfg: DemoConfig,
    method: str,
    base_path: Path,
    data: tuple[torch.Tensor, torch.Tensor],
    stage: StageFn,
    *,
    preserve_first: bool | None = None,
    first: Taught | None = None,
) -> list[Taught]:
    """Teach ``cfg.characters`` into ids 1..N the ``method`` way, calling ``stage`` after each run.

    ``plain`` and ``preserved``: character i on top of the deltas of characters 1..i-1 (the
    stage's model holds all of them); ``preserved`` turns the trainer's preservation on.
    ``parallel``: character i from the base alone (the stage's model is base + its delta only).
    ``preserve_first``: whether character1, which has no earlier character, is preserved too
    (keeping the base classes and the empty prompt); default as the two-character demo does:
    only under projection. ``first``: character1's run of another sequence to reuse when it
    would be the same run (unpreserved, from the base), with no ``stage`` call for it. Outputs go
    to ``{cfg.output_dir}/character{i}/``.
    """
    if method not in METHOD_TITLES:
        raise ValueError(f"method {method!r} is not one of {', '.join(METHOD_TITLES)}")
    if preserve_first is None:
        preserve_first = cfg.preserve_method == "projection"
    taught: list[Taught] = [first] if first is not None else []
    for i, digit in enumerate(cfg.characters, 1):
        if i == 1 and first is not None:
            continue
        earlier = [] if method == "parallel" else [t.delta for t in taught]
        preserve = method == "preserved" and (i > 1 or preserve_first)
        t0 = time.perf_counter()
        delta, losses, info = train_character(
            cfg, f"character{i}", digit, i, base_path, earlier, data, preserve=preserve
        )
        train_s = time.perf_counter() - t0
        taught.append(Taught(delta, info, losses))
        run = {k: info[k] for k in ("delta", "trainable", "steps", "final_loss", "preserved", "fingerprint")}
        if method == "parallel":
            # alone on the base, only its own prompt means anything; all together after the merge
            model = model_with_deltas(base_path, [delta])
            stage(f"character{i}", model, [i], train_s, {"run": run, "label": f"character{i} alone"})
        else:
            model = model_with_deltas(base_path, [t.delta for t in taught])
            stage(f"character{i}", model, range(1, i + 1), train_s, {"run": run})
    return taught


def check_ids(cfg: DemoConfig) -> None:
    """Every id 1..N must hold the recipe's budget in this model (the selection planned on a
    freshly built model of the demo's shape, before anything is written); a ConfigError names
    ``--characters`` and the fix otherwise."""
    from ..select import SelectionSettings

    recipe = cfg.run_recipe(preserve=False)
    model = build_model(cfg.spec, seed=cfg.seed)
    n = len(cfg.characters)
    for ffid in range(n, 0, -1):
        settings = SelectionSettings.create(
            recipe["ff"],
            ffid,
            recipe["selector"],
            include=recipe.get("include"),
            **recipe.get("selector_args", {}),
        )
        try:
            settings.plan(model)
        except ConfigError as exc:
            if ffid > 1:
                continue
            raise ConfigError(
                f"--characters: not even id 1 holds --ff {recipe['ff']} with selector {recipe['selector']} "
                f"({exc}); lower --ff"
            ) from None
        if ffid < n:
            raise ConfigError(
                f"--characters gives {n} characters (ids 1..{n}), but selector {recipe['selector']} at --ff "
                f"{recipe['ff']} holds ids 1..{ffid} only; give at most {ffid} characters or lower --ff"
            )
        return


@dataclass(frozen=True)
class StackJudging:
    """Samples and judges a stage: ``character_samples`` per character taught, ``samples`` per
    base class, the same seeds at every stage; writes the stage's grid."""

    cfg: DemoConfig
    judge: DigitJudge
    characters: list[Concept]
    bases: list[Concept]
    sample_dir: Path

    def __call__(
        self, name: str, title: str, model: torch.nn.Module, taught: Sequence[int], bases: bool = True
    ) -> dict[str, Any]:
        cfg = self.cfg
        concepts = [self.characters[i - 1] for i in taught] + (self.bases if bases else [])
        counts = [cfg.character_samples] * len(list(taught)) + [cfg.samples] * (len(concepts) - len(taught))
        images = sample_concepts(model, cfg, concepts, counts)
        cols = min(GRID_COLUMNS, *counts)
        write_grid(torch.stack([x[:cols] for x in images]), concepts, self.sample_dir / f"{name}.png", title)
        return {
            c.name: judge_images(self.judge, x, c.digit, seed=cfg.seed).to_dict()
            for c, x in zip(concepts, images, strict=True)
        }


def sample_concepts(
    model: torch.nn.Module, cfg: DemoConfig, concepts: Sequence[Concept], counts: Sequence[int]
) -> list[torch.Tensor]:
    """``counts[j]`` samples of ``concepts[j]`` with the demo's seeds (those of
    :func:`ffid.demo.evaluate.evaluate`: sample i of every prompt has seed ``seed * 100003 + i``,
    so a prompt's first samples are the same whatever the count); one tensor per concept."""
    prompts = [c.prompt for c, n in zip(concepts, counts, strict=True) for _ in range(n)]
    seeds = [cfg.seed * 100_003 + i for n in counts for i in range(n)]
    images = sample(model, prompts, seeds, steps=cfg.sample_steps, guidance=cfg.guidance, spec=cfg.spec)
    return list(torch.split(images, list(counts)))


def run_stack(cfg: DemoConfig, console: Any = None) -> Any:
    """Run the stacked demo (see module docstring); returns a :class:`ffid.demo.run.DemoResult`."""
    from .run import DemoResult, _console, _same_weights, set_determinism
    from .stack_report import build_stack_report, render_stack_markdown, render_stack_summary

    cfg.validate()
    log: Log = (console or _console()).print
    t_start = time.perf_counter()
    check_ids(cfg)  # before anything is written or said
    _announce(cfg, log)
    set_determinism(cfg.seed, cfg.threads)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_digit_images(cfg.spec.image_size)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    judge = fit_judge(*data, seed=cfg.seed, calibrate=True)
    timings["judge"] = time.perf_counter() - t0
    log(
        f"judge: RBF SVM on real digits, {judge.holdout_accuracy:.1%} argmax and "
        f"{judge.holdout_confident:.1%} confident (calibrated p >= {judge.confident_at}) on held-out real "
        "scans"
    )
    t0 = time.perf_counter()
    base_path, base_losses, cached = load_or_pretrain(cfg, data, log)
    timings["pretrain"] = time.perf_counter() - t0
    characters = [Concept(f"character{i}", d) for i, d in enumerate(cfg.characters, 1)]
    judging = StackJudging(cfg, judge, characters, base_concepts(cfg.held_out), out / "samples")
    ids = list(range(1, len(characters) + 1))

    t0 = time.perf_counter()
    before = judging("base", "pretrained base", model_with_deltas(base_path, []), ids)
    timings["sample_base"] = time.perf_counter() - t0
    sequences: dict[str, list[dict[str, Any]]] = {}
    runs: dict[str, list[Taught]] = {}
    for method in methods_of(cfg):
        stages: list[dict[str, Any]] = sequences.setdefault(method, [])
        log(
            f"[bold]{METHOD_TITLES[method]}[/]: "
            + ", ".join(f"{c.name} = digit {c.digit}" for c in characters)
        )

        def stage(
            name: str,
            model: torch.nn.Module,
            taught: Sequence[int],
            train_s: float,
            extra: dict[str, Any],
            method: str = method,
            stages: list[dict[str, Any]] = stages,
        ) -> None:
            t = time.perf_counter()
            label = extra.get("label", f"+{name}")
            if method == "plain" and name != f"character{len(characters)}":
                # the contrast's retention needs each character after its own run and everything
                # after the last: its other cells would cost a third of the demo's sampling
                sampled, whole = [int(name[9:])], False
            else:
                sampled, whole = list(taught), True
            scores = judging(f"{method}-{name}", f"{METHOD_TITLES[method]}: {label}", model, sampled, whole)
            judge_s = time.perf_counter() - t
            timings[f"{method}_{name}"] = train_s
            timings[f"sample_{method}_{name}"] = judge_s
            stages.append(
                {
                    "name": name,
                    "taught": list(taught),
                    "train_s": round(train_s, 1),
                    "judge_s": round(judge_s, 1),
                }
                | extra
                | {"scores": scores}
            )
            own = scores[name]
            log(
                f"  {name}: confident {own['confident']['value']:.0%} (argmax {own['argmax']['value']:.0%}); "
                + ", ".join(
                    f"character{j} {scores[f'character{j}']['confident']['value']:.0%}"
                    for j in sampled
                    if j != int(name[9:])
                )
            )

        first = None
        if method == "plain":
            # The contrast starts from the preserved sequence's character1: what it shows is what
            # stacking does to earlier characters, with or without preservation. (Under the loss,
            # character1 is not preserved, so this is the very run a plain sequence would make;
            # under projection it kept the base classes, which the contrast is not about.)
            first = runs["preserved"][0]
            stages.append(dict(sequences["preserved"][0]) | {"reused": "preserved"})
            log("  character1: the preserved sequence's run (the contrast differs from character2 on)")
        mcfg = replace(cfg, output_dir=str(out / method))
        runs[method] = teach_characters(mcfg, method, base_path, data, stage, first=first)

    kept = methods_of(cfg)[0]
    t0 = time.perf_counter()
    deltas = [t.delta for t in runs[kept]]
    merged_path, merged_model = _merge(out, base_path, deltas)
    same = _same_weights(merged_model, model_with_deltas(base_path, deltas))
    timings["merge"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if kept != "parallel" and same:
        # bit-identical to the last stage's model, sampled with the same seeds: the same scores
        merged = {"scores": sequences[kept][-1]["scores"], "resampled": False}
    else:
        merged = {
            "scores": judging("merged", f"merged file ({kept})", merged_model.eval(), ids),
            "resampled": True,
        }
    timings["sample_merged"] = time.perf_counter() - t0
    merged |= {"method": kept, "same_as_deltas": same, "path": str(merged_path)}

    plot_all_losses(
        {"pretraining (base)": base_losses}
        | {f"{c.name} {m}": t.losses for m in runs for c, t in zip(characters, runs[m], strict=True)},
        out / "loss.png",
    )
    report = build_stack_report(
        cfg,
        param_count(model_with_deltas(base_path, [])),
        judge,
        before,
        {m: {"stages": sequences[m], "runs": [t.info for t in runs[m]]} for m in sequences},
        merged,
        {
            "base": str(base_path),
            "base_cached": cached,
            "base_shipped": is_shipped(base_path),
            "merged": str(merged_path),
        },
        timings,
    )
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    _write(report, out, log, render_stack_markdown, render_stack_summary)
    return DemoResult(out, report, [], report["seconds"])


def _announce(cfg: DemoConfig, log: Log) -> None:
    """The demo's first lines: what it is about to do."""
    chars = ", ".join(f"character{i} = digit {d} (id {i})" for i, d in enumerate(cfg.characters, 1))
    how = {
        "sequential": f"each on top of the earlier ones, preserved by {cfg.preserve_method}"
        + (", then again without preservation (the contrast)" if cfg.plain_contrast else ""),
        "parallel": "each from the base alone in its own id, then all merged",
    }[cfg.stacking]
    log(
        f"[bold]ffid demo[/]: {len(cfg.characters)} characters stacked into one tiny Wan DiT: {chars}; "
        f"{how}\n"
        f"  held out of pretraining: {' '.join(map(str, sorted(cfg.held_out)))}; seed {cfg.seed}, "
        f"{cfg.threads} threads; judged on {cfg.character_samples} samples per character and {cfg.samples} "
        f"per base class\n  output: {Path(cfg.output_dir).resolve()}"
    )


def _merge(out: Path, base_path: Path, deltas: list[Path]) -> tuple[Path, torch.nn.Module]:
    from .run import _merge as merge

    return merge(out, base_path, deltas)


def _write(report: dict[str, Any], out: Path, log: Log, markdown: Any, summary: Any) -> None:
    """``report.json`` and ``report.md`` atomically, and the summary on the console."""
    from ..train.io import atomic_write_bytes
    from ..train.monitor import peak_memory

    report["peak_memory"] = peak_memory(torch.device("cpu"))
    atomic_write_bytes(out / "report.json", (json.dumps(report, indent=1) + "\n").encode())
    atomic_write_bytes(out / "report.md", markdown(report).encode())
    from rich.markup import escape

    log(escape(summary(report)))  # intervals such as [75–90%] are text, not markup
    log(
        f"wrote {out / 'report.md'}, {out / 'report.json'}, {out / 'samples'}/*.png, {out / 'loss.png'}; "
        f"total {report['seconds']:.0f} s"
    )
