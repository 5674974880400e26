"""Protection by projection inside musubi-tuner's training sequence (the fast stand-in,
tests/musubi_harness.py; the real musubi-tuner runs the same in tests/test_musubi_real.py).

character1 (id 1) is trained and merged; character2 (id 2, ``selector=rows``) trains on top of it
with ``preserve_method=projection`` and character1's text-encoder cache as ``preserve_cache``.
"""

from __future__ import annotations

import pytest
import torch

from ffid.errors import ConfigError
from musubi_harness import TinyWanModel, default_args, make_batches, run_training, tiny_wan_original
from test_integrations_musubi import _te_cache

PROJ = ["ff=0.04", "ffid=2", "selector=rows", "include=^blocks\\.", "preserve_method=projection"]
SMALL_PASS = ["preserve_draws=2", "preserve_steps=4"]  # a quick feature pass


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The merged character1 model and its text-encoder cache."""
    root = tmp_path_factory.mktemp("proj")
    first = run_training(default_args(network_args=["ff=0.05", "ffid=1"], max_train_steps=3))
    first.unwrapped.handle.merge()
    merged = {k: v.clone() for k, v in first.transformer.state_dict().items()}
    first.unwrapped.handle.detach()
    cache = _te_cache(root / "char1_cache", ["a photo of character1", "a photo of character1, smiling"])
    return {"merged": merged, "cache": cache, "root": root}


def _model(world) -> TinyWanModel:
    model = tiny_wan_original()
    model.load_state_dict(world["merged"])
    return model


def _run(world, *extra, steps=4, batches=None, **kw):
    args = default_args(
        network_args=[*PROJ, f"preserve_cache={world['cache']}", *SMALL_PASS, *extra],
        max_train_steps=steps,
        learning_rate=3e-2,
        **kw,
    )
    return run_training(args, transformer=_model(world), batches=batches)


def _values(res) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in res.unwrapped.handle.proxies()}


def _protected_drift(res, world) -> float:
    """How far the protected prompts' predictions moved from base + character1."""
    from safetensors import safe_open

    drift = 0.0
    for f in sorted(world["cache"].glob("*_wan_te.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            context = fh.get_tensor("varlen_t5_bf16").float()[None].expand(8, -1, -1)
        g = torch.Generator().manual_seed(3)
        x, t = torch.randn(8, 4, 1, 4, 4, generator=g), torch.rand(8, generator=g) * 1000
        model, handle = res.transformer, res.unwrapped.handle
        with torch.no_grad():
            student = model(x, t, context)
            with handle.teacher() as teacher:
                target = teacher(x, t, context)
        drift += float((student - target).pow(2).mean())
    return drift


def test_projection_keeps_each_step_off_the_protected_inputs(world):
    """After every optimizer step (hooked from outside musubi's loop) the change since the start
    has no component along the protected inputs; the protected prompts barely move, a plain run
    on the same rows moves them."""
    res = _run(world)
    proj = res.unwrapped.preservation
    assert proj.ready and proj.projector.stats.trained > 0
    moved = 0
    for t in proj.projector._trained:
        d = t.proxy.detach().view(t.rows, -1) - t.start
        assert torch.allclose(proj.projector._off(d, t.group), d, atol=1e-6), t.name
        moved += int(d.abs().max() > 0)
    assert moved > 0  # it trained
    plain = run_training(
        default_args(network_args=PROJ[:4], max_train_steps=4, learning_rate=3e-2), transformer=_model(world)
    )
    assert _protected_drift(res, world) < 0.2 * _protected_drift(plain, world)


def test_block_swap_and_checkpointing_change_no_bit(world):
    """The feature pass runs through the swapped model (musubi's schedule), so the bases and the
    trained values are the same bits as without swap."""
    a = _run(world)
    b = _run(world, blocks_to_swap=1, gradient_checkpointing=True)
    assert b.swaps > 0
    va, vb = _values(a), _values(b)
    assert va.keys() == vb.keys() and all(torch.equal(va[n], vb[n]) for n in va)


def test_accumulation_projects_only_on_real_steps(world):
    """With accumulation 2 accelerate steps the optimizer every second micro-step; the hooks
    project those steps only, and the result still lies off the protected inputs."""
    res = _run(world, steps=4, gradient_accumulation_steps=2)
    proj = res.unwrapped.preservation
    for t in proj.projector._trained:
        d = t.proxy.detach().view(t.rows, -1) - t.start
        assert torch.allclose(proj.projector._off(d, t.group), d, atol=1e-6), t.name


def test_resume_repeats_the_uninterrupted_run(world, tmp_path):
    """Steps 3-4 from the step-2 state give the 4-step run's bits: the bases are rebuilt from the
    latent shape the state recorded, whatever the resumed run's first batch looks like."""
    batches = make_batches(4, 2)
    full = _run(world, batches=batches, output_dir=str(tmp_path / "a"), save_every_n_steps=2, save_state=True)
    state = full.states[0]
    resumed = _run(world, batches=batches[2:], steps=2, resume=state, output_dir=str(tmp_path / "b"))
    record = resumed.unwrapped.ffid_projection_record
    assert torch.equal(record, full.unwrapped.ffid_projection_record) and int(record[0]) == 1
    va, vb = _values(full), _values(resumed)
    assert all(torch.equal(va[n], vb[n]) for n in va)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["selector=spread"], "add selector=rows"),
        (["preserve_weight=4"], "preserve_weight is a setting of preserve_method=loss"),
        (["preserve_energy=1.5"], "preserve_energy = 1.5 is outside"),
        (["preserve_energy=most"], "preserve_energy='most' is not a number"),
        (["preserve_draws=0"], "preserve_draws = 0 must be at least 1"),
        (["preserve_method=magic"], "preserve_method='magic' is unknown"),
        (["preserve_bases=gpu"], "preserve_bases = 'gpu' is not one of device, cpu"),
        (["preserve_tokens=-1"], "preserve_tokens = -1 is not a whole number >= 0"),
        (["preserve_tokens=many"], "preserve_tokens='many' is not an integer"),
    ],
)
def test_projection_refusals(world, extra, message):
    replaced = {e.split("=")[0] for e in extra}
    args = [a for a in PROJ if a.split("=")[0] not in replaced]
    model = _model(world)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=message):
        run_training(
            default_args(network_args=[*args, f"preserve_cache={world['cache']}", *extra], max_train_steps=1),
            transformer=model,
        )
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_loss_method_under_block_swap_names_projection(world):
    with pytest.raises(ConfigError, match="preserve_method=projection selector=rows"):
        run_training(
            default_args(
                network_args=["ff=0.05", "ffid=2", f"preserve_cache={world['cache']}"], blocks_to_swap=1
            )
        )


def test_fp8_linear_weights_with_swap_change_no_bit(world):
    """fp8 base weights (what musubi's --fp8_base stores) under bf16 autocast: the feature pass reads
    the fp8 base through the teacher, projection trains, and block swap still changes no bit.

    Only the Linear weights are fp8 here: on a CPU neither layer_norm nor a float32 region widens
    an fp8 vector (CUDA's autocast does), so a whole-model cast cannot run here with a selection
    that trains matrices only; the norms are not ffid's to read anyway.
    """

    class Fp8Matrices(TinyWanModel):
        def to(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            if torch.float8_e4m3fn not in (*args, kwargs.get("dtype")):
                return super().to(*args, **kwargs)
            for m in self.modules():  # the harness's --fp8_base cast, matrices only
                if isinstance(m, torch.nn.Linear):
                    w = m._parameters["weight"]  # the stored base (m.weight may be ffid's view)
                    w.data = w.data.to(torch.float8_e4m3fn)
            return self

    def run(**kw):  # type: ignore[no-untyped-def]
        model = _model(world)
        model.__class__ = Fp8Matrices
        args = default_args(
            network_args=[*PROJ, f"preserve_cache={world['cache']}", *SMALL_PASS],
            max_train_steps=4,
            learning_rate=3e-2,
            mixed_precision="bf16",
            fp8_base=True,
            **kw,
        )
        res = run_training(args, transformer=model)
        assert model.blocks[0].self_attn.q._parameters["weight"].dtype == torch.float8_e4m3fn
        return res

    a, b = run(), run(blocks_to_swap=1, gradient_checkpointing=True)
    assert a.unwrapped.preservation.ready and b.swaps > 0
    va, vb = _values(a), _values(b)
    assert all(torch.equal(va[n], vb[n]) for n in va)
    starts = {t.name: t.start for t in a.unwrapped.preservation.projector._trained}
    assert any(not torch.equal(va[n].view_as(starts[n]), starts[n]) for n in starts)


def test_block_swap_moves_as_many_blocks_per_step_as_a_plain_run(world):
    """Projection adds no forward to a step: over steps 3-4 the swapped blocks move as often as
    in an unprotected run (the feature pass moves them once, before the first step)."""

    def swaps(steps: int, protect: bool) -> int:
        net = [*PROJ, f"preserve_cache={world['cache']}", *SMALL_PASS] if protect else PROJ[:4]
        args = default_args(network_args=net, max_train_steps=steps, learning_rate=3e-2, blocks_to_swap=2)
        return run_training(args, transformer=_model(world)).swaps

    per_two_plain = swaps(4, False) - swaps(2, False)
    per_two_protected = swaps(4, True) - swaps(2, True)
    assert per_two_plain > 0 and per_two_protected == per_two_plain
