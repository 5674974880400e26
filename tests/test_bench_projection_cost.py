"""Smoke of ``bench/projection_cost.py``: one width, one round, and the memory it reports is what
the objects hold (not a formula that could drift from them).

The timings are the benchmark's own report; here only that the harness runs and that its counts
agree with ffid's plan and with PEFT's rank-matched LoRA.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def cost(bench_script):
    return bench_script("projection_cost")


def test_state_bytes_counts_trained_tensors_and_optimizer_state(cost):
    p = torch.nn.Parameter(torch.zeros(10, 3))
    opt = torch.optim.AdamW([p], lr=1e-3)
    assert cost.state_bytes([p], opt) == 30 * 4  # no step yet: no moments
    p.grad = torch.ones_like(p)
    opt.step()
    # the tensor, its two moments, and AdamW's step counter (a float32 scalar)
    assert cost.state_bytes([p], opt) == 3 * 30 * 4 + 4


def test_one_round_at_width_64_reports_both_methods(cost):
    row = cost.measure(64, 0.01, rounds=1, warmup=0)
    # rows of the blocks' Linears at ff 0.01, and LoRA's count from PEFT itself
    assert row["trained_values"] > 0 and row["lora_values"] > 0 and row["lora_rank"] >= 1
    # AdamW holds two moments per trained value: state = 3 values per value, plus step counters
    assert 12 * row["trained_values"] <= row["trainable_state_bytes"] < 12 * row["trained_values"] + 4096
    assert 12 * row["lora_values"] <= row["lora_state_bytes"] < 12 * row["lora_values"] + 4096
    for key in ("plain_step_s", "projected_step_s", "lora_step_s", "feature_pass_s"):
        assert row[key] > 0
    assert 0 < row["feature_share_of_run"] < 1
    table = cost.render([row])
    assert "| 64 | 0.01 |" in table and f"(r {row['lora_rank']})" in table
