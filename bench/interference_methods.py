"""How each method of bench/interference.py trains: the demo's config and task, the step of
every method on top of its character1, and sequential LoRA / full FT.

bench/interference_run.py times and probes these steps, bench/stack.py reuses the config, the
LoRA sizing and the sequential training for N characters.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from compare_methods import ADAPTER_TARGETS

METHODS = ("ffid plain", "ffid rehearsed", "ffid preserved", "ffid preserved compat-v2", "lora", "full")
# Learning rates of the baselines: each one's best of bench/compare.py's grid (same model family,
# same loss, AdamW): LoRA 1e-2, full FT 1e-3 (ffid's 3e-2 is far too high for full FT there).
LORA_LR = 1e-2
FULL_LR = 1e-3


# ---------------------------------------------------------------------------------------------
# Setup shared by the training, the timing and the memory probes
# ---------------------------------------------------------------------------------------------


def demo_config(seed: int, quick: bool, work: Path, cache: Path, threads: int) -> Any:
    from ffid.demo.config import DemoConfig, quick_config

    kw = {
        "seed": seed,
        "output_dir": str(work),
        "cache_dir": str(cache),
        "progress": False,
        "threads": threads,
    }
    # --quick: the demo's quick shape, cut further so the smoke test stays well under a minute
    quick_kw = {"pretrain_steps": 8, "steps": 4, "batch_size": 8, "samples": 4, "sample_steps": 3}
    quick_kw["prior_per_class"] = 4
    return quick_config(**kw, **quick_kw) if quick else DemoConfig(**kw)


def character_task(cfg: Any, name: str, digit: int, model: Any, data: Any, extra: Sequence[Any] = ()) -> Any:
    """The task ``train_character`` builds: the character's scans plus the base classes' prior."""
    from ffid.demo.data import Concept
    from ffid.demo.task import DemoTask, base_concepts

    prior = [*base_concepts(cfg.held_out), *extra] if cfg.prior_per_class else None
    return DemoTask(
        [Concept(name, digit)],
        prior=prior,
        prior_per_class=cfg.prior_per_class,
        model=model,
        spec=cfg.spec,
        data=data,
        caption_dropout=0.0,
    )


def lora_rank(model: Any, k: int) -> int:
    """LoRA rank whose trainable count (``r * (in + out)`` per adapted Linear) is closest to ``k``,
    on the same Linears as bench/compare.py (every attention and FFN Linear of the blocks)."""
    import re

    import torch

    pattern = re.compile(ADAPTER_TARGETS)
    per_rank = sum(
        m.in_features + m.out_features
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and pattern.fullmatch(n)
    )
    return max(1, round(k / per_rank))


def matched_lora_rank(model: Any, ff: float, ffid_no: int, selector: str) -> int:
    """LoRA rank matched to the trainable count of ffid's selection ``(ff, ffid_no, selector)``."""
    import ffid

    return lora_rank(model, ffid.plan(model, ff, ffid_no, selector).selected)


def add_lora(model: Any, rank: int) -> Any:
    from peft import LoraConfig, get_peft_model

    # alpha = r, as in bench/compare.py: the update is B @ A unscaled.
    return get_peft_model(
        model, LoraConfig(r=rank, lora_alpha=rank, target_modules=ADAPTER_TARGETS, lora_dropout=0.0)
    )


class Stepper:
    """One method's training step on a ready model, as ``ffid.train`` does it: task loss, backward,
    the preservation term (its own backward), gradient clipping at 1.0, AdamW, zero_grad."""

    def __init__(
        self,
        model: Any,
        params: list[Any],
        lr: float,
        task: Any,
        seed: int,
        handle: Any = None,
        preserver: Any = None,
    ):
        import torch

        self.model, self.params, self.task, self.handle, self.preserver = (
            model,
            params,
            task,
            handle,
            preserver,
        )
        opt = torch.optim.AdamW(params, lr=lr)  # torch defaults, as ffid.train's AdamW
        self.opt = handle.guard(opt) if handle is not None else opt
        self.generator = torch.Generator().manual_seed(seed * 7919)
        self.step_no = 0
        model.train()

    def step(self, batch: dict[str, Any]) -> float:
        import torch

        loss = self.task.loss(self.model, batch, self.generator)
        loss.backward()
        if self.preserver is not None:
            kept = self.preserver.step(self.model, self.step_no, self.generator)
            if kept is not None:
                kept.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step_no += 1
        return float(loss.detach())


def make_stepper(
    method: str, cfg: Any, base_path: Path, delta1: dict[str, Path], data: Any, lrs: dict[str, float]
) -> Stepper:
    """A character2 step of ``method`` on top of its character1 (for timing and memory probes)."""
    import ffid
    from ffid.checkpoint import apply_delta
    from ffid.demo.data import Concept
    from ffid.demo.task import load_model
    from ffid.preserve import Preserver, PreserveSettings, protected_prompts

    model, _ = load_model(base_path)
    seed = cfg.seed + cfg.ffid2
    if method.startswith("ffid"):
        d1 = delta1["compat-v2" if method.endswith("compat-v2") else "spread"]
        apply_delta(model, d1)
        extra = [Concept("character1", cfg.character1)] if method == "ffid rehearsed" else []
        task = character_task(cfg, "character2", cfg.character2, model, data, extra)
        selector = "compat-v2" if method.endswith("compat-v2") else cfg.selector
        handle = ffid.attach(model, ff=cfg.ff, ffid=cfg.ffid2, selector=selector)
        preserver = None
        if "preserved" in method:
            protected = protected_prompts([d1], regularisation=task.regularisation_prompts(None))
            preserver = Preserver(
                handle, task, protected, PreserveSettings(cfg.preserve_weight, cfg.preserve_items)
            )
        params = [p for p in handle.parameters() if p.requires_grad]
        return Stepper(model, params, cfg.learning_rate, task, seed, handle, preserver)
    task = character_task(cfg, "character2", cfg.character2, model, data)
    if method == "lora":
        for p in model.parameters():
            p.requires_grad_(False)
        wrapped = add_lora(model, matched_lora_rank(model, cfg.ff, cfg.ffid2, cfg.selector))
        params = [p for p in wrapped.parameters() if p.requires_grad]
        return Stepper(wrapped, params, lrs["lora"], task, seed)
    assert method == "full"
    return Stepper(model, list(model.parameters()), lrs["full"], task, seed)


def first_batch(cfg: Any, data: Any) -> dict[str, Any]:
    """Character2's first batch (the same for every method in the timing and memory probes)."""
    from ffid.train.data import BatchOrder

    task = character_task(cfg, "character2", cfg.character2, None, data)
    dataset = task.dataset(None)
    _, _, ids = next(BatchOrder(len(dataset), cfg.batch_size, cfg.seed + cfg.ffid2).iterate(0, 0))
    return task.collate([dataset[i] for i in ids])


# ---------------------------------------------------------------------------------------------
# Sequential LoRA / full FT (their own loop, same data order and randomness as ffid.train)
# ---------------------------------------------------------------------------------------------


def train_dense(
    method: str, cfg: Any, model: Any, name: str, digit: int, ffid_no: int, data: Any, lr: float
) -> tuple[Any, list[float]]:
    """Teach ``name`` by LoRA (merged into the weights afterwards) or full FT; returns the model."""
    import torch

    from ffid.train.data import BatchOrder

    task = character_task(cfg, name, digit, model, data)
    dataset = task.dataset(None)
    seed = cfg.seed + ffid_no  # what train_character gives ffid.train: same batches, same noise
    torch.manual_seed(seed)
    if method == "lora":
        for p in model.parameters():
            p.requires_grad_(False)
        train_model = add_lora(model, matched_lora_rank(model, cfg.ff, ffid_no, cfg.selector))
        params = [p for p in train_model.parameters() if p.requires_grad]
    else:
        for p in model.parameters():
            p.requires_grad_(True)
        train_model, params = model, list(model.parameters())
    stepper = Stepper(train_model, params, lr, task, seed)
    batches = BatchOrder(len(dataset), cfg.batch_size, seed).iterate(0, 0)
    losses = []
    for _ in range(cfg.steps):
        _, _, ids = next(batches)
        losses.append(stepper.step(task.collate([dataset[i] for i in ids])))
    if method == "lora":
        model = train_model.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), losses
