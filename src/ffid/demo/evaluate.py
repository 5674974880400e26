"""Judging a stage: sample every prompt with fixed seeds and let the real-digit classifier say
which digit each sample is; a prompt's score is the share classified as its own digit."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .classifier import DigitJudge
from .config import DemoConfig
from .data import Concept
from .model import sample
from .task import base_concepts


@dataclass
class StageScores:
    """Judge results for one stage: per prompt, the share of samples classified as its digit."""

    name: str
    accuracy: dict[str, float]
    predictions: dict[str, list[int]]


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
