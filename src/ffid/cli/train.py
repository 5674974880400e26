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
    p.add_argument(
        "--allow_plugins",
        action="store_true",
        help="let model_type = 'package.module:factory' and a dotted optimizer_type (outside "
        "torch.optim) import and run the code they name; only for configs you trust (a config "
        "file cannot set this; FFID_ALLOW_PLUGINS=1 does the same)",
    )
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train import train
    from ..train.config import load_config, overrides_from_args
    from ..train.optim import check_optimizer_type
    from ..train.plugins import allow_plugins, plugins_allowed

    if args.allow_plugins:
        allow_plugins()  # in the environment: the trainer's checks read it, and child processes
    plugins_allowed()  # a malformed FFID_ALLOW_PLUGINS is refused before anything else
    cfg = load_config(args.config, overrides_from_args(args))
    check_optimizer_type(cfg.optimizer_type)  # before the model is loaded (model_type: first step)
    train(cfg)
    return 0
