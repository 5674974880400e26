"""ComfyUI's entry point when this whole repository is cloned into ``ComfyUI/custom_nodes/``.

The nodes live in ``comfyui_ffid/`` (see docs/comfyui.md); this file only hands them to ComfyUI,
so that ``git clone <ffid> ComfyUI/custom_nodes/ffid`` works as well as linking that folder.
ffid itself must still be installed into ComfyUI's Python (``pip install ComfyUI/custom_nodes/ffid``).
It is not part of the ``ffid`` Python package (``src/ffid``). Outside ComfyUI (a test runner that
imports the repository root, say) it provides no nodes and imports nothing.
"""

import importlib.util

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

if importlib.util.find_spec("folder_paths") is not None and __package__:  # inside ComfyUI
    from .comfyui_ffid import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
