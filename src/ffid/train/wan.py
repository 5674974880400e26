"""The ``wan`` task: a diffusers ``WanTransformer3DModel`` trained with flow matching on cached latents.

Wan is a rectified-flow model: ``x_t = (1 - t) x0 + t noise``, the DiT predicts the velocity
``noise - x0`` at ``timestep = 1000 t``. Times ``t`` are drawn as musubi-tuner does:
``shift`` = sigmoid of a normal draw, then shifted by ``discrete_flow_shift``
(``t' = s t / (1 + (s - 1) t)``; 3.0 suits 480p Wan, larger shifts favour noisy times);
``sigmoid`` = the same without the shift; ``uniform`` = ``U(0, 1)``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..dtypes import TRAIN_CODES, torch_dtype, train_dtype
from ..errors import ConfigError, MissingFileError, ModelFileError
from ..preserve import mse_per_item
from .cache import LatentCacheDataset, collate_latents, text_encodings

if TYPE_CHECKING:
    from torch import nn

    from ..preserve import Protected
    from .config import TrainConfig


WAN_TEXT_LEN = 512  # tokens every Wan 2.x prompt is padded to


def sample_times(n: int, cfg: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """``n`` flow-matching times in (0, 1) drawn on the CPU from ``generator``."""
    if cfg.timestep_sampling == "uniform":
        return torch.rand(n, generator=generator)
    t = torch.sigmoid(cfg.sigmoid_scale * torch.randn(n, generator=generator))
    if cfg.timestep_sampling == "shift":
        s = cfg.discrete_flow_shift
        t = s * t / (1 + (s - 1) * t)
    return t


def flow_matching_loss(
    model: nn.Module, latents: torch.Tensor, text: torch.Tensor, cfg: TrainConfig, generator: torch.Generator
) -> torch.Tensor:
    """MSE between the DiT's output and the velocity ``noise - x0`` (noise and t drawn on the CPU)."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device)
    t = sample_times(latents.shape[0], cfg, generator).to(latents.device)
    x0 = latents.float()
    t_b = t.view(-1, *([1] * (x0.ndim - 1)))
    noisy = (1 - t_b) * x0 + t_b * noise
    dtype = next(model.parameters()).dtype
    pred = model(
        hidden_states=noisy.to(dtype),
        timestep=t * 1000,
        encoder_hidden_states=text.to(dtype),
        return_dict=False,
    )[0]
    return F.mse_loss(pred.float(), noise - x0)


def _config_from_shapes(shapes: dict[str, tuple[int, ...]], extra: dict[str, Any]) -> dict[str, Any]:
    """A WanTransformer3DModel config inferred from diffusers-named tensor shapes.

    Shapes cannot tell the head count; Wan always uses 128-wide heads, so that is assumed unless
    ``task_args`` gives ``num_attention_heads`` or ``attention_head_dim``.
    """
    dim, in_ch, *patch = shapes["patch_embedding.weight"]
    layers = 1 + max(int(n.split(".")[1]) for n in shapes if n.startswith("blocks."))
    head_dim = extra.get("attention_head_dim")
    heads = extra.get("num_attention_heads")
    if heads and not head_dim:
        head_dim = dim // int(heads)
    head_dim = int(head_dim or 128)
    if dim % head_dim:
        raise ConfigError(
            f"model width {dim} is not a multiple of attention_head_dim {head_dim}; set "
            "task_args.num_attention_heads (or give a config.json via task_args.config)"
        )
    cfg = {
        "patch_size": tuple(patch),
        "num_attention_heads": dim // head_dim,
        "attention_head_dim": head_dim,
        "in_channels": in_ch,
        "out_channels": shapes["proj_out.weight"][0] // (patch[0] * patch[1] * patch[2]),
        "text_dim": shapes["condition_embedder.text_embedder.linear_1.weight"][1],
        "freq_dim": shapes["condition_embedder.time_embedder.linear_1.weight"][1],
        "ffn_dim": shapes["blocks.0.ffn.net.0.proj.weight"][0],
        "num_layers": layers,
        "cross_attn_norm": "blocks.0.norm2.weight" in shapes,
        "qk_norm": "rms_norm_across_heads" if "blocks.0.attn1.norm_q.weight" in shapes else None,
        "eps": 1e-6,
    }
    if "condition_embedder.image_embedder.ff.net.0.proj.weight" in shapes:
        cfg["image_dim"] = shapes["condition_embedder.image_embedder.ff.net.0.proj.weight"][1]
    if "blocks.0.attn2.add_k_proj.weight" in shapes:
        cfg["added_kv_proj_dim"] = shapes["blocks.0.attn2.add_k_proj.weight"][1]
    for key in ("rope_max_seq_len", "pos_embed_seq_len", "eps"):
        if key in extra:
            cfg[key] = extra[key]
    return cfg


def load_wan_single_file(path: Path, dtype: torch.dtype | None, extra: dict[str, Any]) -> nn.Module:
    """A WanTransformer3DModel from one ``.safetensors`` file in original (Wan/ComfyUI) or diffusers naming.

    diffusers' ``from_single_file`` wants to fetch a config from the Hub; this loader needs no
    network: the config comes from ``task_args.config`` (a diffusers ``config.json`` or its
    folder) or is inferred from the tensor shapes.
    """
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    from ..checkpoint.namemap import DIFFUSERS, detect_naming, map_name
    from ..names import canonical_name

    try:
        raw = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise ModelFileError(f"model file {str(path)!r} is not a readable safetensors file ({exc})") from None
    raw = {canonical_name(k): v for k, v in raw.items()}
    naming = detect_naming(raw)
    state = {map_name(k, naming, DIFFUSERS): v for k, v in raw.items()}
    if extra.get("config"):
        cfg_path = Path(extra["config"])
        cfg_path = cfg_path / "config.json" if cfg_path.is_dir() else cfg_path
        if not cfg_path.is_file():
            raise MissingFileError(f"task_args.config {str(cfg_path)!r} does not exist")
        config = {k: v for k, v in json.loads(cfg_path.read_text()).items() if not k.startswith("_")}
    else:
        try:
            config = _config_from_shapes({k: tuple(v.shape) for k, v in state.items()}, extra)
        except KeyError as exc:
            raise ModelFileError(
                f"{str(path)!r} does not look like a Wan DiT (no {exc}); "
                "give task_args.config or a diffusers model folder"
            ) from None
    from accelerate import init_empty_weights

    # Parameters on meta (no random init of billions of weights); buffers such as the rotary
    # tables are not in the file and are built for real.
    with init_empty_weights(include_buffers=False):
        model = WanTransformer3DModel(**config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ModelFileError(
            f"{str(path)!r} does not match the Wan config: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}; give task_args.config"
        )
    return model.to(dtype) if dtype is not None else model


def stored_dtype(folder: Path) -> torch.dtype | None:
    """The float dtype most of a model folder's stored weights have (read from the headers only)."""
    from collections import Counter

    from ..models import load_manifest

    manifest = load_manifest(folder)
    counts = Counter(manifest[n].dtype for n in manifest.names if manifest[n].dtype in TRAIN_CODES)
    return torch_dtype(counts.most_common(1)[0][0]) if counts else None


class WanTask:
    """Flow matching on cached latents for a diffusers Wan 2.x DiT (see module docstring)."""

    name = "wan"
    # The task_args this task reads; any other key is refused (a typo would be silently ignored).
    task_args_keys = frozenset(
        {"config", "num_attention_heads", "attention_head_dim", "rope_max_seq_len", "pos_embed_seq_len",
         "eps", "text_len"}
    )  # fmt: skip

    def __init__(self) -> None:
        self.cfg: TrainConfig | None = None

    def build_model(self, cfg: TrainConfig) -> nn.Module:
        from diffusers import WanTransformer3DModel

        self.cfg = cfg
        if not cfg.model_path:
            raise ConfigError(
                "model_path (or dit) is not set; give a diffusers Wan transformer folder or file"
            )
        path = Path(cfg.model_path)
        if not path.exists():
            raise MissingFileError(f"model_path {str(path)!r} does not exist")
        dtype = train_dtype(cfg.model_dtype)
        if path.is_file():
            return load_wan_single_file(path, dtype, cfg.task_args)
        if (path / "transformer" / "config.json").is_file():  # a whole pipeline folder
            path = path / "transformer"
        if not (path / "config.json").is_file():
            raise ModelFileError(
                f"{str(path)!r} has no config.json; give a diffusers WanTransformer3DModel folder "
                "(save_pretrained) or a single .safetensors file"
            )
        kwargs: dict[str, Any] = {"local_files_only": True}
        # diffusers upcasts to fp32 unless told; 'auto' keeps what the files store (bf16 for Wan).
        dtype = dtype or stored_dtype(path)
        if dtype is not None:
            kwargs["torch_dtype"] = dtype
        try:
            return WanTransformer3DModel.from_pretrained(str(path), **kwargs)
        except (OSError, ValueError) as exc:
            raise ModelFileError(f"cannot load a Wan transformer from {str(path)!r}: {exc}") from None

    def dataset(self, cfg: TrainConfig) -> torch.utils.data.Dataset:
        self.cfg = cfg  # loss() reads the timestep-sampling keys
        return LatentCacheDataset(cfg.dataset)

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        # Wan (its own code, diffusers' pipelines, musubi-tuner) pads every prompt to 512 tokens
        # with zeros, and cross-attention has no mask, so the padding count changes the output:
        # train with what inference will feed.
        text_len = int((self.cfg.task_args if self.cfg else {}).get("text_len", WAN_TEXT_LEN))
        return collate_latents(items, text_len)

    # -- what the trainer records and preserves (see ffid.preserve) ---------------------------
    def trained_prompts(self, dataset: Any) -> list[str]:
        """The captions of this run's items (recorded in the delta for later runs to protect)."""
        return list(getattr(dataset, "captions", []))

    def stored_text(self, prompts: list[str], dataset: LatentCacheDataset) -> dict[str, tuple[Path, str]]:
        """Where the encodings of the prompts this run records are (its own cache), for its deltas
        to carry: the first :data:`~ffid.checkpoint.delta.MAX_TEXT_ENCODINGS` that have one."""
        from ..checkpoint.delta import first_stored

        sources = dataset.text_sources()
        return {p: sources[p] for p in first_stored(prompts, sources)}

    def prepare_preservation(
        self, protected: list[Protected], cfg: TrainConfig, dataset: LatentCacheDataset
    ) -> tuple[list[Protected], list[str]]:
        """Find every protected prompt's text encoding: first in the earlier deltas (which carry
        their prompts' encodings, :mod:`ffid.preserve.stored`), then, by caption, in the caches
        (the dataset, the rehearsal datasets and ``preserve_cache``). A prompt found nowhere is
        refused, except the empty prompt and the prompts of a delta that stores encodings but
        not theirs (it stores at most 64), which are left out with a note. Noise takes the
        dataset's smallest latent shape, so a preservation item costs at most one training item."""
        from ..preserve.stored import stored_encodings

        folders = [f for f in (cfg.dataset, *cfg.rehearsal_datasets, *cfg.preserve_cache) if f]
        stored = stored_encodings(
            cfg.earlier_deltas,
            dataset.text_width(),
            cache_flag="preserve_cache = ['FOLDER']",
            caches_given=bool(cfg.preserve_cache),
        )
        index: dict[str, tuple[Path, str]] = dict(stored.where)
        for folder in folders:
            for caption, where in text_encodings(folder).items():
                index.setdefault(caption, where)
        kept, notes = [], list(stored.notes)
        left: dict[str, list[str]] = {}  # delta -> its prompts with no encoding anywhere
        for p in protected:
            if p.prompt in index:
                kept.append(p)
            elif p.source == "empty":
                notes.append(
                    "the empty prompt has no text encoding in the caches, so it is not protected; cache "
                    "an item with an empty caption into a folder and add it to preserve_cache"
                )
            elif p.source in stored.carriers:
                left.setdefault(p.source, []).append(p.label)
            else:
                where = ", ".join(map(repr, folders)) + (" or the base deltas" if stored.carriers else "")
                raise ConfigError(
                    f"protected prompt {p.label!r} (from {p.source}) has no text encoding in {where}; "
                    "cache it (musubi-tuner's wan_cache_text_encoder_outputs.py or `ffid cache`) into a "
                    "folder and add that folder to preserve_cache, or set preserve = 'off'"
                )
        for name, labels in left.items():
            notes.append(
                f"{len(labels)} prompt(s) of {name} ({labels[0]!r} ...) have no text encoding in it (a delta "
                "stores at most 64) nor in the caches, so they are not protected; add its run's cache folder "
                "to preserve_cache to protect them"
            )
        self.cfg = cfg
        self._encodings = {p.prompt: index[p.prompt] for p in kept}
        shapes = [it.shape for it in dataset.items]  # the run's own dataset, already opened
        self._noise_shape = min(shapes, key=lambda s: math.prod(s))
        return kept, notes

    def preservation_batch(self, prompts: list[str], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Pure-noise latents of the dataset's smallest shape at times drawn like training's."""
        from safetensors import safe_open

        from .config import TrainConfig

        items = []
        for p in prompts:
            path, key = self._encodings[p]
            with safe_open(str(path), framework="pt") as f:
                # only the text is batched here; the latents are fresh noise below
                items.append({"latents": torch.zeros(1), "text_embeds": f.get_tensor(key)})
        text_len = int((self.cfg.task_args if self.cfg else {}).get("text_len", WAN_TEXT_LEN))
        text = collate_latents(items, text_len)["text_embeds"]
        n = len(prompts)
        return {
            "noise": torch.randn((n, *self._noise_shape), generator=generator),
            "t": sample_times(n, self.cfg or TrainConfig(), generator),
            "text": text,
        }

    def preservation_outputs(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        dtype = next(model.parameters()).dtype
        return model(
            hidden_states=batch["noise"].to(dtype),
            timestep=batch["t"] * 1000,
            encoder_hidden_states=batch["text"].to(dtype),
            return_dict=False,
        )[0]

    def preservation_distance(
        self, student: torch.Tensor, teacher: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        return mse_per_item(student, teacher)

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        from .config import TrainConfig

        return flow_matching_loss(
            model, batch["latents"], batch["text_embeds"], self.cfg or TrainConfig(), generator
        )


__all__ = ["WanTask", "flow_matching_loss", "load_wan_single_file", "sample_times"]
