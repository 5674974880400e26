"""Train an ffid selection of a causal LM with the Hugging Face Trainer.

    python examples/hf_trainer_ffid.py --model /models/Qwen2.5-0.5B --text corpus.txt \\
        --ff 0.01 --ffid 1 --output out --max-steps 1000
    accelerate launch --multi_gpu --num_processes 2 examples/hf_trainer_ffid.py ...   # several GPUs
    python examples/hf_trainer_ffid.py ... --resume                                     # continue
    ffid merge /models/Qwen2.5-0.5B/model.safetensors out/ffid_delta.safetensors -o tuned.safetensors

``--tiny`` runs offline on a 2-layer GPT-2 built in code and synthetic tokens (a smoke test).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch


class Blocks(torch.utils.data.Dataset):
    """Fixed-length token blocks for causal LM training (labels = inputs)."""

    def __init__(self, ids: torch.Tensor, length: int):
        n = ids.numel() // length
        self.blocks = ids[: n * length].view(n, length)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def load(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.utils.data.Dataset]:
    if args.tiny:
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=2))
        ids = (torch.arange(4096) * 7) % 97  # a learnable periodic sequence
        return model, Blocks(ids, 16)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.bfloat16)
    with open(args.text, encoding="utf-8") as f:
        ids = torch.tensor(tok(f.read())["input_ids"])
    return model, Blocks(ids, args.length)


def main(argv: Sequence[str] | None = None) -> int:
    from transformers import Trainer, TrainingArguments

    from ffid.integrations.hf import attach_to_trainer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a local transformers model folder")
    p.add_argument("--text", help="a UTF-8 text file to train on")
    p.add_argument("--tiny", action="store_true", help="offline smoke test on a tiny GPT-2")
    p.add_argument("--ff", type=float, default=0.01)
    p.add_argument("--ffid", type=int, default=1)
    p.add_argument("--exclude", action="append", default=None, help="regex of tensors never trained")
    p.add_argument("--output", default="out")
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--save-steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    args = p.parse_args(argv)
    if not args.tiny and not (args.model and args.text):
        p.error("give --model and --text, or --tiny")

    model, data = load(args)
    targs = TrainingArguments(
        output_dir=args.output,
        max_steps=args.max_steps,
        save_steps=args.save_steps,
        learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size,
        logging_steps=10,
        bf16=not args.tiny and torch.cuda.is_available(),
        use_cpu=args.tiny,
        report_to=[],
    )
    trainer = Trainer(model=model, args=targs, train_dataset=data)
    handle = attach_to_trainer(trainer, ff=args.ff, ffid=args.ffid, exclude=args.exclude)
    print(handle.describe())
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    trainer.save_model()  # writes ffid_delta.safetensors into --output
    print(f"delta: {args.output}/ffid_delta.safetensors")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
