"""The demo's ffid stages: teach a character into its slice through :func:`ffid.train.train`
(the same path as ``ffid train --model_type demo``), and rebuild base + deltas for judging."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .config import DemoConfig
from .data import Concept
from .task import DemoTask, base_concepts, load_model


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
    # the method's recipe (projection: its own selection, budget and rate, for every run)
    recipe = cfg.run_recipe(preserve)
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
            **recipe,
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


def train_character2(
    cfg: DemoConfig, variant: str, base_path: Path, delta1: Path, data: tuple[torch.Tensor, torch.Tensor]
) -> tuple[Path, list[float], dict[str, Any]]:
    """Teach character2 into ``cfg.ffid2`` on top of base + ``delta1`` the ``variant`` way:
    ``plain`` (its own data), ``rehearsed`` (character1's scans mixed in) or ``preserved`` (no
    character1 data; the preservation loss). Outputs go to ``character2-{variant}``."""
    return train_character(
        cfg,
        "character2",
        cfg.character2,
        cfg.ffid2,
        base_path,
        [delta1],
        data,
        [Concept("character1", cfg.character1)] if variant == "rehearsed" else None,
        run_name=f"character2-{variant}",
        preserve=variant == "preserved",
    )


def model_with_deltas(base_path: Path, deltas: list[Path]) -> torch.nn.Module:
    """The base with deltas written in (what a user gets by loading base + delta files)."""
    from ..checkpoint import apply_delta

    model, _ = load_model(base_path)
    for delta in deltas:
        apply_delta(model, delta)
    return model.eval()
