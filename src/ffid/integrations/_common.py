"""What the trainer integrations share: the refusal of weight-sharding wrappers."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError

# accelerate's DistributedType values that shard parameters across processes.
SHARDING = {"FSDP": "FSDP", "DEEPSPEED": "DeepSpeed ZeRO", "MEGATRON_LM": "Megatron-LM"}


def refuse_sharding(distributed_type: Any) -> None:
    """Raise :class:`ConfigError` for FSDP / DeepSpeed / Megatron; plain DDP and single process pass.

    Why: those wrappers flatten and shard the model's Parameters across processes, while ffid's
    forward reads each frozen weight whole and keeps small fp32 proxies beside it. The proxies are
    a few percent of the model at most, so there is nothing worth sharding: every process keeps a
    full copy (DDP), and block swap is the way to fit the frozen weights.
    """
    key = str(getattr(distributed_type, "value", distributed_type)).upper()
    if key in SHARDING:
        raise ConfigError(
            f"ffid does not run under {SHARDING[key]}: it shards the model's weights, which ffid reads whole "
            "next to its small fp32 proxies; launch with plain multi-GPU DDP (accelerate config: multi-GPU, "
            "no FSDP/DeepSpeed) and use --blocks_to_swap to fit the model"
        )
