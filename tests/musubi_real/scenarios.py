"""The musubi-tuner runs of tests/test_musubi_real.py: what each run is, and how it is launched.

Every run is declared once in :func:`scenarios` as a :class:`Scenario`; :func:`_run` turns one
into a ``launch.py`` command line (``tests/musubi_real/launch.py``, run by the ``.venv-musubi``
Python) and returns its :class:`Run` (exit status, log, output folder). The test module's fixture
decides the order and reads the results. Adding a scenario is one more :class:`Scenario` line
(e.g. extra ``network_args``) here plus a test reading ``runs["name"]`` there.

This module runs in the test environment (it is imported by the test module, as
``tests/musubi_harness.py`` is); only ``launch.py`` runs in musubi's. Its name does not start with
``test_``, so pytest does not collect it.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import ffid
from ffid.checkpoint.delta import load_delta

ROOT = Path(__file__).resolve().parents[2]
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
