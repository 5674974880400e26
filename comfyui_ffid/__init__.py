"""ffid for ComfyUI: load ffid deltas (selective full finetunes) onto a model like a LoRA, with a strength.

Install: clone or copy this folder into ComfyUI's ``custom_nodes/`` and ``pip install ffid`` into
ComfyUI's Python; put delta files in ``models/loras``. See README.md here and docs/comfyui.md in ffid.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
