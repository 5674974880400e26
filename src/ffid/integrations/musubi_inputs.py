"""Protected inputs shaped like musubi's own DiT call, for both preservation methods.

musubi calls its Wan DiT as ``model(x, t=..., context=..., seq_len=..., clip_fea=..., y=...)``:
``x`` a batched latent (or a list of ``[C, F, H, W]`` items), ``t`` on musubi's 0..1000 scale,
``context`` a list of ``[L, D]`` text encodings (or one padded tensor). :class:`MusubiInputs`
records one training call and builds protected inputs of the same kind: the protected prompts'
text encodings (stored in the earlier deltas, or read from musubi text-encoder caches,
``*_wan_te.safetensors``: :mod:`.musubi_encodings`) with latents of the recorded shape. The loss
method (:mod:`.musubi_preserve`) and the projection method (:mod:`.musubi_projection`) both run
the DiT through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..preserve import mse_per_item


class CallShapes:
    """What a training call looks like, so protected inputs can be built like it.

    ``item`` is the shape of one latent (``[C, F, H, W]``); ``seq_len`` musubi's token count for
    it (None when the model takes none). Both can be replaced by recorded ones (see
    :meth:`with_item`), so that a resumed run builds the same inputs as the uninterrupted one.
    """

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]):
        self.args, self.kwargs = args, dict(kwargs)
        x = args[0] if args else kwargs["x"]
        first = x[0]  # one item, [C, F, H, W], from a list of them or a batched tensor
        self.item = tuple(first.shape)
        self.x_dtype, self.x_device = first.dtype, first.device
        self.x_is_list = isinstance(x, (list, tuple))
        t = kwargs["t"] if "t" in kwargs else args[1]
        self.t_dtype, self.device = t.dtype, t.device
        context = kwargs["context"] if "context" in kwargs else args[2]
        self.context_is_list = isinstance(context, (list, tuple))
        self.context_dtype = (context[0] if self.context_is_list else context).dtype
        seq = kwargs.get("seq_len")
        self.seq_len = int(seq) if seq is not None else None
        for key in ("y", "clip_fea"):
            if kwargs.get(key) is not None:
                raise ConfigError(
                    f"ffid preservation in musubi is for text-to-video training; this run passes {key} "
                    "(image-to-video or control): drop the preserve_* network_args"
                )

    def with_item(self, item: Sequence[int], seq_len: int | None) -> CallShapes:
        """These shapes with another latent item shape and token count."""
        self.item = tuple(int(d) for d in item)
        self.seq_len = seq_len
        if seq_len is not None:
            self.kwargs["seq_len"] = seq_len
        return self


class MusubiInputs:
    """The :class:`~ffid.preserve.Preservable` side of a musubi DiT: protected prompts' encodings,
    inputs shaped like the recorded call, and the call itself."""

    def __init__(self, encodings: dict[str, tuple[Path, str]]):
        self.encodings = encodings
        self.shapes: CallShapes | None = None
        self._text_cache: dict[str, torch.Tensor] = {}

    def _text(self, prompt: str) -> torch.Tensor:
        if prompt not in self._text_cache:
            from safetensors import safe_open

            path, key = self.encodings[prompt]
            with safe_open(str(path), framework="pt") as f:
                self._text_cache[prompt] = f.get_tensor(key)
        return self._text_cache[prompt]

    def _call_shapes(self) -> CallShapes:
        if self.shapes is None:
            raise ConfigError("ffid preservation needs one training call of the DiT to shape its inputs")
        return self.shapes

    def batch(self, prompts: list[str], x: torch.Tensor, t: torch.Tensor) -> dict[str, Any]:
        """A DiT batch: latents ``x`` (``[n, *item]``), times ``t`` in [0, 1], and the prompts'
        encodings, each in the recorded call's dtype, device and kind (list or tensor)."""
        s = self._call_shapes()
        x = x.to(s.x_device, s.x_dtype)
        texts = [self._text(p).to(s.device, s.context_dtype) for p in prompts]
        if not s.context_is_list:
            width = max(tt.shape[0] for tt in texts)
            shape = (len(prompts), width, texts[0].shape[-1])
            padded = torch.zeros(shape, dtype=s.context_dtype, device=s.device)
            for i, tt in enumerate(texts):
                padded[i, : tt.shape[0]] = tt
            texts = padded  # type: ignore[assignment]
        return {"x": list(x) if s.x_is_list else x, "t": (t * 1000).to(s.device, s.t_dtype), "context": texts}

    def preservation_batch(self, prompts: list[str], generator: torch.Generator) -> dict[str, Any]:
        """Pure-noise latents at random times (the loss method's protected inputs)."""
        s = self._call_shapes()
        n = len(prompts)
        noise = torch.randn((n, *s.item), generator=generator)
        t = torch.rand(n, generator=generator)
        return self.batch(prompts, noise, t)

    def preservation_outputs(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """The DiT on ``batch``, called with the recorded call's other arguments."""
        s = self._call_shapes()
        kwargs = dict(s.kwargs)
        args = list(s.args)
        for i, key in enumerate(("x", "t", "context")):
            if key in kwargs:
                kwargs[key] = batch[key]
            elif i < len(args):
                args[i] = batch[key]
        out = model(*args, **kwargs)
        return torch.stack(list(out)) if isinstance(out, (list, tuple)) else out

    def preservation_distance(
        self, student: torch.Tensor, teacher: torch.Tensor, batch: dict[str, Any]
    ) -> torch.Tensor:
        return mse_per_item(student, teacher)
