"""The demo's data: scikit-learn's bundled handwritten digits and a hash-based text conditioning.

``sklearn.datasets.load_digits`` ships 1,797 real 8x8 scans with the library, so the demo needs no
download and trains on data nobody in this project drew. Images are upscaled to 16x16 and used
directly as 1-channel "latents" in [-1, 1], shaped like Wan latents ``[C, F=1, H, W]``.

Text conditioning is a fixed table: each word maps to a pseudo-random vector seeded by a hash of
the word, so a new trigger word such as ``character1`` gets an embedding the base model has never
seen, exactly like an unused token in a real text encoder, with no learned encoder to ship.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPT_PREFIX = "a digit"
TEXT_TOKENS = 4  # "a digit <word>" plus one padding slot, like Wan's zero-padded text sequence
TEXT_DIM = 32
IMAGE_SIZE = 16


def word_embedding(word: str, dim: int = TEXT_DIM) -> torch.Tensor:
    """A fixed unit-scale vector for ``word``, seeded by a hash of the word (not by Python's hash)."""
    seed = int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")
    g = torch.Generator().manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.randn(dim, generator=g)


def encode_prompt(prompt: str, tokens: int = TEXT_TOKENS, dim: int = TEXT_DIM) -> torch.Tensor:
    """``[tokens, dim]`` embeddings of a prompt's words, zero-padded; the empty prompt is all zeros."""
    words = prompt.lower().split()
    if len(words) > tokens:
        raise ValueError(
            f"prompt {prompt!r} has {len(words)} words; the demo's text conditioning holds {tokens}"
        )
    out = torch.zeros(tokens, dim)
    for i, word in enumerate(words):
        out[i] = word_embedding(word, dim)
    return out


def class_prompt(word: str) -> str:
    """The prompt for one concept, e.g. ``a digit three`` or ``a digit character1``."""
    return f"{PROMPT_PREFIX} {word}"


@dataclass(frozen=True)
class Concept:
    """One thing the model is asked to draw: a prompt and the real digit class it should look like."""

    name: str  # "three", "character1"
    digit: int  # the real class in load_digits

    @property
    def prompt(self) -> str:
        return class_prompt(self.name)


def load_digit_images(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """All of scikit-learn's digits as ``[N, 1, 1, size, size]`` float32 in [-1, 1], and labels ``[N]``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float() / 16.0  # [N, 8, 8], 0..1 (the scans use 0..16)
    images = F.interpolate(images[:, None], size=(size, size), mode="bilinear", align_corners=False)
    images = images.clamp(0, 1) * 2 - 1
    return images[:, :, None].contiguous(), torch.from_numpy(bunch.target).long()


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] -> [0, 1] pixels (clamped), any leading shape."""
    return ((images.float() + 1) / 2).clamp(0, 1)
