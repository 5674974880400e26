"""The latent cache the ``wan`` task trains on: one ``.safetensors`` file per item.

Format ``ffid-latent-cache/1`` (one file per training item, any file name ending ``.safetensors``):

- tensor ``latents``: ``[C, F, H, W]``, the VAE latents of one video (an image is ``F = 1``),
  already scaled the way the DiT expects (Wan: ``(z - latents_mean) / latents_std``);
- tensor ``text_embeds``: ``[L, D]``, the text encoder's output for the caption (Wan: umT5,
  ``D = 4096``; padding may be left out, batches are zero-padded to the longest ``L``, which is
  what Wan's own encoder emits for padding);
- metadata ``format`` = ``ffid-latent-cache/1``, ``caption`` (the text) and any other strings.

:func:`write_item` / :func:`write_cache` make such files from tensors you already hold (your
VAE and text encoder are not ffid's business); ``ffid cache`` does the same from files.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, MissingFileError, ModelFileError
from .io import atomic_write_bytes

CACHE_FORMAT = "ffid-latent-cache/1"


def write_item(
    path: str | Path,
    latents: torch.Tensor,
    text_embeds: torch.Tensor,
    caption: str = "",
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write one cache item atomically; ``latents`` ``[C, F, H, W]``, ``text_embeds`` ``[L, D]``."""
    from safetensors.torch import save

    if latents.ndim == 3:  # an image latent [C, H, W] is a one-frame video
        latents = latents.unsqueeze(1)
    if latents.ndim != 4:
        raise ConfigError(
            f"latents of {path} have shape {tuple(latents.shape)}; expected [C, F, H, W] or [C, H, W]"
        )
    if text_embeds.ndim != 2:
        raise ConfigError(f"text_embeds of {path} have shape {tuple(text_embeds.shape)}; expected [L, D]")
    meta = {"format": CACHE_FORMAT, "caption": caption, **{k: str(v) for k, v in (metadata or {}).items()}}
    data = save(
        {
            "latents": latents.detach().cpu().contiguous(),
            "text_embeds": text_embeds.detach().cpu().contiguous(),
        },
        metadata=meta,
    )
    path = Path(path)
    atomic_write_bytes(path, data)
    return path


def write_cache(
    out_dir: str | Path,
    latents: Iterable[torch.Tensor],
    text_embeds: Iterable[torch.Tensor],
    captions: Sequence[str] | None = None,
    prefix: str = "item",
) -> list[Path]:
    """Write items ``{prefix}_{i:06d}.safetensors`` from stacked tensors or lists of them."""
    lat, txt = list(latents), list(text_embeds)
    if len(lat) != len(txt):
        raise ConfigError(f"{len(lat)} latents but {len(txt)} text embeddings; give one embedding per item")
    if captions is not None and len(captions) != len(lat):
        raise ConfigError(
            f"{len(lat)} items but {len(captions)} captions; give one caption per item (or none)"
        )
    if not lat:
        raise ConfigError("no items to cache; the latents are empty")
    out = Path(out_dir)
    return [
        write_item(out / f"{prefix}_{i:06d}.safetensors", a, b, captions[i] if captions else "")
        for i, (a, b) in enumerate(zip(lat, txt, strict=True))
    ]


class LatentCacheDataset(torch.utils.data.Dataset):
    """The items of a cache folder, in file-name order; headers are checked on open, data read per item."""

    def __init__(self, folder: str | Path | None):
        from safetensors import safe_open

        if not folder:
            raise ConfigError("dataset is not set; give the cache folder (see `ffid cache --help`)")
        self.folder = Path(folder)
        if not self.folder.exists():
            raise MissingFileError(
                f"dataset folder {str(self.folder)!r} does not exist; make it with `ffid cache`"
            )
        files = [self.folder] if self.folder.is_file() else sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise ConfigError(
                f"dataset folder {str(self.folder)!r} holds no .safetensors items; "
                "make them with `ffid cache` (format ffid-latent-cache/1)"
            )
        self.files = files
        self.captions: list[str] = []
        for path in files:
            try:
                with safe_open(str(path), framework="pt") as f:
                    keys, meta = set(f.keys()), f.metadata() or {}
            except Exception as exc:  # safetensors raises its own error types
                raise ModelFileError(
                    f"dataset item {str(path)!r} is not a readable safetensors file ({exc})"
                ) from None
            missing = {"latents", "text_embeds"} - keys
            if missing:
                raise ModelFileError(
                    f"dataset item {str(path)!r} lacks {', '.join(sorted(missing))}; "
                    f"items need 'latents' [C,F,H,W] and 'text_embeds' [L,D] ({CACHE_FORMAT})"
                )
            self.captions.append(meta.get("caption", ""))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from safetensors.torch import load_file

        item = load_file(str(self.files[i]))
        return {"latents": item["latents"], "text_embeds": item["text_embeds"], "name": self.files[i].name}


def collate_latents(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack latents (equal shapes required) and zero-pad text embeddings to the longest."""
    shapes = {tuple(it["latents"].shape) for it in items}
    if len(shapes) > 1:
        names = ", ".join(str(it.get("name", "?")) for it in items)
        raise ConfigError(
            f"a batch mixes latent shapes {sorted(shapes)} ({names}); use batch_size = 1 "
            "or cache items of one resolution and frame count"
        )
    length = max(it["text_embeds"].shape[0] for it in items)
    text = torch.zeros(
        len(items), length, items[0]["text_embeds"].shape[1], dtype=items[0]["text_embeds"].dtype
    )
    for i, it in enumerate(items):
        text[i, : it["text_embeds"].shape[0]] = it["text_embeds"]
    return {"latents": torch.stack([it["latents"] for it in items]), "text_embeds": text}


def load_tensor_file(path: str | Path, key: str | None = None) -> torch.Tensor | list[torch.Tensor]:
    """A stacked tensor ``[N, ...]`` (or a list of tensors) from ``.safetensors``, ``.pt`` or ``.npy``."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        data = load_file(str(path))
        if key is None and len(data) == 1:
            return next(iter(data.values()))
        if key is not None and key in data:
            return data[key]
        return [data[k] for k in sorted(data)]
    if suffix in (".pt", ".pth"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, Mapping):
            obj = obj[key] if key is not None and key in obj else [obj[k] for k in sorted(obj)]
        return obj
    if suffix == ".npy":
        import numpy as np

        return torch.from_numpy(np.load(path))
    raise ConfigError(f"{str(path)!r}: use a .safetensors, .pt or .npy file")


__all__ = [
    "CACHE_FORMAT",
    "LatentCacheDataset",
    "collate_latents",
    "load_tensor_file",
    "write_cache",
    "write_item",
]
