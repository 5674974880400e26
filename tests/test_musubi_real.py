"""ffid as the network module of the real musubi-tuner (v0.3.4, unmodified source), on CPU.

musubi's own ``wan_train_network`` runs in a separate virtual environment (``.venv-musubi``, made
by ``.ci/run``) holding musubi's pinned dependencies, so the versions ffid's other tests run with
stay as they are. ``tests/musubi_real/launch.py`` does only what a CPU-only machine needs (stub
torchvision, a tiny Wan config, a working CPU block-swap function, a pretended FSDP/DeepSpeed
state for the refusals) and writes the caches with musubi's own cache writers.

Every run is declared once in :func:`scenarios` and run by one module fixture: the first
(``plain``, which also writes the tiny DiT and the caches) alone, then the others two at a time
(they may use ``plain``'s outputs); each test reads the results. Adding a scenario is one more
:class:`Scenario` line (e.g. extra ``network_args``) plus a test reading ``runs["name"]``.

Skips (with the reason) when musubi-tuner's source or the environment is absent, e.g. in a
user's clone; ``.ci/run`` sets ``FFID_REQUIRE_MUSUBI=1`` so that CI fails instead.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ffid
from ffid.checkpoint.delta import load_delta

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "tests" / "musubi_real" / "launch.py"
FF = "0.05"
TIMEOUT = 600


def _musubi_source() -> Path | None:
    env = os.environ.get("FFID_MUSUBI_SRC")
    candidates = [Path(env)] if env else []
    candidates += [p / "shared" / "third_party" / "musubi-tuner" for p in (ROOT.parent, ROOT.parent.parent)]
    found = (c for c in candidates if (c / "src" / "musubi_tuner" / "wan_train_network.py").is_file())
    return next(found, None)


def _musubi_python() -> Path | None:
    p = Path(os.environ.get("FFID_MUSUBI_PYTHON", ROOT / ".venv-musubi" / "bin" / "python"))
    return p if p.is_file() else None


def _missing() -> str | None:
    if _musubi_source() is None:
        return (
            "musubi-tuner's source is not here (looked for ../shared/third_party/musubi-tuner; "
            "set FFID_MUSUBI_SRC to a musubi-tuner v0.3.4 checkout)"
        )
    if _musubi_python() is None:
        return (
            "the musubi environment .venv-musubi is missing; .ci/run builds it (or set FFID_MUSUBI_PYTHON "
            "to a python with musubi-tuner's pinned dependencies)"
        )
    return None


@dataclass
class Scenario:
    """One musubi ``wan_train_network`` run (``expect_errors``: several runs that must fail)."""

    name: str
    args: list[str] = field(default_factory=list)  # musubi arguments on top of common()
    network_args: list[str] = field(default_factory=lambda: ["ffid=1"])  # ff= is added
    launcher: list[str] = field(default_factory=list)  # launch.py train options (--cpu-swap)
    steps: int = 2
    expect_errors: list[list[str]] | None = None


def common(root: Path, s: Scenario) -> list[str]:
    return [
        *f"--task t2v-tiny --sdpa --seed 42 --max_data_loader_n_workers 0 --learning_rate 1e-3 "
        f"--max_train_steps {s.steps} --network_module ffid.integrations.musubi".split(),
        *("--dit", str(root / "dit.safetensors"), "--dataset_config", str(root / "dataset.toml")),
        *("--output_dir", str(root / s.name), "--output_name", s.name),
        *("--network_args", f"ff={FF}", *s.network_args),
    ]


FP32_ADAMW = ["--mixed_precision", "no", "--optimizer_type", "AdamW"]


def scenarios(root: Path) -> list[Scenario]:
    plain = root / "plain"
    return [
        # character 1: AdamW, fp32, saved every 2 steps with state
        Scenario("plain", [*FP32_ADAMW, "--save_every_n_steps", "2", "--save_state"], steps=4),
        # the same run with musubi's in-block checkpointing and block swap: bit-identical values
        Scenario(
            "ckpt_swap",
            [*FP32_ADAMW, "--gradient_checkpointing", "--blocks_to_swap", "1"],
            launcher=["--cpu-swap"],
            steps=4,
        ),
        # steps 3-4 from the step-2 state: bit-identical to the 4-step run
        Scenario("resume", [*FP32_ADAMW, "--resume", str(plain / "plain-step00000002-state")]),
        # continue character 1 with bf16 autocast, AdamW8bit and max-norm scaling
        Scenario(
            "continue",
            [
                *("--mixed_precision", "bf16", "--optimizer_type", "AdamW8bit"),
                *("--scale_weight_norms", "0.05", "--network_weights", str(plain / "plain.safetensors")),
            ],
        ),
        # character 2 (id 2) trained on top of character 1, merged in by musubi (--base_weights)
        Scenario(
            "on_top",
            [*FP32_ADAMW, "--base_weights", str(plain / "plain.safetensors")],
            network_args=["ffid=2"],
        ),
        # the same, with preservation of the captions in the cache (musubi merges --base_weights
        # without metadata, so the protected prompts come from a text-encoder cache folder)
        Scenario(
            "preserve",
            [*FP32_ADAMW, "--base_weights", str(plain / "plain.safetensors")],
            network_args=["ffid=2", f"preserve_cache={root / 'cache'}", "preserve_weight=10"],
        ),
        # runs that ffid must refuse, through musubi's own calls
        Scenario(
            "refusals",
            expect_errors=[
                ["--dit_high_noise", str(root / "dit.safetensors"), "--timestep_boundary", "500"],
                ["--fp8_base", "--fp8_scaled"],
                ["--pretend", "FSDP"],
                ["--pretend", "DEEPSPEED"],
            ],
            steps=1,
        ),
    ]


@dataclass
class Run:
    scenario: Scenario
    returncode: int
    log: str
    out: Path

    def check(self) -> None:
        assert self.returncode == 0, f"musubi run {self.scenario.name!r} failed:\n{self.log[-6000:]}"

    def delta(self, name: str | None = None):  # type: ignore[no-untyped-def]
        return load_delta(self.out / f"{name or self.scenario.name}.safetensors")


def _env() -> dict[str, str]:
    src = _musubi_source()
    assert src is not None
    env = dict(os.environ)
    ffid_src = str(Path(ffid.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([str(src / "src"), ffid_src])
    env.setdefault("OMP_NUM_THREADS", "1")  # two runs share the CI's two cores
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _launch(argv: list[str], log: Path) -> tuple[int, str]:
    py = _musubi_python()
    assert py is not None
    with open(log, "w") as f:
        proc = subprocess.run(
            [str(py), str(LAUNCH), *argv], stdout=f, stderr=subprocess.STDOUT, env=_env(), timeout=TIMEOUT
        )
    return proc.returncode, log.read_text(errors="replace")


def _run(root: Path, s: Scenario, prepare: bool = False) -> Run:
    out = root / s.name
    if s.expect_errors is not None:
        argv = ["expect-errors"]
        for i, extra in enumerate(s.expect_errors):
            pretend = extra[:2] if extra[:1] == ["--pretend"] else []
            rest = extra[len(pretend) :]
            argv += (["---"] if i else []) + pretend + common(root, s) + ["--mixed_precision", "no", *rest]
    else:
        opts = (["--prepare", str(root)] if prepare else []) + s.launcher
        argv = ["train", *opts, "--", *common(root, s), *s.args]
    code, log = _launch(argv, root / f"{s.name}.log")
    return Run(s, code, log, out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Run]:
    reason = _missing()
    if reason:
        if os.environ.get("FFID_REQUIRE_MUSUBI") == "1":
            pytest.fail(f"FFID_REQUIRE_MUSUBI=1 but {reason}")
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("musubi")
    todo = scenarios(root)
    first = todo[0]
    results = {first.name: _run(root, first, prepare=True)}  # also writes the model and caches
    results[first.name].check()
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {s.name: pool.submit(_run, root, s) for s in todo[1:]}
        results.update({name: f.result() for name, f in futures.items()})
    return results


def _equal(a, b) -> list[str]:  # type: ignore[no-untyped-def]
    va, vb = a.values(), b.values()
    assert va.keys() == vb.keys()
    return [n for n in va if not torch.equal(va[n], vb[n])]


def test_trains_saves_every_n_steps_and_resumes_exactly(runs):
    plain, resume = runs["plain"], runs["resume"]
    plain.check()
    for f in ("plain-step00000002.safetensors", "plain-step00000004.safetensors", "plain.safetensors"):
        assert (plain.out / f).is_file(), f
    state = plain.out / "plain-step00000002-state"
    assert (state / "model.safetensors").stat().st_size < 1_000_000  # proxies, not the DiT
    d = plain.delta()
    assert d.info.selection_fingerprint and len(d) > 50  # every kind of tensor is touched
    assert _equal(d, plain.delta("plain-step00000002"))  # it trained
    assert any(".modulation" in n for n in d.tensors) and any("norm" in n for n in d.tensors)
    assert "network weights will be saved as torch.float32" in plain.log  # musubi's default
    resume.check()
    assert "resume training from local state" in resume.log
    assert _equal(resume.delta(), d) == []


def test_gradient_checkpointing_and_block_swap_give_identical_values(runs):
    run = runs["ckpt_swap"]
    run.check()
    assert "Gradient checkpointing enabled" in run.log and "Block swap enabled" in run.log
    swaps = int(re.search(r"FFID_TEST_SWAPS=(\d+)", run.log).group(1))  # type: ignore[union-attr]
    assert swaps > 0
    assert _equal(run.delta(), runs["plain"].delta()) == []


def test_network_weights_bf16_adamw8bit_and_scale_weight_norms(runs):
    run = runs["continue"]
    run.check()
    assert "use 8-bit AdamW optimizer" in run.log
    start = runs["plain"].delta()
    assert f"ffid: {start.selected:,} trained values" in run.log  # --network_weights loaded
    d = run.delta()
    assert d.info.selection_fingerprint == start.info.selection_fingerprint
    assert _equal(d, start)  # trained on
    base = load_file(run.out.parent / "dit.safetensors")
    values = d.values()
    for n, t in d.tensors.items():
        update = values[n] - base[n].reshape(-1)[t.indices].float()
        assert torch.isfinite(update).all(), n
        assert float(update.norm()) <= 0.05 * (1 + 1e-5), n  # --scale_weight_norms 0.05


def test_second_id_on_top_merged_and_loaded_by_musubi(runs, tmp_path):
    run = runs["on_top"]
    run.check()
    assert "merged" in run.log and "all weights merged" in run.log  # --base_weights went through ffid
    first, second = runs["plain"].delta(), run.delta()
    for n in set(first.tensors) & set(second.tensors):
        overlap = set(first.tensors[n].indices.tolist()) & set(second.tensors[n].indices.tolist())
        assert not overlap, n  # ids never touch the same weight
    root = run.out.parent
    merged = tmp_path / "merged.safetensors"
    cmd = [
        sys.executable,
        "-m",
        "ffid",
        "merge",
        str(root / "dit.safetensors"),
        str(runs["plain"].out / "plain.safetensors"),
        str(run.out / "on_top.safetensors"),
        "-o",
        str(merged),
        "-q",
    ]
    subprocess.run(cmd, check=True, timeout=TIMEOUT)
    changed_file = tmp_path / "changed.safetensors"
    argv = ["diff", str(root / "dit.safetensors"), str(merged), str(changed_file)]
    code, log = _launch(argv, tmp_path / "diff.log")
    assert code == 0, log[-4000:]
    changed = load_file(changed_file)
    want: dict[str, list[torch.Tensor]] = {}
    for d in (first, second):
        for n, t in d.tensors.items():
            want.setdefault(n, []).append(t.indices)
    assert changed.keys() == want.keys()
    merged_sd = load_file(merged)
    for n, parts in want.items():
        assert torch.equal(changed[n], torch.cat(parts).sort().values), n  # exactly the deltas' positions
    for d in (first, second):
        for n, v in d.values().items():
            assert torch.equal(merged_sd[n].reshape(-1)[d.tensors[n].indices], v), n  # fp32 base: exact


def test_preservation_runs_inside_musubi(runs):
    """Preservation reaches the proxies through musubi's own backward: same data, seed and id as
    ``on_top``, different trained values; still disjoint from character 1."""
    run, on_top = runs["preserve"], runs["on_top"]
    run.check()
    assert "ffid preservation: weight 10.0" in run.log and "'a photo of alice'" in run.log
    assert re.search(r"ffid preservation: distance [0-9.e+-]+ \(a photo of", run.log), run.log[-3000:]
    d = run.delta()
    assert d.info.selection_fingerprint == on_top.delta().info.selection_fingerprint
    assert _equal(d, on_top.delta())  # the preservation gradient changed what was trained
    first = runs["plain"].delta()
    for n in set(first.tensors) & set(d.tensors):
        assert not set(first.tensors[n].indices.tolist()) & set(d.tensors[n].indices.tolist()), n


def test_refusals_fire_through_musubi(runs):
    run = runs["refusals"]
    run.check()
    results = dict(re.findall(r"FFID_TEST_RESULT\[(\d)\]=(.*)", run.log))
    assert len(results) == 4, run.log[-4000:]
    high, fp8, fsdp, deepspeed = (results[str(i)] for i in range(4))
    assert high.startswith("ConfigError") and "each expert in its own run" in high
    assert fp8.startswith("ConfigError") and "drop --fp8_scaled" in fp8 and "--exclude" not in fp8
    assert fsdp.startswith("ConfigError") and "FSDP" in fsdp
    assert deepspeed.startswith("ConfigError") and "DeepSpeed" in deepspeed
    assert not (run.out).exists()  # nothing trained or saved
