"""The trainer's start-up summary and ``ffid estimate`` use one optimizer state model
(``ffid.estimate.optimizer``), so they report the same figure."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ffid.cli import main
from ffid.train import TrainConfig, config_from_mapping, train
from ffid.train.monitor import format_bytes

pytestmark = pytest.mark.usefixtures("one_thread")


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 64)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64)) for _ in range(2))
        self.out = nn.Linear(64, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.out(h)


class _Task:
    name = "tiny"

    def build_model(self, cfg: TrainConfig) -> nn.Module:
        return _Net()

    def dataset(self, cfg: TrainConfig) -> list[dict[str, torch.Tensor]]:
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
        return [{"x": x[i], "y": x[i, :2]} for i in range(4)]

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        return nn.functional.mse_loss(model(batch["x"]), batch["y"])

    def sample(self, model: nn.Module, step: int, out_dir: Path) -> None:
        pass


@pytest.mark.parametrize("optimizer", ["Adafactor", "AdamW"])
def test_summary_and_estimate_report_the_same_optimizer_state(tmp_path, capsys, optimizer):
    cfg = config_from_mapping(
        {
            "model_type": "tiny",
            "ff": 0.05,
            "ffid": 1,
            "max_train_steps": 1,
            "batch_size": 2,
            "optimizer_type": optimizer,
            "output_dir": str(tmp_path / "out"),
            "output_name": "run",
            "progress": False,
            "logging_dir": "none",
        }
    )
    train(cfg, task=_Task())
    summary = re.search(r"optimizer state ~([^;]+);", capsys.readouterr().out)
    assert summary is not None

    model_file = tmp_path / "net.safetensors"
    save_file(_Net().state_dict(), str(model_file))
    argv = ["estimate", str(model_file), "--ff", "0.05", "--ffid", "1", "--optimizer", optimizer, "--json"]
    assert main(argv) == 0
    (est,) = json.loads(capsys.readouterr().out)["estimates"]
    assert summary.group(1) == format_bytes(est["gpu"]["optimizer"])
