"""ffid inside the trainers people already run.

- :mod:`ffid.integrations.musubi`: a ``--network_module`` for an unmodified musubi-tuner
  (``wan_train_network.py ... --network_module ffid.integrations.musubi --network_args "ff=0.01" "ffid=1"``).
- :mod:`ffid.integrations.hf`: ``attach_to_trainer()`` / ``FfidTrainer`` so a transformers ``Trainer``
  trains only the selected elements, saves deltas at its checkpoints and resumes.
- :mod:`ffid.integrations.diffusers`: attach to ``pipe.transformer`` and apply a delta for inference.

Each submodule imports its trainer library lazily, so importing this package costs nothing.
"""

from __future__ import annotations

__all__ = ["diffusers", "hf", "musubi"]
