"""The gradient path of every weight, and so the bits of a run, depend on nothing but its inputs.

The engine's gradient paths (``ffid.engine.paths``) are exact but round differently. ``auto``
used to pick them from a timed probe, so two processes of the same run, or a resume in a fresh
process, could take other paths and drift in the last bits unless the state's paths were pinned.
Now ``auto`` is a fixed rule of shapes, dtype and device type: here processes are given opposite
timing biases on purpose (the first calls of one path made slow, as on a machine loaded while a
process starts) and still train bit-identical values, also when a resume has no recorded paths.
Pinning stays for states written by older ffid (``handle.pin_grad_paths``).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ffid import attach, plan
from ffid.engine import paths
from ffid.errors import ConfigError, MismatchError
from ffid.train import TrainConfig, train
from test_train import TinyNet, TinyTask, cfg_for

pytestmark = pytest.mark.usefixtures("one_thread")

KW = dict(max_train_steps=6, gradient_accumulation_steps=2, lr_scheduler="cosine", lr_warmup_steps=2)


class SeqTask(TinyTask):
    """TinyTask on sequences of 40 tokens, so that a weight's gradient sums 120 products per
    call and the paths' different summation orders show in the last bits."""

    def dataset(self, cfg: TrainConfig) -> list[dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(3)
        x = torch.randn(self.items, 40, 6, generator=g)
        y = torch.stack([x[..., :3].sum(-1), x[..., 3:].prod(-1)], -1)
        return [{"x": x[i], "y": y[i]} for i in range(self.items)]


# One training run in a fresh process whose first six calls of one path's kernel each burn 0.1 s
# of CPU time (a probe timing them would find that path 100x slower than it is).
_RUN = """
import json, sys, time
from pathlib import Path
import torch
sys.path.insert(0, {tests!r})
from ffid.engine import paths
from ffid.train import train
from test_train import cfg_for
from test_train_grad_paths import KW, SeqTask
torch.set_num_threads(1)

def slow_start(fn):
    calls = [0]
    def slowed(*args, **kwargs):
        calls[0] += 1
        end = time.process_time() + (0.1 if calls[0] <= 6 else 0.0)
        while time.process_time() < end:
            pass
        return fn(*args, **kwargs)
    return slowed

kernel = {{"sampled": "_sddmm", "dense": "_mm"}}[{slow!r}]
setattr(paths, kernel, slow_start(getattr(paths, kernel)))
res = train(cfg_for(Path({root!r}), resume={state!r}, **KW), task=SeqTask())
values = {{n: v.tolist() for n, v in res.handle.trained_values().items()}}
print(json.dumps({{"losses": res.losses, "paths": res.handle.grad_paths(), "values": values}}))
"""


def _train_in_fresh_process(root: Path, slow: str, state: Path | None = None) -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop(paths.ENV_PATH, None)
    resume = None if state is None else str(state)
    code = _RUN.format(tests=str(Path(__file__).parent), slow=slow, root=str(root), state=resume)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_processes_with_opposite_timing_biases_train_the_same_bits(tmp_path: Path) -> None:
    one = _train_in_fresh_process(tmp_path / "a", slow="sampled")
    two = _train_in_fresh_process(tmp_path / "b", slow="dense")
    assert one["paths"] == two["paths"]
    assert one["losses"] == two["losses"]
    assert one["values"] == two["values"]  # bit for bit (floats through JSON round-trip exactly)


def test_a_resume_without_recorded_paths_repeats_the_run_bit_for_bit(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(paths.ENV_PATH, raising=False)
    full = train(cfg_for(tmp_path / "a", **KW), task=SeqTask())
    part = train(cfg_for(tmp_path / "b", save_every_n_steps=3, save_state=True, **KW), task=SeqTask())
    assert part.losses == full.losses
    state = tmp_path / "b" / "out" / "run-step00000003-state"
    meta = json.loads((state / "state.json").read_text())
    assert meta["grad_paths"] == full.handle.grad_paths()  # still written, for older readers
    bare = tmp_path / "bare-state"
    shutil.copytree(state, bare)
    meta.pop("grad_paths")
    meta.pop("grad_paths_by_rank")
    (bare / "state.json").write_text(json.dumps(meta))
    want = {n: v.tolist() for n, v in full.handle.trained_values().items()}
    for slow in ("sampled", "dense"):
        got = _train_in_fresh_process(tmp_path / f"c-{slow}", slow=slow, state=bare)
        assert got["paths"] == full.handle.grad_paths()
        assert got["losses"] == full.losses  # loss history included
        assert got["values"] == want


def test_pinned_paths_win_and_are_checked(monkeypatch) -> None:
    monkeypatch.setenv(paths.ENV_PATH, "dense")
    torch.manual_seed(0)
    model = TinyNet()
    sel = plan(model, 0.05, 1, "spread")
    handle = attach(copy.deepcopy(model), sel, grad_path="chunked")
    names = [n for n in sel if n == "inp.weight" or n.endswith(".0.weight")]  # Linears, not out
    handle.pin_grad_paths({n: "sampled" for n in names})
    handle.model(torch.randn(5, 6)).sum().backward()
    used = handle.grad_paths()
    assert {n: used[n] for n in names} == {n: "sampled" for n in names}
    assert used["out.weight"] == "chunked"  # not pinned: the attach option (over the variable)
    with pytest.raises(MismatchError, match="does not train"):
        handle.pin_grad_paths({"nope.weight": "dense"})
    with pytest.raises(ConfigError, match="not one of"):
        handle.pin_grad_paths({names[0]: "fastest"})
    assert handle.grad_paths()[names[0]] == "sampled"  # all or nothing: nothing changed


def test_each_process_resumes_with_its_own_paths() -> None:
    """Under DDP each rank may have measured its own cost model; a resume pins each rank's own
    choice, and states written before the per-rank record still resume with rank 0's."""
    from ffid.train.state import grad_paths_of

    meta = {"grad_paths": {"w": "dense"}, "grad_paths_by_rank": {"0": {"w": "dense"}, "1": {"w": "sampled"}}}
    assert grad_paths_of(meta, 0) == {"w": "dense"} and grad_paths_of(meta, 1) == {"w": "sampled"}
    assert grad_paths_of({"grad_paths": {"w": "dense"}}, 1) == {"w": "dense"}
    assert grad_paths_of({}, 0) == {}
