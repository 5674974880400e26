"""The methods of bench/compare.py: one job's settings, its model and task data, and the step
each method trains with.

A :class:`Job` is everything one method's run needs (sent as JSON to a worker process);
:class:`Runner` sets the method up on a loaded model and trains it. The trainable count of ffid and
the adapter rank matched to it are computed here too, beside the adapters they size.
bench/compare_run.py measures the methods, bench/compare.py drives the whole run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

FFS = (0.001, 0.01, 0.05)
MATCH_FF = 0.01  # LoRA / SHiRA are sized to ffid's trainable count at this ff
FFID = 1
# Adapters go where LoRA users put them: every attention and FFN Linear of the DiT blocks.
ADAPTER_TARGETS = (
    r".*blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)|.*blocks\.\d+\.ffn\.net\.(0\.proj|2)"
)


@dataclass
class Job:
    """Everything a worker needs (sent as JSON)."""

    method: str  # floor | full | original | ffid | lora | shira
    label: str
    size: str
    image_size: int
    batch: int
    steps: int  # timed steps after the warm-up
    warmup: int
    lr: float
    seed: int
    device: str
    dtype: str
    threads: int | None
    base: str | None  # pretrained base weights (safetensors) or None for the random init
    eval_batches: int
    ff: float | None = None
    rank: int | None = None
    checkpointing: bool = False  # diffusers' gradient checkpointing of the blocks, for every method
    extra: dict[str, Any] = field(default_factory=dict)


def _torch_dtype(name: str):  # type: ignore[no-untyped-def]
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _adapter_model(model, method: str, rank: int, seed: int):  # type: ignore[no-untyped-def]
    from peft import LoraConfig, ShiraConfig, get_peft_model

    if method == "lora":
        # alpha = r: the update is B @ A unscaled, so one learning rate means the same for any rank.
        cfg = LoraConfig(r=rank, lora_alpha=rank, target_modules=ADAPTER_TARGETS, lora_dropout=0.0)
    else:
        cfg = ShiraConfig(r=rank, target_modules=ADAPTER_TARGETS, random_seed=seed)
    return get_peft_model(model, cfg)


def load_model(job: Job):  # type: ignore[no-untyped-def]
    """The job's model: built, base weights loaded, on its device in its dtype."""
    import torch
    from _common import SIZES, build_model
    from safetensors.torch import load_file

    torch.manual_seed(job.seed)
    model = build_model(SIZES[job.size], job.image_size, seed=job.seed)
    if job.base:
        state = load_file(job.base)
        model.load_state_dict(state)
        del state
    model = model.to(device=job.device, dtype=_torch_dtype(job.dtype))
    if job.checkpointing:
        model.enable_gradient_checkpointing()
    return model


def task_batches(job: Job, seed_offset: int = 0):  # type: ignore[no-untyped-def]
    """The finetuning task's batch stream (mirrored digits); the same for every method."""
    from _common import FlowBatches, class_text, load_digits

    images, labels = load_digits(job.image_size, mirror=True)
    return FlowBatches(images, labels, class_text(), job.batch, seed=job.seed + seed_offset)


class Runner:
    """One method set up on one model: ``step(batch)`` trains, ``save(folder)`` writes its output."""

    def __init__(self, job: Job, model: Any):
        import torch

        import ffid

        self.job, self.model = job, model
        self.dtype = _torch_dtype(job.dtype)
        self.opt: torch.optim.Optimizer | None = None
        self.handle: Any = None
        self.train_model = model
        self.trainable = 0
        self.info: dict[str, Any] = {}
        m = job.method
        if m == "floor":
            for p in model.parameters():
                p.requires_grad_(False)
            return
        if m == "full":
            params = list(model.parameters())
        elif m == "original":
            sel = ffid.plan(model, job.ff, FFID, "compat-v2")
            for name, p in model.named_parameters():
                p.requires_grad_(name in sel)
            params = [p for p in model.parameters() if p.requires_grad]
            self.info["tensors"] = len(sel)
        elif m == "ffid":
            self.handle = ffid.attach(model, ff=job.ff, ffid=FFID, selector="spread")
            params = list(self.handle.parameters())
            self.info["tensors"] = len(self.handle.selection)
            self.info["routes"] = self.handle.routes()
        elif m in ("lora", "shira"):
            for p in model.parameters():
                p.requires_grad_(False)
            self.train_model = _adapter_model(model, m, job.rank or 1, job.seed)
            params = [p for p in self.train_model.parameters() if p.requires_grad]
        else:
            raise ValueError(f"unknown method {m!r}")
        self.trainable = sum(p.numel() for p in params)
        self.opt = torch.optim.AdamW(params, lr=job.lr, weight_decay=0.0)
        if self.handle is not None:
            self.opt = self.handle.guard(self.opt)  # as the trainer uses it: NaN check per step
        self.train_model.train()

    def step(self, batch: Any) -> float:
        from _common import flow_loss

        loss = flow_loss(
            self.train_model, batch, self.job.device, self.dtype, input_grad=self.job.method == "floor"
        )
        loss.backward()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def eval_loss(self, batches: list[Any]) -> float:
        import torch
        from _common import flow_loss

        self.train_model.eval()
        with torch.no_grad():
            vals = [float(flow_loss(self.train_model, b, self.job.device, self.dtype)) for b in batches]
        self.train_model.train()
        return sum(vals) / len(vals)

    def save(self, folder: str) -> tuple[int | None, str]:
        """Write what a user keeps after training; returns (bytes, what it is)."""
        from _common import file_size
        from safetensors.torch import save_file

        m = self.job.method
        if m == "ffid":
            path = os.path.join(folder, "delta.safetensors")
            self.handle.save_delta(path)
            return file_size([path]), "delta (save_delta)"
        if m in ("full", "original"):
            # The original synced its proxies back and saved the whole model, as full FT does.
            path = os.path.join(folder, "model.safetensors")
            save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, path)
            return file_size([path]), "full model"
        if m in ("lora", "shira"):
            self.train_model.save_pretrained(folder)
            return file_size([folder]), "adapter (save_pretrained)"
        return None, "-"


# ---------------------------------------------------------------------------------------------
# Sizing, in the parent: ffid's trainable count and the adapter rank matched to it
# ---------------------------------------------------------------------------------------------


def adapter_rank(size: str, image_size: int, k: int) -> tuple[int, int, int]:
    """LoRA rank (= SHiRA r) whose trainable count is closest to ``k``; also the count per unit rank
    and the model's parameter count. Both methods have ``r * (in + out)`` parameters per Linear."""
    import re

    import torch
    from _common import SIZES, build_model, count_params

    with torch.device("meta"):
        model = build_model(SIZES[size], image_size)
    per_rank = 0
    cap = None
    pattern = re.compile(ADAPTER_TARGETS)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and pattern.fullmatch(name):
            per_rank += mod.in_features + mod.out_features
            # SHiRA cannot pick more entries than the weight has.
            lim = (mod.in_features * mod.out_features) // (mod.in_features + mod.out_features)
            cap = lim if cap is None else min(cap, lim)
    rank = max(1, round(k / per_rank))
    return min(rank, cap or rank), per_rank, count_params(model)


def ffid_count(size: str, image_size: int, ff: float) -> int:
    import torch
    from _common import SIZES, build_model

    import ffid

    with torch.device("meta"):
        model = build_model(SIZES[size], image_size)
    return ffid.plan(model, ff, FFID, "spread").selected
