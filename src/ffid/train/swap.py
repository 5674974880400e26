"""Block swap: park the base weights of the last N blocks on the CPU and bring each to the device
only while it runs (forward, and again for its backward), as musubi-tuner does.

Weights are moved by replacing ``tensor.data``, so the Parameter objects (and whatever the
ffid engine hooked onto them) stay the same; autograd saves those same objects, so a block
whose data is back on the device before its backward computes with the device copy.
With gradient checkpointing the block's forward runs again inside backward; the swapper then
keeps it on the device until its backward has finished.
On a CPU-only machine the device is the CPU and every move is a no-op on the same code path.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..errors import ConfigError


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's repeated blocks: the largest ``nn.ModuleList`` (Wan ``blocks``, LLM ``layers``/``h``)."""
    best: nn.ModuleList | None = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > (len(best) if best is not None else 0):
            best = module
    if best is None:
        raise ConfigError(
            f"blocks_to_swap needs a model with a list of blocks; {type(model).__name__} has none"
        )
    return best


class BlockSwapper:
    """Keeps ``blocks`` on ``offload`` (CPU) except while they compute on ``device``.

    ``moves`` counts transfers to the device (a test and the summary read it).
    """

    def __init__(self, blocks: Iterable[nn.Module], device: torch.device | str, offload: str = "cpu"):
        self.blocks = list(blocks)
        self.device = torch.device(device)
        self.offload = torch.device(offload)
        self.moves = 0
        self._in_backward: set[int] = set()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        pin = self.device.type == "cuda"
        for i, block in enumerate(self.blocks):
            self._move(block, self.offload, pin=pin)
            self._handles += [
                block.register_forward_pre_hook(self._pre_forward(i)),
                block.register_forward_hook(self._post_forward(i)),
                block.register_full_backward_pre_hook(self._pre_backward(i)),
                block.register_full_backward_hook(self._post_backward(i)),
            ]

    @staticmethod
    def _tensors(block: nn.Module) -> Iterable[torch.Tensor]:
        yield from block.parameters()
        yield from block.buffers()

    def _move(self, block: nn.Module, device: torch.device, pin: bool = False) -> None:
        for t in self._tensors(block):
            if t.device != device:
                data = t.data.to(device, non_blocking=device.type == "cuda")
                if pin and device.type == "cpu":
                    data = data.pin_memory()
                t.data = data

    def _to_device(self, i: int) -> None:
        self.moves += 1  # counted on a CPU-only machine too: the same path runs
        self._move(self.blocks[i], self.device)

    def _to_offload(self, i: int) -> None:
        self._move(self.blocks[i], self.offload, pin=self.device.type == "cuda")

    def _pre_forward(self, i: int):
        def hook(module: nn.Module, args: object) -> None:
            self._to_device(i)

        return hook

    def _post_forward(self, i: int):
        def hook(module: nn.Module, args: object, output: object) -> None:
            # A forward inside backward is a checkpoint recompute: its backward comes next.
            if i not in self._in_backward:
                self._to_offload(i)

        return hook

    def _pre_backward(self, i: int):
        def hook(module: nn.Module, grad_output: object) -> None:
            self._in_backward.add(i)
            self._to_device(i)

        return hook

    def _post_backward(self, i: int):
        def hook(module: nn.Module, grad_input: object, grad_output: object) -> None:
            self._in_backward.discard(i)
            self._to_offload(i)

        return hook

    def settle(self) -> None:
        """Put every block back on the offload device (after a step whose backward skipped some hooks)."""
        self._in_backward.clear()
        for i in range(len(self.blocks)):
            self._to_offload(i)

    def remove(self, to: torch.device | str | None = None) -> None:
        """Remove the hooks and move the blocks to ``to`` (default: the compute device)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for block in self.blocks:
            self._move(block, torch.device(to) if to is not None else self.device)


def attach_block_swap(model: nn.Module, n: int, device: torch.device | str) -> BlockSwapper | None:
    """Swap the last ``n`` blocks of ``model``; ``None`` when ``n`` is 0."""
    if n <= 0:
        return None
    blocks = find_blocks(model)
    if n > len(blocks):
        raise ConfigError(
            f"blocks_to_swap = {n} but the model has {len(blocks)} blocks; use at most {len(blocks)}"
        )
    return BlockSwapper(list(blocks)[len(blocks) - n :], device)


__all__ = ["BlockSwapper", "attach_block_swap", "find_blocks"]
