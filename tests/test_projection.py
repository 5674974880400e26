"""Protection by projection: exact on the text side, changes off the protected inputs, refusals."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from ffid.checkpoint import apply_delta
from ffid.cli import main
from ffid.demo.config import quick_config
from ffid.demo.data import encode_prompt
from ffid.demo.model import ModelSpec, build_model, predict
from ffid.demo.task import load_model, save_model
from ffid.errors import ConfigError
from ffid.preserve import ProjectionSettings, Projector, Protected
from ffid.preserve.projection import basis_from_gram
from ffid.train import config_from_mapping, train

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = ModelSpec(dim=32, heads=2, layers=2, ffn_dim=64, freq_dim=16)
PRIOR = {"zero": 0, "one": 1}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("projection") / "base.safetensors"
    save_model(build_model(SPEC, seed=0), SPEC, path)
    return path


def settings(out: Path, base: Path, name: str, digit: int, ffid: int, **extra: object) -> dict:
    return {
        "model_type": "demo",
        "model_path": str(base),
        "ff": 0.04,
        "ffid": ffid,
        "selector": "rows",
        "selector_args": {"slots": 8},
        "learning_rate": 3e-2,
        "max_train_steps": 6,
        "batch_size": 8,
        "seed": 5,
        "output_dir": str(out),
        "output_name": name,
        "logging_dir": "none",
        "progress": False,
        "preserve": "on",
        "preserve_method": "projection",
        "preserve_draws": 2,
        "preserve_times": 2,
        "task_args": {
            "concepts": {name: digit},
            "caption_dropout": 0.0,
            "prior": PRIOR,
            "prior_per_class": 4,
        },
        **extra,
    }


def run(out: Path, base: Path, name: str, digit: int, ffid: int, **extra: object):
    result = train(config_from_mapping(settings(out, base, name, digit, ffid, **extra)))
    result.handle.detach()
    return result


def outputs(model: torch.nn.Module, prompt: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 1, 1, 16, 16, generator=g)
    t = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.8, 1.0])
    with torch.no_grad():
        return predict(model.eval(), x, t, encode_prompt(prompt).expand(6, -1, -1))


def with_deltas(base: Path, deltas: list[Path]) -> torch.nn.Module:
    model, _ = load_model(base)
    for d in deltas:
        apply_delta(model, d)
    return model


def test_text_side_alone_keeps_every_protected_prompt_exactly(base: Path, tmp_path: Path) -> None:
    # Only the cross-attention K/V are trained (at a high rate, so a leak would show): the model's
    # answer to every protected prompt must stay the base's at any noise and time.
    result = run(
        tmp_path,
        base,
        "character1",
        7,
        1,
        include=[r"attn2\.to_[kv]\.weight$"],
        selector_args={"slots": 2},
        ff=0.02,
        learning_rate=0.1,
        max_train_steps=10,
    )
    trained = with_deltas(base, [result.final])
    reference, _ = load_model(base)
    changed = (outputs(trained, "a digit character1", 1) - outputs(reference, "a digit character1", 1)).abs()
    assert changed.max() > 1e-3  # the run did learn something for its own prompt
    for prompt in ["a digit zero", "a digit one", ""]:  # the regularisation prompts and the empty one
        for seed in (1, 2, 3):
            a, b = outputs(trained, prompt, seed), outputs(reference, prompt, seed)
            assert ((a - b).abs().max() / b.abs().max()) <= 1e-5, (prompt, seed)


def test_every_trained_change_is_off_the_protected_inputs(base: Path, tmp_path: Path) -> None:
    from ffid.demo.task import DemoTask

    model, spec = load_model(base)
    task = DemoTask([], model=model, spec=spec)
    from ffid.engine import attach

    handle = attach(model, ff=0.04, ffid=1, selector="rows", include=[r"^blocks\."], slots=8)
    try:
        protected = [Protected("a digit zero", "user"), Protected("", "empty")]
        projector = Projector(handle, task, protected, ProjectionSettings(energy=1.0, draws=2, times=2))
        stats = projector.collect(model, torch.Generator().manual_seed(0))
        assert stats.trained == len(handle.selection) and stats.exact_groups == 1
        # every block's cross-attention K/V read the same text features: one group for all of them
        kv = [n for n in handle.selection if "attn2.to_k" in n or "attn2.to_v" in n]
        assert len({id(t.group) for t in projector._trained if t.name in kv}) == 1
        opt = torch.optim.AdamW(handle.parameters(), lr=0.5)
        projector.install(opt)
        for _ in range(3):
            for p in handle.parameters():
                p.grad = torch.randn_like(p)
            opt.step()
        assert any(t.group.complement for t in projector._trained)  # both storages are exercised
        assert any(not t.group.complement for t in projector._trained)
        for t in projector._trained:
            q = t.group.basis
            if t.group.complement:  # q spans the free directions: the protected ones are the rest
                q = torch.linalg.svd(torch.eye(q.shape[0]) - q @ q.T).U[:, : t.group.rank]
            change = t.proxy.detach().view(t.rows, -1) - t.start
            assert change.abs().max() > 0 or t.group.rank == t.group.width
            assert (change @ q).abs().max() <= 1e-5 * max(1.0, float(change.abs().max())), t.name
    finally:
        handle.detach()


def test_two_proxy_sets_each_projected_with_its_own_bases(base: Path) -> None:
    """Wan 2.2's two experts in one run (handle.use_proxies): one projector per set, built while
    its set is active; a step that trains one set changes nothing of the other, and each set's
    change stays off its own protected inputs."""
    from torch import nn

    from ffid.demo.task import DemoTask
    from ffid.engine import attach

    model, spec = load_model(base)
    task = DemoTask([], model=model, spec=spec)
    handle = attach(model, ff=0.04, ffid=1, selector="rows", include=[r"^blocks\."], slots=8)
    try:
        protected = [Protected("a digit zero", "user")]
        keys = handle.proxy_keys()
        start_b = {n: v + 0.01 for n, v in handle.base_values().items()}  # another expert's base
        set_b = {keys[n]: nn.Parameter(v.clone()) for n, v in start_b.items()}
        settings = ProjectionSettings(energy=1.0, draws=1, times=2)
        proj_a = Projector(handle, task, protected, settings)
        proj_a.collect(model, torch.Generator().manual_seed(0))
        handle.use_proxies(set_b, start_b)
        proj_b = Projector(handle, task, protected, settings)
        proj_b.collect(model, torch.Generator().manual_seed(1))
        handle.use_proxies(None)
        set_a = list(handle.parameters())
        opt = torch.optim.AdamW([*set_a, *set_b.values()], lr=0.5)
        for step, trained in enumerate([set_a, list(set_b.values()), set_a]):
            before = {k: p.detach().clone() for k, p in set_b.items()}
            for p in trained:
                p.grad = torch.randn_like(p)
            opt.step()
            for proj in (proj_a, proj_b):
                if proj.has_grads():
                    proj.project()
            if trained is set_a:  # set B had no step: not a bit of it changed
                assert all(torch.equal(before[k], p.detach()) for k, p in set_b.items()), step
            opt.zero_grad(set_to_none=True)
        for proj in (proj_a, proj_b):
            assert {id(t.proxy) for t in proj._trained} == {
                id(p) for p in (set_a if proj is proj_a else set_b.values())
            }
            for t in proj._trained:
                q = t.group.basis
                if t.group.complement:
                    q = torch.linalg.svd(torch.eye(q.shape[0]) - q @ q.T).U[:, : t.group.rank]
                change = t.proxy.detach().view(t.rows, -1) - t.start
                assert (change @ q).abs().max() <= 1e-5 * max(1.0, float(change.abs().max())), t.name
    finally:
        handle.detach()


def test_bases_are_deterministic_and_keep_the_asked_energy() -> None:
    g = torch.Generator().manual_seed(0)
    scale = torch.linspace(3, 0.01, 16, dtype=torch.float64)
    x = torch.randn(200, 16, generator=g, dtype=torch.float64) * scale
    gram = x.T @ x
    q1, q2 = basis_from_gram(gram, 0.9, exact=False), basis_from_gram(gram.clone(), 0.9, exact=False)
    assert torch.equal(q1, q2)
    kept = float(((x @ q1) ** 2).sum() / (x**2).sum())
    assert kept >= 0.9
    assert q1.shape[1] < 16
    assert basis_from_gram(gram, 0.9, exact=True).shape[1] == 16  # the text side keeps every direction
    low = x[:, :3] @ torch.randn(3, 16, generator=g, dtype=torch.float64)
    assert basis_from_gram(low.T @ low, 1.0, exact=True).shape[1] == 3  # numerical rank, not width


def test_projection_recipe_of_the_demo() -> None:
    cfg = quick_config(preserve_method="projection").validate()
    recipe = cfg.preserved_recipe()
    assert recipe["selector"] == "rows" and recipe["preserve_method"] == "projection"
    assert quick_config().validate().preserved_recipe()["selector"] == cfg.selector


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"preserve_method": "projectoin"}, "preserve_method"),
        ({"preserve_energy": 0.0}, "preserve_energy = 0.0 is outside (0, 1]"),
        ({"preserve_energy": 1.5}, "preserve_energy = 1.5 is outside (0, 1]"),
        ({"selector": "spread", "selector_args": {}}, "use selector = 'rows'"),
        (
            {"preserve_empty": False, "preserve_regularisation": False},
            "there is no protected prompt",
        ),
        (
            {"preserve_energy": 1.0, "include": [r"^blocks\.0\.ffn"], "ff": 0.01},
            "no free direction in any trained row",
        ),
        ({"preserve_tokens": -5}, "preserve_tokens = -5 is not a whole number >= 0"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: dict, needle: str
) -> None:
    out = tmp_path / "out"
    cfg = settings(out, base, "character1", 7, 1, **extra)
    with pytest.raises(ConfigError) as err:
        train(config_from_mapping(cfg))
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()


def test_cli_refuses_an_unknown_method(base: Path, tmp_path: Path) -> None:
    code = main(
        [
            "train",
            "--model_type",
            "demo",
            "--model_path",
            str(base),
            "--ff",
            "0.04",
            "--ffid",
            "1",
            "--output_dir",
            str(tmp_path / "o"),
            "--preserve_method",
            "nope",
        ]
    )
    assert code == 2
    assert not (tmp_path / "o").exists()


def test_block_swap_changes_nothing(base: Path, tmp_path: Path) -> None:
    """The feature pass and the projected steps run through the block swapper like any forward:
    the same trained values with and without it (on a CPU the moves are no-ops on the same path)."""
    from safetensors.torch import load_file

    plain = run(tmp_path / "a", base, "character1", 7, 1, max_train_steps=3)
    swapped = run(tmp_path / "b", base, "character1", 7, 1, max_train_steps=3, blocks_to_swap=1)
    a, b = load_file(str(plain.final)), load_file(str(swapped.final))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_rebuilds_the_same_bases_and_repeats_the_run(base: Path, tmp_path: Path) -> None:
    whole = run(tmp_path / "whole", base, "character1", 7, 1)
    run(tmp_path / "part", base, "character1", 7, 1, save_every_n_steps=3, save_state=True)
    state = tmp_path / "part" / "character1-step00000003-state"
    assert state.is_dir()
    resumed = run(tmp_path / "part", base, "character1", 7, 1, resume=str(state))
    assert resumed.losses == whole.losses
    from safetensors.torch import load_file

    a, b = load_file(str(whole.final)), load_file(str(resumed.final))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_demo_with_projection_merges_disjoint_rows(tmp_path: Path) -> None:
    """Under projection every demo run trains the recipe's rows (character1 too), so the two ids
    stay disjoint in one layout and the merged file is exactly base + both deltas."""
    from ffid.demo.run import run_demo

    cfg = quick_config(
        output_dir=str(tmp_path / "demo"),
        preserve_method="projection",
        character2_mode="preserved",
        pretrain_steps=4,
        steps=3,
        samples=2,
        sample_steps=2,
        progress=False,
    ).validate()
    result = run_demo(cfg)
    report = result.report
    assert report["summary"]["merged_equals_deltas"] is True
    first, second = report["characters"]["character1"], report["characters"]["character2"]
    assert first["preserved"] and second["preserved"]  # character1 is projected off the base classes
    assert first["fingerprint"] != second["fingerprint"] and first["trainable"] == second["trainable"]


def test_ffid_train_writes_implicit_deltas(base: Path, tmp_path: Path) -> None:
    """delta_indices = implicit: values only, 4x smaller, applying exactly like explicit ones."""
    from ffid.checkpoint import DeltaFile

    explicit = run(tmp_path / "e", base, "character1", 7, 1, max_train_steps=2)
    implicit = run(tmp_path / "i", base, "character1", 7, 1, max_train_steps=2, delta_indices="implicit")
    assert DeltaFile(implicit.final).implicit and not DeltaFile(explicit.final).implicit
    assert implicit.final.stat().st_size < explicit.final.stat().st_size
    a, b = with_deltas(base, [explicit.final]), with_deltas(base, [implicit.final])
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    assert all(torch.equal(x, y) for x, y in pairs)


@contextlib.contextmanager
def _collected(base: Path, settings: ProjectionSettings, seed: int = 0, **attach_kw: object):
    """The demo model from ``base`` with a rows handle attached and a projector whose feature pass
    has run (protecting ``a digit zero``); yields ``(handle, projector)`` and detaches after."""
    from ffid.demo.task import DemoTask
    from ffid.engine import attach

    model, spec = load_model(base)
    task = DemoTask([], model=model, spec=spec)
    handle = attach(model, ff=0.04, ffid=1, selector="rows", slots=8, **attach_kw)
    try:
        projector = Projector(handle, task, [Protected("a digit zero", "user")], settings)
        projector.collect(model, torch.Generator().manual_seed(seed))
        yield handle, projector
    finally:
        handle.detach()


def test_bases_kept_on_the_cpu_give_the_same_bits(base: Path) -> None:
    """``bases="cpu"``: each basis stays in host memory and is moved for its product only; the
    projected values are the same bits as with the bases beside the trained values."""
    results = []
    for place in ("device", "cpu"):
        settings = ProjectionSettings(energy=0.99, draws=1, times=2, bases=place)
        with _collected(base, settings, include=[r"^blocks\."]) as (handle, projector):
            assert all(g.basis is None or g.basis.device.type == "cpu" for g in projector._groups)
            opt = torch.optim.AdamW(handle.parameters(), lr=0.5)
            projector.install(opt)
            torch.manual_seed(3)
            for _ in range(2):
                for p in handle.parameters():
                    p.grad = torch.randn_like(p)
                opt.step()
            results.append({n: p.detach().clone() for n, p in handle.proxies()})
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])
    with pytest.raises(ConfigError, match="preserve_bases = 'gpu'"):
        ProjectionSettings(bases="gpu").validate()


def _bases(base: Path, tokens: int, seed: int = 0) -> dict[str, tuple[torch.Tensor, bool]]:
    """Each input group's basis (first member -> (basis, exact)) after a feature pass."""
    settings = ProjectionSettings(energy=0.99, draws=1, times=2, tokens=tokens)
    with _collected(base, settings, seed) as (_, projector):
        return {g.members[0]: (g.basis.clone(), g.exact) for g in projector._groups if g.basis is not None}


def test_token_budget_samples_the_image_side_only(base: Path) -> None:
    """``tokens``: an image-side layer folds a seeded sample of each input's token rows into its
    Gram (scaled back to the whole input). A budget at or above the tokens an input has changes
    no bit; a smaller one is the same bits run to run, and leaves the text side whole."""
    whole = _bases(base, 0)
    assert any(exact for _, exact in whole.values()) and not all(exact for _, exact in whole.values())
    tokens = (SPEC.image_size // SPEC.patch) ** 2  # 64 per image
    for budget in (tokens, 4096):
        same = _bases(base, budget)
        assert all(torch.equal(same[n][0], whole[n][0]) for n in whole)
    small = _bases(base, 8)
    assert all(torch.equal(small[n][0], b) for n, (b, _) in _bases(base, 8).items())  # deterministic
    assert all(torch.equal(small[n][0], whole[n][0]) for n, (_, exact) in whole.items() if exact)
    assert any(
        small[n][0].shape != whole[n][0].shape or not torch.equal(small[n][0], whole[n][0])
        for n, (_, exact) in whole.items()
        if not exact
    )


@pytest.mark.parametrize("tokens", [-1, True, 2.5])
def test_a_bad_token_budget_is_refused(tokens: object) -> None:
    with pytest.raises(ConfigError, match=r"preserve_tokens = .* is not a whole number >= 0"):
        ProjectionSettings(tokens=tokens).validate()  # type: ignore[arg-type]


def test_the_token_budget_is_one_number() -> None:
    """The trainer's default (a light config without torch) is the feature pass's."""
    from ffid.estimate.projection import TOKEN_BUDGET
    from ffid.preserve.projection import DEFAULT_TOKENS
    from ffid.train.config import TrainConfig

    assert TrainConfig().preserve_tokens == DEFAULT_TOKENS == ProjectionSettings().tokens == TOKEN_BUDGET
