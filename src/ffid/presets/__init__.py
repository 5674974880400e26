"""Built-in shape presets: manifests of well-known models, usable without the checkpoint.

Shapes are the original Wan checkpoint naming (``blocks.N.self_attn.q.weight``), as musubi-tuner,
ComfyUI and the original Wan code use them. Dtypes are bf16, the usual release precision.
"""

from __future__ import annotations

from ..manifest import Manifest
from .wan import WAN_CONFIGS, wan_manifest

PRESETS: dict[str, str] = {name: cfg.description for name, cfg in WAN_CONFIGS.items()}


def preset_manifest(name: str) -> Manifest:
    """The manifest of the preset ``name`` (see :data:`PRESETS`)."""
    return wan_manifest(name)


__all__ = ["PRESETS", "preset_manifest"]
