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
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .classifier import DigitJudge, fit_judge
from .data import DIGIT_WORDS, Concept, load_digit_images
from .model import ModelSpec, build_model, sample
from .task import DemoTask, base_concepts, load_model, save_model

DEMO_VERSION = 1  # bump when the base's recipe changes in a way the cache key cannot see
# character2's recipes; the last is the recommended one, merged into the full checkpoint
VARIANTS = ("plain", "rehearsed", "preserved")
CHARACTER2_MODES = ("all", *VARIANTS)


@dataclass
class DemoConfig:
    """Every knob of ``ffid demo`` (the CLI flags map one to one)."""

    output_dir: str = "ffid-demo"
    cache_dir: str | None = None  # where the base is cached; default {output_dir}/base
    fresh: bool = False
    seed: int = 0
    threads: int = 1
    # model and pretraining
    spec: ModelSpec = field(default_factory=ModelSpec)
    pretrain_steps: int = 1200
    pretrain_lr: float = 2e-3
    pretrain_batch: int = 64
    # the two characters (held out of pretraining)
    character1: int = 7
    character2: int = 4
    # ffid training
    selector: str = "spread"
    ff: float = 0.01
    ffid1: int = 1
    ffid2: int = 2
    steps: int = 300
    learning_rate: float = 3e-2
    batch_size: int = 32
    prior_per_class: int = 23  # real scans of each base class mixed into a character's data (0: none)
    # how character2 is taught on top of character1: "plain" (its own data only), "rehearsed"
    # (character1's scans mixed in), "preserved" (no character1 data; preservation loss), or "all"
    # three from the same state, side by side
    character2_mode: str = "all"
    # preservation (the preserved variant): ffid train's preserve_* keys
    preserve_weight: float = 16.0
    preserve_items: int = 8
    # sampling and judging
    samples: int = 32  # per prompt, for the scores
    sample_steps: int = 20
    guidance: float = 3.0
    progress: bool = True

    def validate(self) -> DemoConfig:
        from ..select import check_ff, check_ffid

        self.ff = check_ff(self.ff)
        self.ffid1, self.ffid2 = check_ffid(self.ffid1), check_ffid(self.ffid2)
        if self.ffid1 == self.ffid2:
            raise ConfigError(
                f"--ffid1 and --ffid2 are both {self.ffid1}; the demo needs two different ids so the "
                "characters never share a weight, e.g. 1 and 2"
            )
        if self.character2_mode not in CHARACTER2_MODES:
            raise ConfigError(
                f"--character2_mode {self.character2_mode!r} is not one of {', '.join(CHARACTER2_MODES)}"
            )
        for name in ("character1", "character2"):
            if not 0 <= getattr(self, name) <= 9:
                raise ConfigError(f"--{name} {getattr(self, name)} is not a digit 0..9")
        if self.character1 == self.character2:
            raise ConfigError(
                f"--character1 and --character2 are both digit {self.character1}; pick two different digits"
            )
        for name in (
            "pretrain_steps",
            "steps",
            "samples",
            "sample_steps",
            "threads",
            "batch_size",
            "pretrain_batch",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} {getattr(self, name)} must be at least 1")
        if not (math.isfinite(self.preserve_weight) and self.preserve_weight > 0):
            raise ConfigError(f"--preserve_weight {self.preserve_weight} must be a positive number")
        if self.preserve_items < 1:
            raise ConfigError(f"--preserve_items {self.preserve_items} must be at least 1")
        for name in ("pretrain_lr", "learning_rate"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"--{name} {value} must be a positive number")
        return self

    @property
    def character2_variants(self) -> list[str]:
        """The character2 runs this config trains, the merged (recommended) one last."""
        return list(VARIANTS) if self.character2_mode == "all" else [self.character2_mode]

    @property
    def held_out(self) -> tuple[int, int]:
        return (self.character1, self.character2)

    def base_recipe(self) -> dict[str, Any]:
        """What the pretrained base depends on; its hash is the cache key."""
        return {
            "version": DEMO_VERSION,
            "spec": self.spec.to_dict(),
            "steps": self.pretrain_steps,
            "lr": self.pretrain_lr,
            "batch": self.pretrain_batch,
            "seed": self.seed,
            "held_out": sorted(self.held_out),
            "threads": self.threads,
        }


QUICK = {
    "spec": ModelSpec(dim=32, heads=2, layers=2, ffn_dim=64, freq_dim=16),
    "pretrain_steps": 40,
    "steps": 12,
    "samples": 6,
    "sample_steps": 6,
}


@dataclass
class StageScores:
    """Judge results for one stage: per prompt, the share of samples classified as its digit."""

    name: str
    accuracy: dict[str, float]
    predictions: dict[str, list[int]]


@dataclass
class DemoResult:
    output_dir: Path
    report: dict[str, Any]
    stages: list[StageScores]
    seconds: float


def set_determinism(seed: int, threads: int) -> None:
    """Same seed, same numbers: fixed thread count (float sums depend on it), deterministic kernels."""
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(seed)


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False)


def _param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- pretraining --------------------------------------------------------------------------------
def pretrain(
    cfg: DemoConfig,
    out: Path,
    data: tuple[torch.Tensor, torch.Tensor],
    log: Callable[[str], None],
) -> tuple[torch.nn.Module, list[float]]:
    """Full finetuning of a fresh tiny Wan on the base classes (a small dedicated loop).

    The ffid trainer trains a fraction of an existing model; pretraining trains every weight from
    scratch, which is ordinary full training, so it gets a plain AdamW loop. It shares the
    dataset, batching order and loss with :class:`DemoTask`, so base and characters learn the
    same objective.
    """
    from ..train.data import BatchOrder
    from ..train.monitor import TrainMonitor

    model = build_model(cfg.spec, seed=cfg.seed)
    model.train()
    task = DemoTask(base_concepts(cfg.held_out), spec=cfg.spec, data=data)
    dataset = task.dataset(None)  # type: ignore[arg-type]  # concepts given: cfg not read
    order = BatchOrder(len(dataset), cfg.pretrain_batch, cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    warmup = max(1, cfg.pretrain_steps // 20)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, cfg.pretrain_steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(cfg.seed * 7919 + 17)
    monitor = TrainMonitor(
        cfg.pretrain_steps,
        0,
        [],
        logging_dir=str(Path(cfg.output_dir) / "logs" / "pretrain"),
        enabled=True,
        progress=cfg.progress,
    )
    log(
        f"pretraining the base: {_param_count(model):,} params (all trained), {len(dataset)} real digit "
        f"scans of classes {', '.join(c.name for c in task.concepts or [])}, {cfg.pretrain_steps} steps "
        f"x batch {cfg.pretrain_batch}"
    )
    batches = order.iterate(0, 0)
    try:
        for step in range(1, cfg.pretrain_steps + 1):
            _, _, ids = next(batches)
            loss = task.loss(model, task.collate([dataset[i] for i in ids]), generator)
            value = float(loss.detach())
            if not math.isfinite(value):
                from ..errors import TrainingError

                raise TrainingError(f"pretraining loss is {value} at step {step}; lower --pretrain_lr")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            monitor.step(step, value, scheduler.get_last_lr()[0])
    finally:
        monitor.close()
    model.eval()
    return model, monitor.losses


def load_or_pretrain(
    cfg: DemoConfig, data: tuple[torch.Tensor, torch.Tensor], log: Callable[[str], None]
) -> tuple[Path, list[float], bool]:
    """The base file, its pretraining losses, and whether it came from the cache."""
    from ..train.io import atomic_write_bytes
    from ..train.monitor import plot_losses

    cache = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.output_dir) / "base"
    recipe = cfg.base_recipe()
    key = hashlib.blake2b(json.dumps(recipe, sort_keys=True).encode(), digest_size=8).hexdigest()
    path = cache / f"base-{key}.safetensors"
    info_path = cache / f"base-{key}.json"
    if path.is_file() and info_path.is_file() and not cfg.fresh:
        info = json.loads(info_path.read_text())
        log(f"base: cached {path} (recipe {key}; --fresh retrains it)")
        return path, list(info.get("losses", [])), True
    t0 = time.perf_counter()
    model, losses = pretrain(cfg, cache, data, log)
    seconds = time.perf_counter() - t0
    save_model(model, cfg.spec, path, {"ffid_demo.recipe": json.dumps(recipe)})
    info = {"recipe": recipe, "key": key, "seconds": round(seconds, 2), "losses": losses}
    atomic_write_bytes(info_path, (json.dumps(info) + "\n").encode())
    plot_losses(losses, cache / f"base-{key}-loss.png", "pretraining the demo base")
    log(f"base: pretrained in {seconds:.0f} s, saved {path}")
    return path, losses, False


# -- evaluation ---------------------------------------------------------------------------------
def prompts_for(cfg: DemoConfig) -> list[Concept]:
    """Every prompt the demo scores: the base digits, then character1 and character2."""
    return [
        *base_concepts(cfg.held_out),
        Concept("character1", cfg.character1),
        Concept("character2", cfg.character2),
    ]


def evaluate(
    name: str, model: torch.nn.Module, cfg: DemoConfig, judge: DigitJudge, concepts: list[Concept]
) -> tuple[StageScores, torch.Tensor]:
    """Sample ``cfg.samples`` images per prompt (fixed seeds) and score them with the judge."""
    prompts = [c.prompt for c in concepts for _ in range(cfg.samples)]
    # The same seeds at every stage: differences between stages come from the weights only.
    seeds = [cfg.seed * 100_003 + i for _ in concepts for i in range(cfg.samples)]
    images = sample(model, prompts, seeds, steps=cfg.sample_steps, guidance=cfg.guidance, spec=cfg.spec)
    preds = judge.predict(images).view(len(concepts), cfg.samples)
    acc = {c.name: float((preds[i] == c.digit).float().mean()) for i, c in enumerate(concepts)}
    return (
        StageScores(name, acc, {c.name: preds[i].tolist() for i, c in enumerate(concepts)}),
        images.view(len(concepts), cfg.samples, *images.shape[1:]),
    )


def write_grid(
    images: torch.Tensor, concepts: list[Concept], path: Path, title: str, columns: int = 8
) -> Path:
    """A PNG grid: one row per prompt, ``columns`` samples each, prompts written on the left."""

    from ..figures import pyplot, save_figure

    plt = pyplot()

    from .data import to_unit

    cols = min(columns, images.shape[1])
    rows = len(concepts)
    fig, axes = plt.subplots(rows, cols, figsize=(1.0 * cols + 1.6, 1.0 * rows + 0.5), dpi=80, squeeze=False)
    for r, concept in enumerate(concepts):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(
                to_unit(images[r, c]).reshape(images.shape[-2], images.shape[-1]).numpy(),
                cmap="gray",
                vmin=0,
                vmax=1,
                interpolation="nearest",
            )
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(concept.name, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_all_losses(curves: dict[str, list[float]], path: Path) -> Path:
    """All stages' loss curves side by side in one PNG."""

    from ..figures import pyplot, save_figure

    plt = pyplot()

    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4), dpi=90, squeeze=False)
    for ax, (name, losses) in zip(axes[0], curves.items(), strict=True):
        ax.plot(range(1, len(losses) + 1), losses, lw=0.7, alpha=0.5)
        window = max(1, len(losses) // 20)
        smooth = [
            sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
            for i in range(len(losses))
        ]
        ax.plot(range(1, len(losses) + 1), smooth, lw=1.5)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("flow-matching loss")
    fig.tight_layout()
    return save_figure(fig, path)


# -- the ffid stages ----------------------------------------------------------------------------
def train_character(
    cfg: DemoConfig,
    name: str,
    digit: int,
    ffid: int,
    base_path: Path,
    base_deltas: list[Path],
    data: tuple[torch.Tensor, torch.Tensor],
    extra_prior: list[Concept] | None = None,
    run_name: str | None = None,
    preserve: bool = False,
) -> tuple[Path, list[float], dict[str, Any]]:
    """Teach ``a digit <name>`` (real scans of ``digit``) into slice ``ffid`` through the trainer.

    ``run_name`` (default ``name``) names the output folder, files and logs, so two runs that
    teach the same prompt differently do not overwrite each other.
    """
    run_name = run_name or name
    from ..train import config_from_mapping, train

    model, spec = load_model(base_path)
    # No caption dropout here: training the empty prompt on one character would pull the
    # unconditional prediction (which guidance uses for every prompt) towards that character.
    prior = [*base_concepts(cfg.held_out), *(extra_prior or [])] if cfg.prior_per_class else None
    task = DemoTask(
        [Concept(name, digit)],
        prior=prior,
        prior_per_class=cfg.prior_per_class,
        model=model,
        spec=spec,
        data=data,
        caption_dropout=0.0,
    )
    out = Path(cfg.output_dir) / run_name
    tcfg = config_from_mapping(
        {
            "model_type": "demo",
            "model_path": str(base_path),
            "ff": cfg.ff,
            "ffid": ffid,
            "selector": cfg.selector,
            "learning_rate": cfg.learning_rate,
            "lr_scheduler": "constant",
            "max_grad_norm": 1.0,
            "max_train_steps": cfg.steps,
            "batch_size": cfg.batch_size,
            "seed": cfg.seed + ffid,
            "output_dir": str(out),
            "output_name": run_name,
            "logging_dir": str(Path(cfg.output_dir) / "logs"),
            "base_deltas": [str(p) for p in base_deltas],
            # on for the preserved variant only, so plain and rehearsed show what happens without it
            "preserve": "on" if preserve else "off",
            "preserve_weight": cfg.preserve_weight,
            "preserve_items": cfg.preserve_items,
            "task_args": {
                "concepts": {name: digit},
                "caption_dropout": 0.0,
                **(
                    {"prior": {c.name: c.digit for c in prior}, "prior_per_class": cfg.prior_per_class}
                    if prior
                    else {}
                ),
            },
            "progress": cfg.progress,
        }
    )
    result = train(tcfg, task, model)
    sel = result.selection
    info = {
        "run": run_name,
        "rehearsed": [c.name for c in extra_prior or []],
        "preserved": preserve,
        "ffid": ffid,
        "digit": digit,
        "delta": str(result.final),
        "trainable": sel.selected if sel is not None else None,
        "total_params": sel.total_params if sel is not None else None,
        "fingerprint": sel.fingerprint if sel is not None else None,
        "steps": result.steps,
        "final_loss": sum(result.losses[-20:]) / max(1, len(result.losses[-20:])),
    }
    result.handle.detach()
    assert result.final is not None
    return result.final, result.losses, info


def model_with_deltas(base_path: Path, deltas: list[Path]) -> torch.nn.Module:
    """The base with deltas written in (what a user gets by loading base + delta files)."""
    from ..checkpoint import apply_delta

    model, _ = load_model(base_path)
    for delta in deltas:
        apply_delta(model, delta)
    return model.eval()


def run_demo(cfg: DemoConfig, console: Any = None) -> DemoResult:
    """Run the whole demo (see module docstring); returns the report it wrote."""
    from ..checkpoint import merge_checkpoint
    from ..train.io import atomic_write_bytes
    from ..train.monitor import format_bytes, peak_memory

    cfg.validate()
    console = console or _console()
    log: Callable[[str], None] = console.print
    t_start = time.perf_counter()
    set_determinism(cfg.seed, cfg.threads)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    data = load_digit_images(cfg.spec.image_size)
    probe = build_model(cfg.spec, seed=cfg.seed)
    total = _param_count(probe)
    weight_bytes = sum(p.numel() * p.element_size() for p in probe.parameters())
    del probe
    trainable = round(cfg.ff * total)
    log(
        f"[bold]ffid demo[/]: tiny Wan DiT (diffusers WanTransformer3DModel, {cfg.spec.layers} blocks, "
        f"dim {cfg.spec.dim}) on scikit-learn's real handwritten digits, {cfg.spec.image_size}x"
        f"{cfg.spec.image_size} as 1-frame videos\n"
        f"  model params {total:,} ({format_bytes(weight_bytes)}); each character trains "
        f"--ff {cfg.ff} = ~{trainable:,} weights ({cfg.ff:.2%}) with selector {cfg.selector}, "
        f"ids {cfg.ffid1} and {cfg.ffid2}\n"
        f"  character1 = digit {cfg.character1}, character2 = digit {cfg.character2} (both held out of "
        f"pretraining); seed {cfg.seed}, {cfg.threads} threads; {peak_memory(torch.device('cpu'))}\n"
        f"  output: {out.resolve()}"
    )

    t0 = time.perf_counter()
    judge = fit_judge(*data, seed=cfg.seed)
    timings["judge"] = time.perf_counter() - t0
    log(f"judge: RBF SVM on real digits, {judge.holdout_accuracy:.1%} accuracy on held-out real scans")

    t0 = time.perf_counter()
    base_path, base_losses, cached = load_or_pretrain(cfg, data, log)
    timings["pretrain"] = time.perf_counter() - t0

    concepts = prompts_for(cfg)
    stages: list[StageScores] = []
    images: dict[str, torch.Tensor] = {}
    sample_dir = out / "samples"

    def score(stage: str, title: str, model: torch.nn.Module) -> StageScores:
        t = time.perf_counter()
        scores, imgs = evaluate(stage, model, cfg, judge, concepts)
        write_grid(imgs, concepts, sample_dir / f"{stage}.png", title)
        stages.append(scores)
        images[stage] = imgs
        timings[f"sample_{stage}"] = time.perf_counter() - t
        log(f"{stage}: " + ", ".join(f"{k} {v:.0%}" for k, v in scores.accuracy.items()))
        return scores

    score("base", "pretrained base", model_with_deltas(base_path, []))

    t0 = time.perf_counter()
    log(f"[bold]3a[/] teaching character1 (digit {cfg.character1}) into --ffid {cfg.ffid1}")
    delta1, losses1, info1 = train_character(
        cfg, "character1", cfg.character1, cfg.ffid1, base_path, [], data
    )
    timings["character1"] = time.perf_counter() - t0
    score("character1", f"base + character1 (ffid {cfg.ffid1})", model_with_deltas(base_path, [delta1]))

    # 3b, once per variant, each from the same base + character1 state: the trainer starts from
    # the base file plus delta1 every time, so the variants differ only by their data.
    deltas2: dict[str, Path] = {}
    losses2: dict[str, list[float]] = {}
    infos2: dict[str, dict[str, Any]] = {}
    models2: dict[str, torch.nn.Module] = {}
    for variant in cfg.character2_variants:
        t0 = time.perf_counter()
        rehearsed = variant == "rehearsed"
        how = {
            "plain": ", its own data only",
            "rehearsed": ", with character1's scans rehearsed",
            "preserved": ", its own data only, preserving base + character1 (no character1 scans)",
        }[variant]
        log(
            f"[bold]3b {variant}[/] teaching character2 (digit {cfg.character2}) into --ffid {cfg.ffid2} "
            "on top of character1" + how
        )
        deltas2[variant], losses2[variant], infos2[variant] = train_character(
            cfg,
            "character2",
            cfg.character2,
            cfg.ffid2,
            base_path,
            [delta1],
            data,
            [Concept("character1", cfg.character1)] if rehearsed else None,
            run_name=f"character2-{variant}",
            preserve=variant == "preserved",
        )
        timings[f"character2_{variant}"] = time.perf_counter() - t0
        models2[variant] = model_with_deltas(base_path, [delta1, deltas2[variant]])
        score(
            f"character2_{variant}",
            f"base + character1 + character2 {variant} (ffids {cfg.ffid1}, {cfg.ffid2})",
            models2[variant],
        )
    merged_variant = cfg.character2_variants[-1]

    t0 = time.perf_counter()
    merged_path = out / "merged" / "demo-merged.safetensors"
    merged_path.parent.mkdir(parents=True, exist_ok=True)
    if merged_path.exists():
        merged_path.unlink()  # the merge tool refuses to overwrite; this run owns the file
    merge_checkpoint(base_path, [delta1, deltas2[merged_variant]], merged_path)
    merged, _ = load_model(merged_path)
    timings["merge"] = time.perf_counter() - t0
    merged_same = all(
        torch.equal(a, b)
        for a, b in zip(
            merged.state_dict().values(), models2[merged_variant].state_dict().values(), strict=True
        )
    )
    score("merged", f"merged checkpoint (base + character1 + character2 {merged_variant})", merged.eval())

    plot_all_losses(
        {
            "pretraining (base)": base_losses,
            "character1 (ffid)": losses1,
            **{f"character2 {v} (ffid)": losses2[v] for v in cfg.character2_variants},
        },
        out / "loss.png",
    )
    report = build_report(
        cfg, stages, info1, infos2, judge, total, merged_same, cached, timings, base_path, merged_path
    )
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    report["peak_memory"] = peak_memory(torch.device("cpu"))
    atomic_write_bytes(out / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    atomic_write_bytes(out / "report.md", render_markdown(report).encode())
    console.print(render_table(report))
    log(
        f"wrote {out / 'report.md'}, {out / 'report.json'}, {sample_dir}/*.png, {out / 'loss.png'}, "
        f"TensorBoard logs in {out / 'logs'}; total {report['seconds']:.0f} s"
    )
    return DemoResult(out, report, stages, report["seconds"])


# -- report -------------------------------------------------------------------------------------
def build_report(
    cfg: DemoConfig,
    stages: list[StageScores],
    info1: dict[str, Any],
    infos2: dict[str, dict[str, Any]],
    judge: DigitJudge,
    total: int,
    merged_same: bool,
    cached: bool,
    timings: dict[str, float],
    base_path: Path,
    merged_path: Path,
) -> dict[str, Any]:
    """The numbers the demo is about, as plain JSON-ready values.

    The summary's unsuffixed 3b keys describe the character2 variant that was merged (the
    recommended one when both ran); ``*_plain`` / ``*_rehearsed`` keys give each variant trained.
    """
    by = {s.name: s.accuracy for s in stages}
    variants = cfg.character2_variants
    merged_variant = variants[-1]
    base_names = [c.name for c in base_concepts(cfg.held_out)]

    def mean(stage: str) -> float:
        return sum(by[stage][n] for n in base_names) / len(base_names)

    after = f"character2_{merged_variant}"
    summary: dict[str, Any] = {
        "character1_before": by["base"]["character1"],
        "character1_after_3a": by["character1"]["character1"],
        "character1_after_3b": by[after]["character1"],
        "character2_before": by["base"]["character2"],
        "character2_after_3b": by[after]["character2"],
        "base_classes_before": mean("base"),
        "base_classes_after_3a": mean("character1"),
        "base_classes_after_3b": mean(after),
        "merged_equals_deltas": merged_same,
    }
    for v in variants:
        summary[f"character1_after_3b_{v}"] = by[f"character2_{v}"]["character1"]
        summary[f"character2_after_3b_{v}"] = by[f"character2_{v}"]["character2"]
        summary[f"base_classes_after_3b_{v}"] = mean(f"character2_{v}")
    return {
        "config": {**{k: v for k, v in asdict(cfg).items() if k != "spec"}, "spec": cfg.spec.to_dict()},
        "model_params": total,
        "judge_holdout_accuracy": judge.holdout_accuracy,
        "summary": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()},
        "stages": {s.name: {k: round(v, 4) for k, v in s.accuracy.items()} for s in stages},
        "predictions": {s.name: s.predictions for s in stages},
        "character2_variants": variants,
        "character2_merged": merged_variant,
        "characters": {
            "character1": info1,
            "character2": infos2[merged_variant],
            **{f"character2_{v}": infos2[v] for v in variants},
        },
        "files": {
            "base": str(base_path),
            "base_cached": cached,
            "delta1": info1["delta"],
            "delta2": infos2[merged_variant]["delta"],
            **{f"delta2_{v}": infos2[v]["delta"] for v in variants},
            "merged": str(merged_path),
        },
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "threads": cfg.threads,
    }


def _base_mean(accuracy: dict[str, float]) -> float:
    values = [v for k, v in accuracy.items() if not k.startswith("character")]
    return sum(values) / len(values)


STAGE_TITLES = {
    "base": "base",
    "character1": "3a +char1",
    "character2_plain": "3b plain",
    "character2_rehearsed": "3b rehearsed",
    "character2_preserved": "3b preserved",
    "merged": "merged",
}


def render_table(report: dict[str, Any]) -> Any:
    """The per-prompt accuracy table (rich) printed at the end of the demo."""
    from rich.table import Table

    cfg = report["config"]
    table = Table(
        title=f"judge accuracy per prompt (share of {cfg['samples']} samples classified as the "
        "intended digit)"
    )
    table.add_column("prompt")
    table.add_column("digit", justify="right")
    for stage in report["stages"]:
        table.add_column(STAGE_TITLES.get(stage, stage), justify="right")
    digits = {
        **{w: i for i, w in enumerate(DIGIT_WORDS)},
        "character1": cfg["character1"],
        "character2": cfg["character2"],
    }
    names = list(next(iter(report["stages"].values())))
    for name in names:
        style = "bold" if name.startswith("character") else None
        table.add_row(
            f"a digit {name}",
            str(digits[name]),
            *[f"{report['stages'][s][name]:.0%}" for s in report["stages"]],
            style=style,
        )
    s = report["summary"]
    table.add_section()
    table.add_row(
        "[bold]base classes (mean)",
        "",
        *[f"{_base_mean(report['stages'][st]):.0%}" for st in report["stages"]],
    )
    kept = ", ".join(
        f"{v}: character1 kept {s[f'character1_after_3b_{v}']:.0%}, character2 "
        f"{s[f'character2_after_3b_{v}']:.0%}, base classes {s[f'base_classes_after_3b_{v}']:.0%}"
        for v in report["character2_variants"]
    )
    table.caption = (
        f"character1 {s['character1_before']:.0%} -> {s['character1_after_3a']:.0%} (3a); after 3b "
        f"{kept}; merged file ({report['character2_merged']}) == base+deltas: "
        f"{s['merged_equals_deltas']}"
    )
    return table


def render_markdown(report: dict[str, Any]) -> str:
    """``report.md``: the same numbers as the terminal table, plus the setup and timings."""
    cfg, s = report["config"], report["summary"]
    variants, merged_variant = report["character2_variants"], report["character2_merged"]
    stages = list(report["stages"])
    how = {
        "plain": "character2's data is its own scans and the base classes only (the seed's recipe)",
        "rehearsed": "character1's real scans are also mixed into character2's data (rehearsal)",
        "preserved": "no character1 scans; a preservation loss (weight "
        f"{cfg.get('preserve_weight', 16.0)}, {cfg.get('preserve_items', 8)} pure-noise inputs per step) "
        "keeps the predictions for character1's recorded prompt, the empty prompt and the base "
        "prompts close to base + character1 (recommended)",
    }
    names = list(report["stages"][stages[0]])
    lines = [
        "# ffid demo report",
        "",
        f"Tiny Wan DiT ({report['model_params']:,} params) pretrained on scikit-learn's real digits; "
        f"character1 = digit {cfg['character1']} taught with `--ff {cfg['ff']} --ffid {cfg['ffid1']}`, "
        f"character2 = digit {cfg['character2']} with `--ffid {cfg['ffid2']}` on top, "
        f"{' and '.join(variants)} from the same state "
        f"(selector `{cfg['selector']}`, {cfg['steps']} steps each, lr {cfg['learning_rate']}, "
        f"seed {cfg['seed']}). Each character's data: the real scans of its digit plus "
        f"{cfg['prior_per_class']} real scans of each base class with their own prompts "
        "(regularisation). 3b "
        + "; 3b ".join(f"{v}: {how[v]}" for v in variants)
        + f". The merged checkpoint holds character1 and the {merged_variant} character2.",
        f"Samples are judged by an RBF SVM trained on real digits only "
        f"({report['judge_holdout_accuracy']:.1%} on held-out real scans); {cfg['samples']} samples per "
        "prompt, "
        f"{cfg['sample_steps']} Euler steps, guidance {cfg['guidance']}.",
        "",
        "## Summary",
        "",
        "| measure | " + " | ".join(f"3b {v}" for v in variants) + " |",
        "|---|" + "---|" * len(variants),
    ]

    def row(label: str, value: Callable[[str], str]) -> None:
        lines.append(f"| {label} | " + " | ".join(value(v) for v in variants) + " |")

    row("character1 accuracy before training", lambda v: f"{s['character1_before']:.1%}")
    row("character1 accuracy after 3a", lambda v: f"{s['character1_after_3a']:.1%}")
    row("character1 accuracy after 3b (retention)", lambda v: f"{s[f'character1_after_3b_{v}']:.1%}")
    row("character2 accuracy before training", lambda v: f"{s['character2_before']:.1%}")
    row("character2 accuracy after 3b", lambda v: f"{s[f'character2_after_3b_{v}']:.1%}")
    row("base-class accuracy before", lambda v: f"{s['base_classes_before']:.1%}")
    row("base-class accuracy after 3a", lambda v: f"{s['base_classes_after_3a']:.1%}")
    row(
        "base-class accuracy after 3b (damage = before - after)",
        lambda v: f"{s[f'base_classes_after_3b_{v}']:.1%}",
    )
    row(
        "merged checkpoint identical to base + both deltas",
        lambda v: str(s["merged_equals_deltas"]) if v == merged_variant else "(not merged)",
    )
    lines += [
        "",
        "## Per prompt",
        "",
        "| prompt | " + " | ".join(STAGE_TITLES.get(st, st) for st in stages) + " |",
        "|---|" + "---|" * len(stages),
    ]
    for name in names:
        lines.append(
            f"| a digit {name} | " + " | ".join(f"{report['stages'][st][name]:.0%}" for st in stages) + " |"
        )
    c1 = report["characters"]["character1"]
    lines += [
        "",
        "## Files",
        "",
        f"- base: `{report['files']['base']}` "
        f"({'from cache' if report['files']['base_cached'] else 'pretrained now'})",
        f"- character1 delta: `{c1['delta']}` ({c1['trainable']:,} weights, fingerprint {c1['fingerprint']})",
        *[
            f"- character2 {v} delta: `{c['delta']}` ({c['trainable']:,} weights, "
            f"fingerprint {c['fingerprint']})"
            for v, c in ((v, report["characters"][f"character2_{v}"]) for v in variants)
        ],
        f"- merged (character1 + character2 {merged_variant}): `{report['files']['merged']}`",
        "- sample grids: " + ", ".join(f"`samples/{st}.png`" for st in stages),
        "- loss curves: `loss.png`; TensorBoard: `tensorboard --logdir logs`",
        "",
        "## Time",
        "",
        f"Total {report['seconds']:.0f} s on {report['threads']} threads ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in report["timings_s"].items())
        + f"); {report['peak_memory']}.",
        "",
    ]
    return "\n".join(lines)


def quick_config(**overrides: Any) -> DemoConfig:
    """A shortened demo (small model, few steps) for tests and a first look."""
    values: dict[str, Any] = {**QUICK, **overrides}
    return DemoConfig(**values)


__all__ = [
    "DemoConfig",
    "DemoResult",
    "StageScores",
    "evaluate",
    "load_or_pretrain",
    "pretrain",
    "quick_config",
    "run_demo",
    "train_character",
    "write_grid",
]
