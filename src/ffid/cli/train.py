"""``ffid train``: train ``--ff`` of a model's weights (selection ``--ffid``) from TOML and/or flags."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    from ..train.config import add_arguments

    p = subparsers.add_parser(
        "train",
        # A misspelt flag must fail, not silently match a longer key (--learning_rat -> --learning_rate).
        allow_abbrev=False,
        help="train a selection of a model's weights (Wan DiT, causal LM, demo)",
        description=(
            "Train ff of a model's own weights, picked by selection id ffid. Keys come from the TOML "
            "file given with --config (kohya style; [tables] are flattened) and from flags of the same "
            "name, which win. Outputs: {output_name}-step{step:08d}.safetensors deltas, the final "
            "{output_name}.safetensors, optional states ({...}-state/) and full checkpoint. "
            "Several GPUs: accelerate launch --multi_gpu --num_processes N -m ffid train ...; several "
            "CPU processes: torchrun --standalone --nproc_per_node N -m ffid train ... . "
            "See docs/train.md."
        ),
    )
    p.add_argument(
        "--config", "--config_file", dest="config", metavar="TOML", help="TOML file with training keys"
    )
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train import train
    from ..train.config import load_config, overrides_from_args

    cfg = load_config(args.config, overrides_from_args(args))
    train(cfg)
    return 0
