"""``handle.teacher()``: the model as it was before this run, exactly, with no copy and no trace.

The reference is built separately: a fresh model, the earlier delta applied with
``apply_delta`` (what a user loads for inference). The teacher must equal it bit for bit, after
real optimizer steps have moved this run's slice, on every model kind and selector.
"""

from __future__ import annotations

import pytest
import torch

from ffid import attach
from ffid.errors import TrainingError
from matrix import CASES, MODELS, SELECTORS, loss_of


def _outputs(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    if "x" in batch:
        return model(batch["x"])
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    return out.logits if hasattr(out, "logits") else out.sample


def _train_steps(handle, model, batch, steps=3):
    opt = handle.guard(torch.optim.AdamW(handle.parameters(), lr=5e-2))
    for _ in range(steps):
        loss_of(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize(("model_key", "sel_key"), CASES)
def test_teacher_equals_base_plus_earlier_delta_exactly(tmp_path, model_key, sel_key):
    factory, batch = MODELS[model_key].build, MODELS[model_key].batch(1)
    case = SELECTORS[sel_key]
    other = 1 if case.ffid != 1 else 0  # an earlier id of the same layout

    # run 1: an earlier id, trained and saved as a delta
    model = factory().eval()
    h1 = attach(model, case.plan(model, ffid=other))
    _train_steps(h1, model, batch)
    delta1 = tmp_path / "one.safetensors"
    h1.save_delta(delta1)
    h1.detach()

    # run 2 on top of run 1 (the trainer's base_deltas), trained for a few steps
    from ffid.checkpoint import apply_delta

    model = factory().eval()
    apply_delta(model, delta1)
    h2 = attach(model, case.plan(model))
    _train_steps(h2, model, batch)
    trained = {n: p.detach().clone() for n, p in h2.proxies()}
    student = _outputs(model, batch).detach()

    reference = factory().eval()
    apply_delta(reference, delta1)
    with torch.no_grad():
        expected = _outputs(reference, batch)

    with h2.teacher() as teacher:
        assert h2.in_teacher
        got = _outputs(teacher, batch)
        assert not got.requires_grad
    assert torch.equal(got, expected), "teacher differs from base + earlier delta"
    assert not torch.equal(student, expected), "run 2 did not change the output: the test proves nothing"

    # nothing of the training state moved: proxies, their grads, and the student's output
    assert not h2.in_teacher
    for n, p in h2.proxies():
        assert torch.equal(p.detach(), trained[n])
        assert p.grad is None
    again = _outputs(model, batch)
    assert torch.equal(again.detach(), student)
    assert again.requires_grad


def test_teacher_inside_a_training_step_leaves_gradients_alone():
    batch = MODELS["wan"].batch(1)
    model = MODELS["wan"].build().eval()
    handle = attach(model, ff=0.04, ffid=3)
    _train_steps(handle, model, batch, steps=2)

    def grads(with_teacher: bool) -> dict[str, torch.Tensor]:
        loss = loss_of(model, batch)
        if with_teacher:
            with handle.teacher() as teacher:
                _outputs(teacher, batch)
        loss.backward()
        out = {n: p.grad.clone() for n, p in handle.proxies()}
        for p in handle.parameters():
            p.grad = None
        return out

    plain, mixed = grads(False), grads(True)
    assert plain.keys() == mixed.keys()
    for n in plain:
        assert torch.equal(plain[n], mixed[n]), n


def test_teacher_nests_and_refuses_after_merge_or_detach():
    model = MODELS["mlp"].build().eval()
    handle = attach(model, ff=0.04, ffid=3)
    with handle.teacher(), handle.teacher():
        assert handle.in_teacher
    assert not handle.in_teacher
    handle.merge()
    with pytest.raises(TrainingError, match=r"after handle\.merge"), handle.teacher():
        pass
    handle.detach()
    with pytest.raises(TrainingError, match="detached"), handle.teacher():
        pass


def test_teacher_reads_an_fp8_base_outside_autocast():
    """musubi's --fp8_base stores Linear weights in fp8, and Wan runs its time embedding in a
    float32 region: the teacher widens the fp8 base to the input's dtype as training does,
    where the layer's own forward would multiply float32 by fp8 and fail."""
    import ffid

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    for m in model:
        m.weight.data = m.weight.data.to(torch.float8_e4m3fn)
    base = [m.weight.data.float().clone() for m in model]
    sel = ffid.plan(model, ff=0.25, ffid=1, selector="rows", slots=2)
    handle = attach(model, sel)
    x = torch.randn(3, 8)
    with handle.teacher() as teacher:
        got = teacher(x)
    want = torch.nn.functional.linear(
        torch.nn.functional.linear(x, base[0], model[0].bias), base[1], model[1].bias
    )
    assert torch.equal(got, want)
