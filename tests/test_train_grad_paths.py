"""Resume takes the gradient paths of the run it resumes: bit-exact across processes, cache off.

The engine's gradient paths (``ffid.engine.paths``) are exact but round differently, and with
``FFID_RATES_CACHE=off`` every process measures its own cost model, so a resumed run in a fresh
process may choose other paths than the run it continues. The training state records the path
of each weight and the resume pins them (``handle.pin_grad_paths``). Here the two processes are
given opposite cost models on purpose (sampled in the first, dense in the second).
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

SAMPLED_WINS = {"dense": 1e-9, "sampled": 1e-12, "convert": 1e-12}
DENSE_WINS = {"dense": 1e-12, "sampled": 1e-9, "convert": 1e-9}
KW = dict(max_train_steps=6, gradient_accumulation_steps=2, lr_scheduler="cosine", lr_warmup_steps=2)


class SeqTask(TinyTask):
    """TinyTask on sequences of 40 tokens, so that a weight's gradient sums 120 products per
    call and the paths' different summation orders show in the last bits."""

    def dataset(self, cfg: TrainConfig) -> list[dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(3)
        x = torch.randn(self.items, 40, 6, generator=g)
        y = torch.stack([x[..., :3].sum(-1), x[..., 3:].prod(-1)], -1)
        return [{"x": x[i], "y": y[i]} for i in range(self.items)]


_RESUME = """
import json, sys
from pathlib import Path
import torch
sys.path.insert(0, {tests!r})
from ffid.engine import paths
from ffid.train import train
from test_train import cfg_for
from test_train_grad_paths import KW, SeqTask
torch.set_num_threads(1)
paths.set_rates("cpu", torch.float32, paths.Rates(**{rates!r}))
res = train(cfg_for(Path({root!r}), resume={state!r}, **KW), task=SeqTask())
values = {{n: v.tolist() for n, v in res.handle.trained_values().items()}}
print(json.dumps({{"losses": res.losses, "paths": res.handle.grad_paths(), "values": values}}))
"""


def _resume_in_fresh_process(root: Path, state: Path, rates: dict[str, float]) -> dict:
    env = dict(os.environ, FFID_RATES_CACHE="off", PYTHONWARNINGS="ignore")
    env.pop(paths.ENV_PATH, None)
    code = _RESUME.format(tests=str(Path(__file__).parent), rates=rates, root=str(root), state=str(state))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_resume_in_a_fresh_process_repeats_the_run_bit_for_bit(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(paths.ENV_PATH, raising=False)
    monkeypatch.setattr(paths, "_RATES", {})
    paths.set_rates("cpu", torch.float32, paths.Rates(**SAMPLED_WINS))
    full = train(cfg_for(tmp_path / "a", **KW), task=SeqTask())
    assert set(full.handle.grad_paths().values()) == {"sampled"}
    part = train(cfg_for(tmp_path / "b", save_every_n_steps=3, save_state=True, **KW), task=SeqTask())
    assert part.losses == full.losses
    state = tmp_path / "b" / "out" / "run-step00000003-state"
    meta = json.loads((state / "state.json").read_text())
    assert meta["grad_paths"] == full.handle.grad_paths()
    assert meta["grad_paths_by_rank"] == {"0": full.handle.grad_paths()}

    # The resuming process's own cost model prefers the dense path; the state's paths win.
    got = _resume_in_fresh_process(tmp_path / "b", state, DENSE_WINS)
    assert got["paths"] == full.handle.grad_paths()
    assert got["losses"] == full.losses  # bit for bit, loss history included
    want = {n: v.tolist() for n, v in full.handle.trained_values().items()}
    assert got["values"] == want

    # Without the recorded paths the same resume takes the dense path and drifts in the last
    # bits: the check above is not vacuous.
    bare = tmp_path / "bare-state"
    shutil.copytree(state, bare)
    meta.pop("grad_paths")
    meta.pop("grad_paths_by_rank")
    (bare / "state.json").write_text(json.dumps(meta))
    drift = _resume_in_fresh_process(tmp_path / "c", bare, DENSE_WINS)
    assert set(drift["paths"].values()) == {"dense"}
    assert drift["values"] != want


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
