"""Preservation: keep what earlier ids taught while a new id trains, without their data.

Two methods protect the same prompts (:mod:`.prompts`: earlier deltas' recorded prompts, the
user's, the regularisation prompts, the empty prompt):

- ``projection`` (:mod:`.projection`): every trained row's change is kept off the inputs the
  layer sees for the protected prompts, so their answers stay by construction. Trains whole rows
  (the ``rows`` selector); one feature pass before training, no extra forward per step.
- ``loss`` (:mod:`.loss`): a distance to the teacher (base + earlier deltas) added to the loss;
  any selection, one teacher and one student forward of protected items per step, a seesaw
  between the new character and the old ones.
"""

from __future__ import annotations

from .loss import (
    DEFAULT_WEIGHT,
    Preservable,
    Preserver,
    PreserveSettings,
    PreserveStep,
    TextPreservation,
    mse_per_item,
)
from .projection import METHODS, ProjectionSettings, ProjectionSource, ProjectionStats, Projector
from .prompts import (
    EMPTY_LABEL,
    MAX_RECORDED,
    PROMPTS_KEY,
    TRIGGER_KEY,
    Protected,
    prompt_metadata,
    protected_prompts,
    recorded_prompts,
)

__all__ = [
    "DEFAULT_WEIGHT",
    "EMPTY_LABEL",
    "MAX_RECORDED",
    "METHODS",
    "PROMPTS_KEY",
    "TRIGGER_KEY",
    "Preservable",
    "PreserveSettings",
    "PreserveStep",
    "Preserver",
    "ProjectionSettings",
    "ProjectionSource",
    "ProjectionStats",
    "Projector",
    "Protected",
    "TextPreservation",
    "mse_per_item",
    "prompt_metadata",
    "protected_prompts",
    "recorded_prompts",
]
