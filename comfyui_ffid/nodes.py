"""The ComfyUI nodes: load an ffid delta onto a model with a strength, and show what a delta holds."""

from __future__ import annotations

import json
import logging
import os
import weakref

import folder_paths

from .ffid_patch import (
    FILE_DTYPES,
    DeltaMismatch,
    LoadedDelta,
    add_delta,
    check_strength,
    infer_file_dtype,
    overlap_count,
    read_delta,
)

log = logging.getLogger("ffid.comfyui")

# Metadata keys shown first by the info node: what to write in the prompt.
PROMPT_KEYS = ("ffid.trigger_words", "ffid.prompts", "ffid.captions", "ffid.trigger_prompts")


def _file_key(path: str) -> tuple[str, int, int]:
    st = os.stat(path)
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns)


def _delta_path(delta_name: str) -> str:
    return folder_paths.get_full_path_or_raise("loras", delta_name)


class FfidLoadDeltaModelOnly:
    """Apply an ffid delta to a diffusion model like a LoRA: only the trained positions change.

    At strength 1.0 the weights equal ``ffid merge`` of the delta into the model file, loaded by
    ComfyUI; at strength S they equal ``ffid merge --multiplier S``. Chain several nodes for
    several deltas (trained with different ``--ffid``, so their positions do not overlap).
    """

    DESCRIPTION = (
        "Applies an ffid delta (selective full finetune) to the model, like a LoRA. Strength 1.0 gives the "
        "trained model exactly (as `ffid merge`), 0.5 is halfway between base and trained. Chain nodes for "
        "several characters."
    )
    CATEGORY = "loaders/ffid"
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with the delta applied when it runs (ComfyUI's own patching).",)
    FUNCTION = "load_delta"

    def __init__(self):
        # the last delta read (as LoraLoader keeps its last LoRA): file key, model it was read for, patches
        self._cache: tuple[tuple, weakref.ref, LoadedDelta] | None = None

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model the delta was trained from."}),
                "delta_name": (
                    folder_paths.get_filename_list("loras"),
                    {"tooltip": "An ffid delta file (*.safetensors) in ComfyUI's loras folder."},
                ),
                "strength": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": -4.0,
                        "max": 4.0,
                        "step": 0.01,
                        "tooltip": "1.0: the trained values; 0.0: the base model; in between: linear "
                        "(ffid merge --multiplier).",
                    },
                ),
            },
            "optional": {
                "verify": (
                    ["on", "off"],
                    {
                        "default": "on",
                        "tooltip": "Check the delta's base fingerprint against the model (refuses a delta "
                        "made for another base). fp8 and GGUF-quantized weights cannot be checked exactly.",
                    },
                ),
                "file_dtype": (
                    ["auto", "bf16", "fp16", "fp32"],
                    {
                        "default": "auto",
                        "tooltip": "The dtype of the model file: results are rounded to it, as a merged file "
                        "would be. auto tells it from the weights.",
                    },
                ),
            },
        }

    def load_delta(self, model, delta_name, strength, verify="on", file_dtype="auto"):
        try:
            strength = check_strength(strength)
        except DeltaMismatch as exc:
            raise ValueError(str(exc)) from None
        if strength == 0:
            return (model,)
        path = _delta_path(delta_name)
        fdt = infer_file_dtype(model) if file_dtype == "auto" else FILE_DTYPES[file_dtype]
        key = (_file_key(path), str(fdt), verify)
        cached = self._cache
        # The patches were checked against (and keyed for) one model object: reuse them only for it.
        if cached is not None and cached[0] == key and cached[1]() is model.model:
            loaded = cached[2]
        else:
            self._cache = None
            try:
                loaded = read_delta(path, model, fdt, verify == "on")
            except DeltaMismatch as exc:
                raise ValueError(str(exc)) from None
            self._cache = (key, weakref.ref(model.model), loaded)
        overlap = overlap_count(model, loaded)
        if overlap:
            log.warning(
                "ffid: %s shares %d positions with a delta already on this model; there the later node's "
                "values win (ffid merge --allow-overlap would add both changes instead)",
                delta_name,
                overlap,
            )
        for note in loaded.notes:
            log.warning("ffid: %s: %s", delta_name, note)
        try:
            patched = add_delta(model, loaded, strength)
        except DeltaMismatch as exc:
            raise ValueError(str(exc)) from None
        log.info(
            "ffid: %s at strength %s: %d tensors, %.1f MiB held (file %.1f MiB), results rounded to %s",
            delta_name,
            strength,
            len(loaded.patches),
            loaded.nbytes / 2**20,
            loaded.file_bytes / 2**20,
            str(fdt).replace("torch.", ""),
        )
        return (patched,)


def _pretty(value: str) -> str:
    try:
        obj = json.loads(value)
    except (TypeError, ValueError):
        return value
    if isinstance(obj, (dict, list)):
        return json.dumps(obj, indent=2, ensure_ascii=False)
    return value


def describe_delta(path: str) -> str:
    """A plain-text summary of a delta: trigger words / prompts first, then every ``ffid.*`` key."""
    from ffid.checkpoint import DeltaFile

    with DeltaFile(path) as df:
        meta = dict(df.metadata)
        info = df.info
        tensors = len(df.names)
        text = df.text  # stored text encodings: for later runs' preservation, not for this node
    lines = [f"ffid delta {os.path.basename(path)} ({os.path.getsize(path) / 2**20:.1f} MiB)"]
    for k in PROMPT_KEYS:
        if meta.get(k):
            label = k.split(".", 1)[1].replace("_", " ")
            lines.append(f"{label}:\n{_pretty(meta[k])}")
    if not any(meta.get(k) for k in PROMPT_KEYS):
        lines.append("trigger words / prompts: not recorded in this delta")
    ffid_id = "-" if info.ffid is None else info.ffid
    ff = "-" if info.ff is None else info.ff
    lines.append(f"ffid id: {ffid_id}   ff: {ff}   selector: {info.selector or '-'}")
    lines.append(f"source: {info.source or '-'}")
    lines.append(f"tensors: {tensors}   values: {info.selected:,}   value dtype: {info.value_dtype}")
    lines.append(f"naming: {info.naming}")
    if text is not None:
        lines.append(
            f"text encodings: {text.count} prompt(s) stored ({text.nbytes / 2**20:.1f} MiB), used only by "
            "training runs that protect this character"
        )
    if meta.get("modelspec.architecture"):
        lines.append(f"architecture: {meta['modelspec.architecture']}")
    lines.append("metadata:")
    skip = {"ffid.base_fingerprint", "ffid.text_prompts", *PROMPT_KEYS}
    for k in sorted(meta):
        if k.startswith("ffid.") and k not in skip:
            lines.append(f"  {k}: {_pretty(meta[k])}")
    lines.append(f"  ffid.base_fingerprint: {len(info.base_fingerprint)} tensors, digest {info.base_digest}")
    for k in sorted(meta):
        if k.startswith("ss_"):
            lines.append(f"  {k}: {meta[k]}")
    return "\n".join(lines)


class FfidDeltaInfo:
    """Show what an ffid delta holds: trigger words / prompts recorded by training, ids, ff, metadata."""

    DESCRIPTION = (
        "Shows what an ffid delta holds: the trigger words or prompts it was trained with, its ff and ffid."
    )
    CATEGORY = "loaders/ffid"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("info",)
    FUNCTION = "info"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"delta_name": (folder_paths.get_filename_list("loras"),)}}

    def info(self, delta_name):
        text = describe_delta(_delta_path(delta_name))
        return {"ui": {"text": [text]}, "result": (text,)}


NODE_CLASS_MAPPINGS = {"FfidLoadDeltaModelOnly": FfidLoadDeltaModelOnly, "FfidDeltaInfo": FfidDeltaInfo}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FfidLoadDeltaModelOnly": "Load ffid delta (model only)",
    "FfidDeltaInfo": "ffid delta info",
}
