"""The diffusers recipe: train an ffid selection of a Wan transformer, save the delta, apply it.

    python examples/diffusers_wan_ffid.py --transformer /models/Wan2.1-T2V-1.3B-Diffusers/transformer \\
        --latents cache.pt --ff 0.01 --ffid 1 --out character1.safetensors

``cache.pt`` holds a list of dicts with ``latents`` [C, F, H, W] and ``text`` [L, 4096] tensors
(VAE latents and T5 states computed beforehand, as musubi-tuner's cache scripts do). ``--tiny``
runs offline on a tiny WanTransformer3DModel and random latents (a smoke test).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch


def load(args: argparse.Namespace) -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    from diffusers import WanTransformer3DModel

    if args.tiny:
        torch.manual_seed(0)
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=4,
            out_channels=4,
            text_dim=32,
            freq_dim=16,
            ffn_dim=64,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=64,
        )
        g = torch.Generator().manual_seed(1)
        data = [
            {"latents": torch.randn(4, 1, 8, 8, generator=g), "text": torch.randn(6, 32, generator=g)}
            for _ in range(8)
        ]
        return model, data
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = WanTransformer3DModel.from_pretrained(args.transformer, torch_dtype=dtype)
    return model, torch.load(args.latents)


def main(argv: Sequence[str] | None = None) -> int:
    from ffid.integrations.diffusers import apply_delta_to_pipeline, attach_to_pipeline

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--transformer", help="a diffusers WanTransformer3DModel folder")
    p.add_argument("--latents", help="a torch file with the cached latents / text states")
    p.add_argument("--tiny", action="store_true", help="offline smoke test on a tiny model")
    p.add_argument("--ff", type=float, default=0.01)
    p.add_argument("--ffid", type=int, default=1)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--out", default="ffid_delta.safetensors")
    args = p.parse_args(argv)
    if not args.tiny and not (args.transformer and args.latents):
        p.error("give --transformer and --latents, or --tiny")

    model, data = load(args)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    model.to(device)
    handle = attach_to_pipeline(model, ff=args.ff, ffid=args.ffid)  # a pipeline or its transformer
    print(handle.describe())
    opt = torch.optim.AdamW(handle.parameters(), lr=args.lr)
    dtype = next(model.parameters()).dtype
    for step in range(args.steps):
        item = data[step % len(data)]
        x0 = item["latents"][None].to(device, dtype)
        noise = torch.randn_like(x0)
        t = torch.rand(1, device=device)
        noisy = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * noise  # flow matching
        pred = model(noisy, t * 1000, item["text"][None].to(device, dtype), return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), (noise - x0).float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.4f}")
    handle.save_delta(args.out)
    print(f"saved {args.out}")

    # Inference elsewhere: load the base transformer again and bake the delta in (base checked first).
    if args.tiny:
        fresh, _ = load(args)
        apply_delta_to_pipeline(fresh, args.out)
        x = data[0]["latents"][None]
        with torch.no_grad():
            same = torch.allclose(
                fresh(x, torch.tensor([500.0]), data[0]["text"][None], return_dict=False)[0],
                model(x, torch.tensor([500.0]), data[0]["text"][None], return_dict=False)[0],
                atol=1e-6,
            )
        print(f"applied delta reproduces the trained model: {same}")
        return 0 if same else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
