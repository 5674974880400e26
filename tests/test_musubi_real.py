"""ffid as the network module of the real musubi-tuner (v0.3.4, unmodified source), on CPU.

musubi's own ``wan_train_network`` runs in a separate virtual environment (``.venv-musubi``, made
by ``.ci/run``) holding musubi's pinned dependencies, so the versions ffid's other tests run with
stay as they are. ``tests/musubi_real/launch.py`` does only what a CPU-only machine needs (stub
torchvision, a tiny Wan config, a working CPU block-swap function, a pretended FSDP/DeepSpeed
state for the refusals) and writes the caches with musubi's own cache writers.

Every run is declared once in :func:`scenarios` and run by one module fixture: the first
(``plain``, which also writes the tiny DiT and the caches) alone, then the others two at a time,
each once the run it names in ``after`` is done (``plain`` by default); each test reads the
results. Adding a scenario is one more
:class:`Scenario` line (e.g. extra ``network_args``) plus a test reading ``runs["name"]``.

Skips (with the reason) when musubi-tuner's source or the environment is absent, e.g. in a
user's clone; ``.ci/run`` sets ``FFID_REQUIRE_MUSUBI=1`` so that CI fails instead.
"""

from __future__ import annotations

import os
import re
import shlex
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
    after: str = "plain"  # the run whose outputs this one uses (runs start once it is done)
    raw: bool = False  # args are the whole command line (the README's runs), without common()


def common(root: Path, s: Scenario) -> list[str]:
    return [
        *f"--task t2v-tiny --sdpa --seed 42 --max_data_loader_n_workers 0 --learning_rate 1e-3 "
        f"--max_train_steps {s.steps} --network_module ffid.integrations.musubi".split(),
        *("--dit", str(root / "dit.safetensors"), "--dataset_config", str(root / "dataset.toml")),
        *("--output_dir", str(root / s.name), "--output_name", s.name),
        *("--network_args", f"ff={FF}", *s.network_args),
    ]


FP32_ADAMW = ["--mixed_precision", "no", "--optimizer_type", "AdamW"]
# --fp8_base is left out here: on a CPU, musubi's Wan cannot run an fp8 layer that ffid does not
# train (CPU autocast widens fp8 neither for layer_norm nor in the float32 time embedding; on CUDA
# autocast does). The rows selector trains matrices only, so the norms stay fp8 there. The fp8
# path with projection is tested in tests/test_musubi_projection.py (the stand-in).
PROJ_FLAGS = ["--mixed_precision", "bf16", "--gradient_checkpointing", "--optimizer_type", "AdamW"]
ACC2 = ["--gradient_accumulation_steps", "2"]


PROJ_NET = ["ffid=2", "selector=rows", "slots=4", "preserve_method=projection"]
PROJ_NET += ["preserve_draws=1", "preserve_times=2", "preserve_steps=3"]


def _proj(root: Path, *extra: str) -> list[str]:
    return [*PROJ_FLAGS, "--base_weights", str(root / "plain" / "plain.safetensors"), *extra]


README = ROOT / "README.md"


def readme_wan22(root: Path) -> tuple[list[list[str]], list[list[str]]]:
    """The musubi runs and ``ffid merge`` commands of the README's "Wan 2.2 A14B" block, with what
    the tiny config on a CPU needs replaced (each replacement named here, nothing else changed)."""
    section = README.read_text().split("### Wan 2.2 A14B", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    out = root / "readme"
    replace = {
        "/models/wan2.2_t2v_low_noise_14B_fp16.safetensors": str(root / "dit.safetensors"),
        "/models/wan2.2_t2v_high_noise_14B_fp16.safetensors": str(root / "dit_high.safetensors"),
        "char1.toml": str(root / "dataset.toml"),
        "char2.toml": str(root / "dataset.toml"),
    }
    flags = {  # flag -> tiny value: 3 blocks, a few steps, CPU autocast, a boundary both sides reach
        "--task": "t2v-tiny",
        "--timestep_boundary": "500",
        "--blocks_to_swap": "1",
        "--mixed_precision": "bf16",
        "--output_dir": str(out),
    }
    variables: dict[str, str] = {}
    runs, merges = [], []
    for line in block.splitlines():
        m = re.match(r"^([A-Z0-9_]+)=\"(.*)\"$", line.strip())
        if m:
            variables[m.group(1)] = m.group(2)
            continue
        for name, value in variables.items():
            line = line.replace("$" + name, value)
        words = [replace.get(w, w) for w in shlex.split(line)]
        words = [str(out / w[len("output/") :]) if w.startswith("output/") else w for w in words]
        for i, w in enumerate(words[:-1]):
            if w in flags:
                words[i + 1] = flags[w]
        if words[:2] == ["accelerate", "launch"]:
            args = words[words.index("src/musubi_tuner/wan_train_network.py") + 1 :]
            epochs = args.index("--max_train_epochs")
            args[epochs : epochs + 2] = ["--max_train_steps", "6"]
            runs.append([*args, "--max_data_loader_n_workers", "0"])
        elif words[:2] == ["ffid", "merge"]:
            merges.append(words[2:])
    return runs, merges


def scenarios(root: Path) -> list[Scenario]:
    plain = root / "plain"
    cache = root / "cache"
    proj_net = [*PROJ_NET, f"preserve_cache={cache}"]
    experts = ["--dit_high_noise", str(root / "dit_high.safetensors"), "--timestep_boundary", "500"]
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
        # character 2 protected by projection with the seed's flags: bf16, in-block checkpointing,
        # accumulation 2; then the same with musubi's block swap (its offloader, CPU copies
        # standing in for CUDA streams)
        Scenario("proj_acc", _proj(root, *ACC2), proj_net, steps=2),
        # the same without preserve_cache: the protected prompts' encodings come from the
        # --base_weights delta itself (character 1 stored them); the same bits as proj_acc
        Scenario("proj_stored", _proj(root, *ACC2), PROJ_NET, steps=2),
        # (its bases kept in host memory, preserve_bases=cpu: the same bits)
        Scenario(
            "proj_swap",
            _proj(root, *ACC2, "--blocks_to_swap", "1"),
            [*proj_net, "preserve_bases=cpu"],
            ["--cpu-swap"],
            steps=2,
        ),
        # without accumulation (musubi's own resume is not exact with it, see the test), saved
        # with its state at step 2; then steps 3-4 from that state
        Scenario("proj", _proj(root, "--save_every_n_steps", "2", "--save_state"), proj_net, steps=4),
        Scenario(
            "proj_resume",
            _proj(root, "--resume", str(root / "proj" / "proj-step00000002-state")),
            proj_net,
            steps=2,  # musubi counts the resumed run's steps from 0, as the resume scenario does
            after="proj",
        ),
        # character 2 on musubi's scaled-fp8 DiT (--fp8_scaled: block Linears in fp8 with per-block
        # scales) with block swap, checkpointing and bf16 autocast, character 1 merged in by ffid
        Scenario(
            "fp8_scaled",
            [
                *("--mixed_precision", "bf16", "--optimizer_type", "AdamW", "--gradient_checkpointing"),
                *("--fp8_base", "--fp8_scaled", "--blocks_to_swap", "1"),
                *("--base_weights", str(plain / "plain.safetensors")),
            ],
            network_args=["ffid=2"],
            launcher=["--cpu-swap"],
        ),
        # both Wan 2.2 experts in one run (--dit_high_noise): one trained set and one delta each;
        # then continued from both deltas (--network_weights)
        Scenario(
            "experts",
            [
                *FP32_ADAMW,
                *("--dit_high_noise", str(root / "dit_high.safetensors"), "--timestep_boundary", "500"),
            ],
            steps=6,
        ),
        Scenario(
            "experts_more",
            [
                *FP32_ADAMW,
                *experts,
                *("--network_weights", str(root / "experts" / "experts.safetensors")),
            ],
            steps=6,  # the same timesteps as "experts": its fifth step is a high-noise one
            after="experts",
        ),
        # character 2 with both experts on top of the two-expert character 1: musubi merges its
        # low-noise delta, ffid the high-noise twin when musubi first loads that expert
        Scenario(
            "experts_on_top",
            [*FP32_ADAMW, *experts, "--base_weights", str(root / "experts" / "experts.safetensors")],
            network_args=["ffid=2"],
            steps=6,
            after="experts",
        ),
        # character 2 on both experts, protected by projection: one feature pass per expert, each
        # through its own weights at times in its own range
        Scenario(
            "experts_proj",
            [*PROJ_FLAGS, *experts, "--base_weights", str(root / "experts" / "experts.safetensors")],
            proj_net,
            steps=6,
            after="experts",
        ),
        # the README's Wan 2.2 A14B commands on the tiny config (see readme_wan22)
        Scenario("readme1", readme_wan22(root)[0][0], launcher=["--cpu-swap"], raw=True),
        Scenario("readme2", readme_wan22(root)[0][1], launcher=["--cpu-swap"], raw=True, after="readme1"),
        # runs that ffid must refuse, through musubi's own calls
        Scenario(
            "refusals",
            expect_errors=[
                [*experts, "--network_args", f"ff={FF}", "ffid=2", f"preserve_cache={cache}"],
                ["--blocks_to_swap", "1", "--network_args", f"ff={FF}", "ffid=2", f"preserve_cache={cache}"],
                [*experts, "--base_weights", str(plain / "plain.safetensors")],  # one expert's delta
                # the pretended distributed states stay in accelerate's shared state: last
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
        argv = ["train", *opts, "--", *([] if s.raw else common(root, s)), *s.args]
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
    waiting = todo[1:]
    while waiting:  # each wave: the runs whose input run is done, two at a time
        wave = [s for s in waiting if s.after in results]
        assert wave, f"scenarios wait on runs that never come: {[s.after for s in waiting]}"
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = {s.name: pool.submit(_run, root, s) for s in wave}
            results.update({name: f.result() for name, f in futures.items()})
        waiting = [s for s in waiting if s.name not in results]
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


def _merge_and_diff(
    root: Path, deltas: list[Path], tmp_path: Path, base: str = "dit.safetensors"
) -> tuple[dict, dict]:
    """``ffid merge`` the deltas into the tiny DiT ``base``; load both files with musubi's own Wan
    loader. Returns (per tensor: the flat positions that differ, the merged file's tensors)."""
    merged = tmp_path / f"merged-{base}"
    cmd = [sys.executable, "-m", "ffid", "merge", str(root / base), *map(str, deltas)]
    subprocess.run([*cmd, "-o", str(merged), "-q"], check=True, timeout=TIMEOUT)
    changed_file = tmp_path / f"changed-{base}"
    argv = ["diff", str(root / base), str(merged), str(changed_file)]
    code, log = _launch(argv, tmp_path / f"diff-{base}.log")
    assert code == 0, log[-4000:]
    return load_file(changed_file), load_file(merged)


def _check_merged(runs, run: Run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Character 1 and ``run`` (character 2 on top) merged: the file differs from the base exactly
    at the deltas' positions, and holds their values there (the tiny DiT is fp32: exact)."""
    first, second = runs["plain"].delta(), run.delta()
    for n in set(first.tensors) & set(second.tensors):
        overlap = set(first.tensors[n].indices.tolist()) & set(second.tensors[n].indices.tolist())
        assert not overlap, n  # ids never touch the same weight
    paths = [runs["plain"].out / "plain.safetensors", run.out / f"{run.scenario.name}.safetensors"]
    changed, merged_sd = _merge_and_diff(run.out.parent, paths, tmp_path)
    want: dict[str, list[torch.Tensor]] = {}
    for d in (first, second):
        for n, t in d.tensors.items():
            want.setdefault(n, []).append(t.indices)
    assert changed.keys() == want.keys()
    for n, parts in want.items():
        assert torch.equal(changed[n], torch.cat(parts).sort().values), n  # exactly the deltas' positions
    for d in (first, second):
        for n, v in d.values().items():
            assert torch.equal(merged_sd[n].reshape(-1)[d.tensors[n].indices], v), n


def test_second_id_on_top_merged_and_loaded_by_musubi(runs, tmp_path):
    run = runs["on_top"]
    run.check()
    assert "merged" in run.log and "all weights merged" in run.log  # --base_weights went through ffid
    _check_merged(runs, run, tmp_path)


def test_fp8_scaled_with_block_swap_merges_exactly_into_the_file(runs, tmp_path):
    """--fp8_scaled: trained through musubi's scaled-fp8 Linears, under block swap; the trained
    elements start from the file's values, so ``ffid merge`` (which checks the delta's base
    fingerprint against the file) accepts it and the merged file holds its values exactly."""
    run = runs["fp8_scaled"]
    run.check()
    assert "Number of monkey-patched Linear layers" in run.log  # musubi's scaled fp8 is on
    m = re.search(r"ffid: fp8 DiT: (\d+) trained tensors start from", run.log)
    assert m and int(m.group(1)) > 10, run.log[-3000:]
    assert "scaled-fp8 Linear" in run.log and "Block swap enabled" in run.log
    assert int(re.search(r"FFID_TEST_SWAPS=(\d+)", run.log).group(1)) > 0  # type: ignore[union-attr]
    d = run.delta()
    base = load_file(run.out.parent / "dit.safetensors")
    moved = [
        n for n, v in d.values().items() if not torch.equal(v, base[n].reshape(-1)[d.tensors[n].indices])
    ]
    assert any(".self_attn." in n or ".ffn." in n for n in moved)  # scaled weights trained
    _check_merged(runs, run, tmp_path)


def test_both_experts_one_run_one_delta_each(runs, tmp_path):
    """--dit_high_noise: each expert trains its own values at the same positions; each delta
    merges into its own expert's file only (ffid merge refuses the other one, naming the expert)."""
    run = runs["experts"]
    run.check()
    assert "ffid: both Wan 2.2 experts" in run.log
    assert "switched the DiT to the high_noise expert" in run.log  # musubi used both experts
    root = run.out.parent
    low, high = run.delta(), run.delta("experts_high_noise")
    assert low.metadata["ffid.expert"] == "low_noise" and high.metadata["ffid.expert"] == "high_noise"
    assert low.metadata["ffid.expert_pair"].split()[0] == high.metadata["ffid.expert_pair"].split()[0]
    assert low.info.selection_fingerprint == high.info.selection_fingerprint
    for n in low.tensors:
        assert torch.equal(low.tensors[n].indices, high.tensors[n].indices), n  # same positions
    for d, file in ((low, "dit.safetensors"), (high, "dit_high.safetensors")):
        base = load_file(root / file)
        moved = [
            n for n, v in d.values().items() if not torch.equal(v, base[n].reshape(-1)[d.tensors[n].indices])
        ]
        assert moved, f"the {d.metadata['ffid.expert']} expert was not trained"
        # loaded back by musubi's own loader: differs from the expert's file at exactly the positions
        changed, got = _merge_and_diff(root, [d.path], tmp_path, base=file)
        assert changed.keys() == d.tensors.keys()
        for n, v in d.values().items():
            assert torch.equal(changed[n], d.tensors[n].indices), n
            assert torch.equal(got[n].reshape(-1)[d.tensors[n].indices], v), n
    wrong = [sys.executable, "-m", "ffid", "merge", str(root / "dit.safetensors"), str(high.path)]
    proc = subprocess.run([*wrong, "-o", str(tmp_path / "wrong.safetensors")], capture_output=True, text=True)
    assert proc.returncode == 2 and "high_noise expert" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "wrong.safetensors").exists()
    shown = subprocess.run(
        [sys.executable, "-m", "ffid", "inspect", str(high.path)], capture_output=True, text=True
    )
    assert "expert=high_noise (Wan 2.2)" in shown.stdout, shown.stdout + shown.stderr
    more = runs["experts_more"]
    more.check()
    assert "high-noise expert from experts_high_noise.safetensors" in more.log
    assert "switched the DiT to the high_noise expert" in more.log
    assert _equal(more.delta("experts_more_high_noise"), high)  # continued from it and trained on


def test_both_experts_on_top_of_both_experts(runs, tmp_path):
    """Character 2 (id 2) with both experts on top of the two-expert character 1: each expert's file
    takes both characters' deltas of that expert, checked against its own base fingerprints."""
    run = runs["experts_on_top"]
    run.check()
    assert "merged experts_high_noise.safetensors into the high-noise expert" in run.log
    root = run.out.parent
    first = runs["experts"].out
    for file, twin in (("dit.safetensors", ""), ("dit_high.safetensors", "_high_noise")):
        deltas = [first / f"experts{twin}.safetensors", run.out / f"experts_on_top{twin}.safetensors"]
        merged = tmp_path / f"both-{file}"
        cmd = [
            sys.executable,
            "-m",
            "ffid",
            "merge",
            str(root / file),
            *map(str, deltas),
            "-o",
            str(merged),
            "-q",
        ]
        subprocess.run(cmd, check=True, timeout=TIMEOUT)  # verifies every delta against this file
        got = load_file(merged)
        for path in deltas:
            d = load_delta(path)
            for n, v in d.values().items():
                assert torch.equal(got[n].reshape(-1)[d.tensors[n].indices], v), (path.name, n)


def test_readme_wan22_commands_run(runs, tmp_path):
    """The README's Wan 2.2 A14B block (both experts, --fp8_scaled, block swap, AdamW8bit, two
    characters), run by the real musubi on the tiny config, then its two ``ffid merge`` lines."""
    for name in ("readme1", "readme2"):
        run = runs[name]
        run.check()
        assert "ffid: fp8 DiT:" in run.log and "ffid: both Wan 2.2 experts" in run.log
        assert "switched the DiT to the high_noise expert" in run.log
    assert "into the high-noise expert" in runs["readme2"].log
    _, merges = readme_wan22(runs["plain"].out.parent)
    assert len(merges) == 2
    for words in merges:
        words = [str(tmp_path / Path(w).name) if w.startswith("/ComfyUI/") else w for w in words]
        subprocess.run([sys.executable, "-m", "ffid", "merge", *words, "-q"], check=True, timeout=TIMEOUT)
        got = load_file(words[words.index("-o") + 1])
        for path in words[1 : words.index("-o")]:
            d = load_delta(path)
            assert d.metadata["ffid.expert"] == ("high_noise" if "_high_noise" in path else "low_noise")
            for n, v in d.values().items():
                assert torch.equal(got[n].reshape(-1)[d.tensors[n].indices], v), (path, n)


def test_projection_with_both_experts(runs):
    """Projection protects through the right expert: one feature pass per expert, when musubi
    first trains it, at times in that expert's range (boundary 0.5 here), each expert's values
    projected with its own bases."""
    run = runs["experts_proj"]
    run.check()
    assert "ffid feature pass done (low_noise expert, times 0-0.5)" in run.log, run.log[-3000:]
    assert "ffid feature pass done (high_noise expert, times 0.5-1)" in run.log
    assert "merged experts_high_noise.safetensors into the high-noise expert" in run.log
    low, high = run.delta(), run.delta("experts_proj_high_noise")
    assert low.info.selector == high.info.selector == "rows"
    root = run.out.parent
    for d, file in ((low, "dit.safetensors"), (high, "dit_high.safetensors")):
        base = load_file(root / file)
        values = d.values()
        assert any(not torch.equal(v, base[n].reshape(-1)[d.tensors[n].indices]) for n, v in values.items())


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
    assert len(results) == 5, run.log[-4000:]
    high, _swap, one_expert, fsdp, deepspeed = (results[str(i)] for i in range(5))
    assert one_expert.startswith("ConfigError") and "holds one expert's values" in one_expert
    assert high.startswith("ConfigError") and "preservation loss with both Wan 2.2" in high
    assert fsdp.startswith("ConfigError") and "FSDP" in fsdp
    assert deepspeed.startswith("ConfigError") and "DeepSpeed" in deepspeed
    assert not (run.out).exists()  # nothing trained or saved


def test_projection_under_block_swap_with_accumulation(runs):
    """character 2 protected by projection with the seed's flags (bf16 autocast, in-block
    checkpointing, accumulation 2; fp8: see PROJ_FLAGS): block swap changes no bit.

    What differs from a GPU run: musubi's offloader moves weights with a CPU copy instead of its
    CUDA stream exchange (launch.py ``--cpu-swap``); the calls, their order and the forward-only /
    training switching around the feature pass are musubi's own code.
    """
    acc, swap = runs["proj_acc"], runs["proj_swap"]
    for run in (acc, swap):
        run.check()
        assert "ffid feature pass done" in run.log and "trained rows have no free direction" in run.log
    assert "Block swap enabled" in swap.log and "Block swap set to forward only" in swap.log
    assert int(re.search(r"FFID_TEST_SWAPS=(\d+)", swap.log).group(1)) > 0  # type: ignore[union-attr]
    d = acc.delta()
    assert d.info.selector == "rows"
    assert not _equal(d, swap.delta()), "block swap changed trained values"


def test_projection_from_the_encodings_the_delta_stores(runs):
    """Character 1's delta records its captions and stores their text encodings (found through
    --dataset_config), both experts' deltas the same ones; character 2 protected with
    --base_weights and no preserve_cache trains exactly what it trains from the cache."""
    from ffid.checkpoint.delta import DeltaFile

    plain = runs["plain"]
    assert "ffid: the deltas record 2 caption(s) and store the text encodings of 2" in plain.log
    with DeltaFile(plain.out / "plain.safetensors") as df:
        assert df.text_prompts == ["a photo of alice", "a photo of bob"]
        assert df.text_width == 4096 and df.text.dtypes == ("BF16",) and df.text.nbytes == 122_880
        stored = df.text_encodings()
    cache = plain.out.parent / "cache"
    for name, prompt in (("alice", "a photo of alice"), ("bob", "a photo of bob")):
        te = load_file(cache / f"{name}_wan_te.safetensors")
        assert torch.equal(stored[prompt], next(iter(te.values()))), name  # bit for bit, as cached
    experts = runs["experts"].out
    low, high = (DeltaFile(experts / f"experts{s}.safetensors") for s in ("", "_high_noise"))
    with low, high:
        assert low.text_prompts == high.text_prompts == list(stored)
        for prompt, t in low.text_encodings().items():
            assert torch.equal(high.read_text(prompt), t) and torch.equal(stored[prompt], t), prompt
    run = runs["proj_stored"]
    run.check()
    assert "2 prompt(s) from the text encodings stored in plain.safetensors, 0 from preserve_cache" in run.log
    assert "ffid feature pass done" in run.log
    assert _equal(run.delta(), runs["proj_acc"].delta()) == [], "stored encodings protect differently"


def test_projection_resume_repeats_the_uninterrupted_run(runs):
    """Steps 3-4 from the step-2 state repeat the 4-step run bit for bit: the bases are rebuilt
    from the latent shape the state recorded.

    Without accumulation: with ``--gradient_accumulation_steps 2`` musubi 0.3.4's own resume is
    not exact, with or without ffid's protection (measured: a plain ``selector=rows`` run resumed
    at step 2 differs in 36 of 72 stored tensors).
    """
    proj, resumed = runs["proj"], runs["proj_resume"]
    proj.check()
    resumed.check()
    assert "resume training from local state" in resumed.log and "ffid feature pass done" in resumed.log
    assert not _equal(proj.delta(), resumed.delta()), "the resumed run differs from the uninterrupted one"


def test_loss_method_under_block_swap_names_projection(runs):
    run = runs["refusals"]
    result = dict(re.findall(r"FFID_TEST_RESULT\[(\d)\]=(.*)", run.log))["1"]
    assert result.startswith("ConfigError") and "preserve_method=projection" in result
