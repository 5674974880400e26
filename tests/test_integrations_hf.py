"""ffid.integrations.hf: a transformers Trainer trains only the proxies, saves deltas, resumes."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from ffid.errors import ConfigError, MismatchError, TrainingError
from tiny_models import tiny_gpt2

transformers = pytest.importorskip("transformers")

from ffid.integrations.hf import DELTA_NAME, attach_to_trainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyLM(torch.utils.data.Dataset):
    """16 fixed token sequences (a repeated pattern the model can learn)."""

    def __init__(self, n: int = 16, length: int = 12):
        g = torch.Generator().manual_seed(3)
        start = torch.randint(0, 90, (n, 1), generator=g)
        self.ids = (start + torch.arange(length)) % 97

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(out, **kw):
    base = dict(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        max_grad_norm=1.0,
    )
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _trainer(out, model=None, **kw):
    model = model if model is not None else tiny_gpt2()
    return transformers.Trainer(
        model=model, args=_args(out, **kw), train_dataset=TinyLM(), eval_dataset=TinyLM(4)
    )


def test_trainer_trains_only_the_proxies_and_checkpoints_deltas(tmp_path):
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _trainer(tmp_path, model)
    handle = attach_to_trainer(trainer, ff=0.05, ffid=1)
    assert type(trainer).__name__ == "FfidTrainer" and trainer.ffid_handle is handle
    trainer.train()
    # the optimizer holds exactly the proxies
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in handle.parameters()}
    # base weights untouched, proxies moved, loss went down
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    trained, base = handle.trained_values(), handle.base_values()
    assert any(not torch.equal(trained[n], base[n]) for n in trained)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0]
    # gradients do not leak across steps: Trainer zeroes the model, we zero the proxies
    assert all(p.grad is None for p in handle.parameters())
    for step in (2, 4):
        ckpt = tmp_path / f"checkpoint-{step}"
        assert (ckpt / DELTA_NAME).exists() and (ckpt / "optimizer.pt").exists()
        assert not (ckpt / "model.safetensors").exists()
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        assert (ckpt / DELTA_NAME).stat().st_size < 0.2 * model_bytes


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_reaches_every_proxy(tmp_path, reentrant):
    trainer = _trainer(
        tmp_path,
        max_steps=1,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": reentrant},
    )
    handle = attach_to_trainer(trainer, ff=0.05, ffid=1)
    trainer.train()
    trained, base = handle.trained_values(), handle.base_values()
    assert all(not torch.equal(trained[n], base[n]) for n in trained)


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    straight = _trainer(tmp_path / "a")
    h1 = attach_to_trainer(straight, ff=0.05, ffid=1)
    straight.train()

    resumed = _trainer(tmp_path / "a")  # fresh model, same output dir
    h2 = attach_to_trainer(resumed, ff=0.05, ffid=1)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    a, b = h1.trained_values(), h2.trained_values()
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=0, atol=1e-6)


def test_resume_with_another_selection_is_refused(tmp_path):
    first = _trainer(tmp_path, max_steps=2)
    attach_to_trainer(first, ff=0.05, ffid=1)
    first.train()
    other = _trainer(tmp_path, max_steps=2)
    attach_to_trainer(other, ff=0.05, ffid=2)
    with pytest.raises(MismatchError, match="same ff, ffid"):
        other.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_ffid_trainer_class_and_merge(tmp_path):
    from ffid.integrations.hf import FfidTrainer

    model = tiny_gpt2()
    trainer = FfidTrainer(
        model=model,
        args=_args(tmp_path, max_steps=2),
        train_dataset=TinyLM(),
        ff=0.05,
        ffid=3,
        ffid_options={"exclude": ["wpe"]},
    )
    trainer.train()
    handle = trainer.ffid_handle
    assert not any("wpe" in n for n in handle.selection)
    trained = handle.trained_values()
    handle.merge()
    handle.detach()
    sd = model.state_dict()
    for n, values in trained.items():
        assert torch.equal(sd[n].reshape(-1)[handle.selection.indices(n)], values.to(sd[n].dtype))


def test_user_optimizer_on_model_weights_is_refused(tmp_path):
    model = tiny_gpt2()
    trainer = transformers.Trainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=TinyLM(),
        optimizers=(torch.optim.AdamW(model.parameters(), lr=1e-3), None),
    )
    with pytest.raises(TrainingError, match=r"handle\.parameters"):
        attach_to_trainer(trainer, ff=0.05, ffid=1)


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"load_best_model_at_end": True, "eval_strategy": "steps"}, "load_best_model_at_end"),
    ],
)
def test_unsupported_trainer_settings_are_refused(tmp_path, kw, needle):
    trainer = _trainer(tmp_path, **kw)
    with pytest.raises(ConfigError, match=needle):
        attach_to_trainer(trainer, ff=0.05, ffid=1)
    assert all(p.requires_grad for p in trainer.model.parameters())  # nothing attached


@pytest.mark.parametrize(("flag", "needle"), [("fsdp", "FSDP"), ("deepspeed", "DeepSpeed ZeRO")])
def test_sharding_trainers_are_refused(flag, needle):
    # Trainer refuses FSDP/DeepSpeed outside a distributed launch, so the arguments are checked directly.
    from types import SimpleNamespace

    from ffid.integrations.hf import _check_args

    with pytest.raises(ConfigError, match=f"does not run under {needle}"):
        _check_args(SimpleNamespace(**{flag: "ds.json" if flag == "deepspeed" else True}))
    _check_args(SimpleNamespace(fsdp=None, deepspeed=None, load_best_model_at_end=False))


def test_attach_to_bare_model():
    model = tiny_gpt2()
    handle = attach_to_trainer(model, ff=0.05, ffid=1)
    assert handle.model is model and all(not p.requires_grad for p in model.parameters())
    with pytest.raises(ConfigError, match=r"Trainer or an nn\.Module"):
        attach_to_trainer(object(), ff=0.05, ffid=1)


_DDP_SCRIPT = """
import sys, torch, transformers
sys.path.insert(0, {tests!r})
from tiny_models import tiny_gpt2
from test_integrations_hf import TinyLM, _args
from ffid.integrations.hf import attach_to_trainer

torch.set_num_threads(1)
trainer = transformers.Trainer(model=tiny_gpt2(), args=_args({out!r}, max_steps=3, save_steps=3,
                               per_device_train_batch_size=2), train_dataset=TinyLM())
handle = attach_to_trainer(trainer, ff=0.05, ffid=1)
trainer.train()
rank = torch.distributed.get_rank()
values = {{"trained": handle.trained_values(), "base": handle.base_values()}}
torch.save(values, {out!r} + f"/rank{{rank}}.pt")
# see tests/test_integrations_distributed.py: torch 2.13's gloo can abort at interpreter shutdown
torch.distributed.barrier()
torch.distributed.destroy_process_group()
import os
sys.stdout.flush(); sys.stderr.flush(); os._exit(0)
"""


@pytest.mark.slow
def test_two_process_trainer_keeps_ranks_identical(tmp_path):
    """torchrun, 2 CPU processes (gloo): different data per rank, identical proxies after training."""
    import subprocess

    script = tmp_path / "train.py"
    tests = os.path.dirname(os.path.abspath(__file__))
    script.write_text(_DDP_SCRIPT.format(tests=tests, out=str(tmp_path)))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        str(script),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for name, values in r0["trained"].items():
        assert torch.equal(values, r1["trained"][name]), name
    assert any(not torch.equal(r0["trained"][n], r0["base"][n]) for n in r0["trained"])


def _char_tokenizer():
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["<eos>", *string.ascii_letters, *string.digits, *" .,;:!?'\"-()\n"]
    tok = Tokenizer(models.WordLevel(vocab={c: i for i, c in enumerate(chars[:97])}, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", unk_token="<eos>", pad_token="<eos>"
    )


def test_preservation_through_the_trainer_keeps_protected_texts(tmp_path):
    from ffid.checkpoint import apply_delta
    from ffid.preserve import TextPreservation

    first = _trainer(tmp_path / "one", max_steps=2, save_steps=2)
    attach_to_trainer(first, ff=0.05, ffid=1)
    first.train()
    delta1 = tmp_path / "one" / "checkpoint-2" / DELTA_NAME
    tok = _char_tokenizer()
    protected = ["The cat sat on the mat.", "Hello there"]

    def second(name, preserve):
        model = tiny_gpt2()
        apply_delta(model, delta1)
        trainer = transformers.Trainer(
            model=model, args=_args(tmp_path / name, max_steps=6, save_steps=6), train_dataset=TinyLM(),
            processing_class=tok,
        )
        handle = attach_to_trainer(trainer, ff=0.05, ffid=2, preserve=preserve)
        trainer.train()
        texts = TextPreservation(tok)
        batch = texts.preservation_batch(protected, torch.Generator())
        model.eval()  # no dropout: measure the weights' drift, not dropout noise
        with torch.no_grad():
            student = texts.preservation_outputs(model, batch)
            with handle.teacher() as teacher:
                target = texts.preservation_outputs(teacher, batch)
        history = [h for h in trainer.state.log_history if "loss" in h]
        return float(texts.preservation_distance(student, target, batch).mean()), history

    plain, _ = second("plain", None)
    kept, history = second(
        "kept", {"base_deltas": [str(delta1)], "prompts": protected, "weight": 100.0, "items": 3}
    )
    assert kept < 0.5 * plain, (kept, plain)
    assert all("preserve_distance" in h and "preserve/Hello there" in h for h in history)


def test_preservation_refusals_leave_the_model_alone(tmp_path):
    model = tiny_gpt2()
    before = {n: p for n, p in model.named_parameters()}
    trainer = _trainer(tmp_path, model)  # no tokenizer
    with pytest.raises(ConfigError, match="preserve needs the Trainer's tokenizer"):
        attach_to_trainer(trainer, ff=0.05, ffid=2, preserve={"prompts": ["x"]})
    with pytest.raises(ConfigError, match="preserve key 'wieght' is unknown; did you mean 'weight'"):
        attach_to_trainer(trainer, ff=0.05, ffid=2, preserve={"wieght": 2})
    with pytest.raises(ConfigError, match=r"preserve_weight = -1\.0"):
        attach_to_trainer(trainer, ff=0.05, ffid=2, preserve={"prompts": ["x"], "weight": -1})
    assert all(p.requires_grad for p in model.parameters())
    assert {n: p for n, p in model.named_parameters()} == before
    assert getattr(trainer, "ffid_handle", None) is None
    attach_to_trainer(trainer, ff=0.05, ffid=2)  # the model is free to attach again


def test_projection_through_the_trainer_keeps_protected_texts_exactly(tmp_path):
    """method = projection: the protected texts' answers stay the teacher's (up to rounding) while
    the plain run moves them; gradient checkpointing stays on through the feature pass."""
    from ffid.preserve import TextPreservation
    from tiny_models import tiny_llama

    tok = _char_tokenizer()
    protected = ["Hi"]

    def run(name, preserve):
        model = tiny_llama()
        model.gradient_checkpointing_enable()
        trainer = transformers.Trainer(
            model=model, args=_args(tmp_path / name, max_steps=4, save_steps=4, learning_rate=5e-2),
            train_dataset=TinyLM(), processing_class=tok,
        )
        handle = attach_to_trainer(
            trainer, ff=0.03, ffid=2, selector="rows", include=[r"^model\.layers\."], preserve=preserve
        )
        trainer.train()
        assert model.is_gradient_checkpointing
        texts = TextPreservation(tok)
        batch = texts.preservation_batch([*protected, ""], torch.Generator())
        model.eval()
        with torch.no_grad():
            student = texts.preservation_outputs(model, batch)
            with handle.teacher() as teacher:
                target = texts.preservation_outputs(teacher, batch)
        return float((student - target).abs().max() / target.abs().max())

    plain = run("plain", None)
    kept = run("kept", {"prompts": protected, "method": "projection", "energy": 1.0})
    assert plain > 1e-3, plain
    assert kept < 1e-5, kept
