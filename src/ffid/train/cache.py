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

A musubi-tuner Wan cache folder (``cache_directory`` after its ``wan_cache_latents.py`` and
``wan_cache_text_encoder_outputs.py``) is read as it is, with no conversion:

- ``{item}_{W:04d}x{H:04d}_wan.safetensors`` (images) or
  ``{item}_{start:05d}-{frames:03d}_{W:04d}x{H:04d}_wan.safetensors`` (video clips) hold the
  latents ``[C, F, H, W]`` under ``latents_{F}x{H}x{W}_{dtype}``, already normalised by Wan's VAE;
- ``{item}_wan_te.safetensors`` holds the umT5 output ``[L, 4096]`` under ``varlen_t5_{dtype}``
  (unpadded) and the caption as metadata ``caption1``; every clip of a video shares it.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, MissingFileError, ModelFileError
from .io import atomic_write_bytes, commit_dir, recover_dir, temp_dir_for

CACHE_FORMAT = "ffid-latent-cache/1"


def _checked(
    path: str | Path, latents: torch.Tensor, text_embeds: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``latents`` as ``[C, F, H, W]`` and ``text_embeds``, refused when misshapen or not finite."""
    if latents.ndim == 3:  # an image latent [C, H, W] is a one-frame video
        latents = latents.unsqueeze(1)
    if latents.ndim != 4:
        raise ConfigError(
            f"latents of {path} have shape {tuple(latents.shape)}; expected [C, F, H, W] or [C, H, W]"
        )
    if text_embeds.ndim != 2:
        raise ConfigError(f"text_embeds of {path} have shape {tuple(text_embeds.shape)}; expected [L, D]")
    for what, t in (("latents", latents), ("text_embeds", text_embeds)):
        if t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise ConfigError(
                    f"{what} of {path} hold {bad} NaN/inf value(s); training on them gives a NaN loss: "
                    "encode that item again (a VAE in fp16 can overflow; try bf16 or fp32)"
                )
    return latents, text_embeds


def write_item(
    path: str | Path,
    latents: torch.Tensor,
    text_embeds: torch.Tensor,
    caption: str = "",
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write one cache item atomically; ``latents`` ``[C, F, H, W]``, ``text_embeds`` ``[L, D]``.

    Misshapen tensors and NaN/inf values are refused before anything is written.
    """
    from safetensors.torch import save

    latents, text_embeds = _checked(path, latents, text_embeds)
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
    """Write items ``{prefix}_{i:06d}.safetensors`` from stacked tensors or lists of them.

    Every item is checked before the first is written: a refused cache writes no file and no
    folder (a half-written cache would train on the items before the bad one only).

    The folder switches as a whole: the items are written into a temp folder beside it, which
    then replaces ``out_dir`` by a rename (:func:`ffid.train.io.commit_dir`), so a killed run
    leaves the old cache or the complete new one. The new folder keeps the old one's other files
    (items of another prefix included) and drops the old items of this prefix. A run killed
    between the two renames leaves the old cache aside; readers and the next run put it back.
    """
    lat, txt = list(latents), list(text_embeds)
    if len(lat) != len(txt):
        raise ConfigError(f"{len(lat)} latents but {len(txt)} text embeddings; give one embedding per item")
    if captions is not None and len(captions) != len(lat):
        raise ConfigError(
            f"{len(lat)} items but {len(captions)} captions; give one caption per item (or none)"
        )
    if not lat:
        raise ConfigError("no items to cache; the latents are empty")
    if not prefix or prefix in (".", "..") or "/" in prefix or os.sep in prefix or "\0" in prefix:
        raise ConfigError(f"prefix {prefix!r} is not a file name; give a name without '/' such as 'item'")
    names = [f"{prefix}_{i:06d}.safetensors" for i in range(len(lat))]
    for name, a, b in zip(names, lat, txt, strict=True):
        _checked(name, a, b)
    final = Path(out_dir).resolve()  # a link to a cache folder switches the folder it points to
    if final.exists() and not final.is_dir():
        raise ConfigError(f"output_dir {str(out_dir)!r} is an existing file, not a folder; name a folder")
    tmp = temp_dir_for(final)  # also puts back a cache a killed switch left aside, and removes dead temps
    try:
        if final.is_dir():
            _carry_over(final, tmp, prefix)
        for i, (name, a, b) in enumerate(zip(names, lat, txt, strict=True)):
            write_item(tmp / name, a, b, captions[i] if captions else "")
        commit_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [final / name for name in names]


def _carry_over(old: Path, new: Path, prefix: str) -> None:
    """Put into ``new`` everything of the cache folder ``old`` except its ``{prefix}_N`` items.

    Files are hard-linked where the file system allows (items are never changed in place, only
    replaced), else copied; the old folder itself is left untouched until the switch. Items of
    another prefix stay, so caches made with several prefixes keep working; this prefix's old
    items go, so a smaller new cache leaves none of the old ones behind.
    """
    mine = re.compile(rf"^{re.escape(prefix)}_\d{{6}}\.safetensors$")
    for entry in old.iterdir():
        if mine.match(entry.name):
            continue
        dest = new / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry), dest)
        elif entry.is_dir():
            shutil.copytree(entry, dest, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, dest)


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@dataclass(frozen=True)
class CacheItem:
    """Where one training item's two tensors live (the same file for ffid's own format)."""

    latent_file: Path
    latent_key: str
    text_file: Path
    text_key: str
    caption: str = ""
    shape: tuple[int, ...] = ()  # of the latents, [C, F, H, W]: the trainer's bucket key


def _header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor shapes by key and the metadata of a safetensors file (its header only)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
            return shapes, dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types
        raise ModelFileError(
            f"dataset item {str(path)!r} is not a readable safetensors file ({exc})"
        ) from None


def _ffid_items(files: list[Path]) -> list[CacheItem]:
    items = []
    for path in files:
        shapes, meta = _header(path)
        missing = {"latents", "text_embeds"} - shapes.keys()
        if missing:
            raise ModelFileError(
                f"dataset item {str(path)!r} lacks {', '.join(sorted(missing))}; items need "
                f"'latents' [C,F,H,W] and 'text_embeds' [L,D] ({CACHE_FORMAT}), or give a "
                "musubi-tuner Wan cache folder (*_wan.safetensors + *_wan_te.safetensors)"
            )
        caption = meta.get("caption", "")
        items.append(CacheItem(path, "latents", path, "text_embeds", caption, _frames(shapes["latents"])))
    return items


_MUSUBI_SIZE = re.compile(r"^\d+x\d+$")  # the W x H token of a latent file name
_MUSUBI_CLIP = re.compile(r"^\d+-\d+(-\d+)?$")  # start-frames[-section] of a video clip
_MUSUBI_LATENT_KEY = re.compile(r"^latents_\d+x\d+x\d+_")
# keys of musubi's Wan latent files that condition on an image or a control video (I2V, Fun-Control)
_MUSUBI_CONDITIONING = ("clip_", "latents_image_", "latents_control_")


def _musubi_items(folder: Path) -> list[CacheItem]:
    """Pair musubi-tuner's ``*_wan.safetensors`` latent files with their ``*_wan_te.safetensors``."""
    items = []
    text_headers: dict[Path, tuple[dict[str, tuple[int, ...]], dict[str, str]]] = {}
    for path in sorted(folder.glob("*_wan.safetensors")):
        tokens = path.name[: -len("_wan.safetensors")].split("_")
        if len(tokens) < 2 or not _MUSUBI_SIZE.match(tokens[-1]):
            raise ModelFileError(
                f"{path.name} in {str(folder)!r} is not named like a musubi-tuner Wan latent file "
                "({item}_{W}x{H}_wan.safetensors); remove it or move it out of the cache folder"
            )
        stem = tokens[:-1]
        if len(stem) > 1 and _MUSUBI_CLIP.match(stem[-1]):
            stem = stem[:-1]  # a clip of a video: the text cache is the video's
        text_file = folder / f"{'_'.join(stem)}_wan_te.safetensors"
        if not text_file.is_file():
            raise MissingFileError(
                f"{path.name} has no text-encoder cache {text_file.name} in {str(folder)!r}; run "
                "musubi-tuner's wan_cache_text_encoder_outputs.py on the same dataset config"
            )
        shapes, _ = _header(path)
        conditioning = sorted(k for k in shapes if k.startswith(_MUSUBI_CONDITIONING))
        if conditioning:
            raise ConfigError(
                f"{path.name} holds {conditioning[0]!r}: an image-to-video or control cache; the wan "
                "task of ffid train is text-to-video, so train this one inside musubi-tuner with "
                "--network_module ffid.integrations.musubi"
            )
        latent_keys = [k for k in shapes if _MUSUBI_LATENT_KEY.match(k)]
        if text_file not in text_headers:  # every clip of a video shares one text file
            text_headers[text_file] = _header(text_file)
        text_keys, meta = text_headers[text_file]
        t5_keys = [k for k in text_keys if k.startswith("varlen_t5_")]
        for file, found, want in (
            (path, latent_keys, "latents_{F}x{H}x{W}_{dtype}"),
            (text_file, t5_keys, "varlen_t5_{dtype}"),
        ):
            if len(found) != 1:
                raise ModelFileError(
                    f"{file.name} holds {len(found)} tensors named {want}, not one; re-run "
                    "musubi-tuner's Wan cache scripts for it"
                )
        latent_key, text_key = latent_keys[0], t5_keys[0]
        caption = meta.get("caption1", "")
        items.append(CacheItem(path, latent_key, text_file, text_key, caption, _frames(shapes[latent_key])))
    return items


def _frames(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (*shape[:1], 1, *shape[1:]) if len(shape) == 3 else shape  # [C, H, W] is one frame


class LatentCacheDataset(torch.utils.data.Dataset):
    """The items of a cache folder in file-name order: ffid's own format or a musubi-tuner Wan cache.

    Headers are read and checked on open; tensors are read per item.
    """

    def __init__(self, folder: str | Path | None):
        if not folder:
            raise ConfigError("dataset is not set; give the cache folder (see `ffid cache --help`)")
        self.folder = Path(folder)
        recover_dir(self.folder)  # a cache that a killed `ffid cache` left aside
        if not self.folder.exists():
            raise MissingFileError(
                f"dataset folder {str(self.folder)!r} does not exist; make it with `ffid cache`"
            )
        if self.folder.is_dir() and any(self.folder.glob("*_wan_te.safetensors")):
            self.kind = "musubi-tuner"
            self.items = _musubi_items(self.folder)
        else:
            self.kind = CACHE_FORMAT
            files = [self.folder] if self.folder.is_file() else sorted(self.folder.glob("*.safetensors"))
            self.items = _ffid_items(files)
        if not self.items:
            raise ConfigError(
                f"dataset folder {str(self.folder)!r} holds no training items; make them with `ffid "
                f"cache` ({CACHE_FORMAT}) or give a musubi-tuner Wan cache_directory"
            )
        self.files = [it.latent_file for it in self.items]
        self.captions = [it.caption for it in self.items]
        self.bucket_keys = [it.shape for it in self.items]  # the trainer's buckets

    def __len__(self) -> int:
        return len(self.items)

    def text_width(self) -> int:
        """The width of this cache's text encodings (the text encoder's output size: what the
        model is trained with), read from the first item's header."""
        it = self.items[0]
        shapes, _ = _header(it.text_file)
        return int(shapes[it.text_key][-1])

    def text_sources(self) -> dict[str, tuple[Path, str]]:
        """Caption -> (file, tensor key) of this cache's text encodings, in item order."""
        out: dict[str, tuple[Path, str]] = {}
        for it in self.items:
            out.setdefault(it.caption, (it.text_file, it.text_key))
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        from safetensors import safe_open

        it = self.items[i]
        with safe_open(str(it.latent_file), framework="pt") as f:
            latents = f.get_tensor(it.latent_key)
        with safe_open(str(it.text_file), framework="pt") as f:
            text = f.get_tensor(it.text_key)
        return {"latents": latents, "text_embeds": text, "name": it.latent_file.name}


def text_encodings(folder: str | Path) -> dict[str, tuple[Path, str]]:
    """Caption -> (file, tensor key) of every text encoding in a cache folder, read from headers.

    Reads musubi-tuner's ``*_wan_te.safetensors`` (``varlen_t5_*``, caption in ``caption1``) and
    ffid's own items (``text_embeds``, caption in ``caption``); latents are not needed, so a
    folder of text-encoder caches alone will do. The first file of a caption wins (name order).
    """
    folder = Path(folder)
    recover_dir(folder)  # a cache that a killed `ffid cache` left aside
    if not folder.is_dir():
        raise MissingFileError(f"cache folder {str(folder)!r} does not exist or is not a folder")
    found: dict[str, tuple[Path, str]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        shapes, meta = _header(path)
        if path.name.endswith("_wan_te.safetensors"):
            keys = [k for k in shapes if k.startswith("varlen_t5_")]
            caption = meta.get("caption1")
        else:
            keys = ["text_embeds"] if "text_embeds" in shapes else []
            caption = meta.get("caption")
        if len(keys) == 1 and caption is not None:
            found.setdefault(caption, (path, keys[0]))
    return found


def read_text_encodings(where: Mapping[str, tuple[Path, str]]) -> dict[str, torch.Tensor]:
    """Caption -> the ``[L, D]`` encoding at (file, key), in order, as stored (e.g. bf16)."""
    from safetensors import safe_open

    out = {}
    for caption, (path, key) in where.items():
        try:
            with safe_open(str(path), framework="pt") as f:
                out[caption] = f.get_tensor(key)
        except Exception as exc:  # safetensors raises its own error types
            raise ModelFileError(
                f"text encoding of {caption[:40]!r} in {str(path)!r} cannot be read ({exc}); the cache "
                "changed during the run: cache it again"
            ) from None
    return out


def collate_latents(items: list[dict[str, Any]], text_len: int = 0) -> dict[str, torch.Tensor]:
    """Stack latents (equal shapes required) and zero-pad text embeddings to ``text_len`` tokens
    (Wan pads every prompt to 512), or to the longest in the batch when ``text_len`` is 0."""
    shapes = {tuple(it["latents"].shape) for it in items}
    if len(shapes) > 1:
        names = ", ".join(str(it.get("name", "?")) for it in items)
        raise ConfigError(
            f"a batch mixes latent shapes {sorted(shapes)} ({names}); use batch_size = 1 "
            "or cache items of one resolution and frame count"
        )
    longest = max(it["text_embeds"].shape[0] for it in items)
    if text_len and longest > text_len:
        name = next(str(it.get("name", "?")) for it in items if it["text_embeds"].shape[0] == longest)
        raise ConfigError(
            f"text embeddings of {name} have {longest} tokens, more than task_args.text_len = "
            f"{text_len}; raise text_len, or set it to 0 to pad each batch to its longest"
        )
    length = text_len or longest
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
    "CacheItem",
    "LatentCacheDataset",
    "collate_latents",
    "load_tensor_file",
    "read_text_encodings",
    "text_encodings",
    "write_cache",
    "write_item",
]
