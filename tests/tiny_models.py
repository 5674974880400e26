"""Tiny models built in code (no downloads, a few thousand parameters each).

Every factory is deterministic: it seeds its own generator, so two calls give identical weights.
Which of them the shared invariants run over, and with what inputs, is tests/matrix.py's table.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from torch import nn


class TinyMLPConv(nn.Module):
    """A plain conv + MLP net with a norm and a raw Parameter (like Wan's modulation)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32), nn.LayerNorm(32)) for _ in range(2)
        )
        self.modulation = nn.Parameter(torch.randn(1, 2, 32) * 0.1)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, 3, 2, 2]
        h = self.conv(x).flatten(1)  # [B, 32]
        for block in self.blocks:
            h = h + block(h * (1 + self.modulation[:, 0]) + self.modulation[:, 1])
        return self.head(h)

    @staticmethod
    def example_input(batch: int = 4, seed: int = 1) -> torch.Tensor:
        return torch.randn(batch, 3, 2, 2, generator=torch.Generator().manual_seed(seed))


def tiny_mlp(seed: int = 0) -> TinyMLPConv:
    torch.manual_seed(seed)
    return TinyMLPConv()


def tiny_wan(seed: int = 0, layers: int = 2):
    """A diffusers WanTransformer3DModel with dim 32 (2 heads x 16), ffn 64."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=16,
        ffn_dim=64,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=64,
    )


def tiny_wan_inputs(batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, 4, 1, 8, 8, generator=g),  # [B, C, F, H, W]
        "timestep": torch.tensor([500, 250][:batch] + [100] * max(0, batch - 2)),
        "encoder_hidden_states": torch.randn(batch, 6, 32, generator=g),  # [B, text tokens, text_dim]
    }


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(cfg)


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        bos_token_id=0, eos_token_id=0,
    )
    return LlamaForCausalLM(cfg)


def tiny_demo_spec():
    """The demo's model (ffid.demo.model) at test size: dim 32 (2 heads), 2 layers, ffn 64."""
    from ffid.demo.model import ModelSpec

    return ModelSpec(dim=32, heads=2, layers=2, ffn_dim=64, freq_dim=16)


def lm_inputs(batch: int = 2, length: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (batch, length), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}



def make_lm_folder(tmp: Path, factory) -> Path:
    """``tmp/lm``: a tiny causal LM saved with a character-level tokenizer (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["<eos>", *string.ascii_letters, *string.digits, *" .,;:!?'\"-()\n"]
    vocab = {c: i for i, c in enumerate(chars[:97])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    folder = tmp / "lm"
    factory().save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<eos>").save_pretrained(
        folder
    )
    return folder


def make_wan_folders(root: Path) -> tuple[Path, Path]:
    """``root/dit`` (the tiny Wan, saved) and ``root/cache`` (4 items of ffid's latent cache)."""
    from ffid.train.cache import write_cache

    tiny_wan().save_pretrained(root / "dit")
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 1, 8, 8, generator=g)  # [N, C, F, H, W]: images as 1-frame videos
    text = [torch.randn(5 + i, 32, generator=g) for i in range(4)]  # varying token counts
    write_cache(root / "cache", latents, text, [f"caption {i}" for i in range(4)])
    return root / "dit", root / "cache"
