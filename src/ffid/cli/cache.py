"""``ffid cache``: write a latent cache (one .safetensors per item) for ``ffid train`` with the wan task."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "cache",
        help="make a latent cache (latents + text embeddings per item) for `ffid train`",
        description=(
            "Write one ffid-latent-cache/1 item per training sample into OUTPUT_DIR from tensors you "
            "already computed with your VAE and text encoder: --latents holds [N, C, F, H, W] (or "
            "[N, C, H, W] for images), --text_embeds [N, L, D] (or one [L, D] tensor per item in a "
            ".safetensors/.pt dict); files may be .safetensors, .pt or .npy."
        ),
    )
    p.add_argument("--latents", required=True, help="file with the latents of all items")
    p.add_argument("--text_embeds", required=True, help="file with the text embeddings of all items")
    p.add_argument("--captions", help="text file with one caption per line (stored as metadata)")
    p.add_argument(
        "--output_dir", required=True, help="cache folder to write (the dataset key of ffid train)"
    )
    p.add_argument("--prefix", default="item", help="file name prefix of the items")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train.cache import load_tensor_file, write_cache

    latents = load_tensor_file(args.latents, "latents")
    text = load_tensor_file(args.text_embeds, "text_embeds")
    captions = None
    if args.captions:
        captions = Path(args.captions).read_text(encoding="utf-8").splitlines()
    paths = write_cache(args.output_dir, latents, text, captions, prefix=args.prefix)
    print(f"ffid cache: wrote {len(paths)} items to {args.output_dir}")
    return 0
