"""Wan 2.x DiT tensor shapes in the original (musubi-tuner / ComfyUI) naming, and the few
numbers (dim, ffn, layers, patch, VAE stride) that a header tells about any Wan DiT."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..manifest import Manifest, TensorInfo


@dataclass(frozen=True)
class WanConfig:
    """The few numbers that fix every tensor shape of a Wan text-to-video DiT."""

    description: str
    dim: int
    ffn_dim: int
    num_layers: int
    num_heads: int
    in_dim: int
    out_dim: int
    text_dim: int = 4096
    freq_dim: int = 256
    patch: tuple[int, int, int] = (1, 2, 2)

    @property
    def shape(self) -> WanShape:
        """The numbers of this config that fix activation sizes (what :func:`wan_shape` reads)."""
        return WanShape(self.dim, self.ffn_dim, self.num_layers, self.patch, self.in_dim)


WAN_CONFIGS: dict[str, WanConfig] = {
    "wan2.1-t2v-1.3b": WanConfig("Wan 2.1 T2V 1.3B (825 tensors, 1.42B params)", 1536, 8960, 30, 12, 16, 16),
    "wan2.2-ti2v-5b": WanConfig("Wan 2.2 TI2V 5B (825 tensors, 5.00B params)", 3072, 14336, 30, 24, 48, 48),
    "wan2.2-t2v-14b": WanConfig(
        "Wan 2.1/2.2 T2V 14B, one expert of A14B (1,095 tensors, 14.29B params)", 5120, 13824, 40, 40, 16, 16
    ),
}
WAN_CONFIGS["wan2.1-t2v-14b"] = WanConfig(
    "Wan 2.1 T2V 14B (same shapes as wan2.2-t2v-14b)", 5120, 13824, 40, 40, 16, 16
)


def wan_shapes(cfg: WanConfig) -> dict[str, tuple[int, ...]]:
    """name -> shape for every tensor of a Wan T2V DiT with config ``cfg``."""
    d, f = cfg.dim, cfg.ffn_dim
    pt, ph, pw = cfg.patch
    shapes: dict[str, tuple[int, ...]] = {
        "patch_embedding.weight": (d, cfg.in_dim, pt, ph, pw),
        "patch_embedding.bias": (d,),
        "text_embedding.0.weight": (d, cfg.text_dim),
        "text_embedding.0.bias": (d,),
        "text_embedding.2.weight": (d, d),
        "text_embedding.2.bias": (d,),
        "time_embedding.0.weight": (d, cfg.freq_dim),
        "time_embedding.0.bias": (d,),
        "time_embedding.2.weight": (d, d),
        "time_embedding.2.bias": (d,),
        "time_projection.1.weight": (6 * d, d),
        "time_projection.1.bias": (6 * d,),
        "head.head.weight": (cfg.out_dim * pt * ph * pw, d),
        "head.head.bias": (cfg.out_dim * pt * ph * pw,),
        "head.modulation": (1, 2, d),
    }
    for i in range(cfg.num_layers):
        b = f"blocks.{i}."
        for attn in ("self_attn", "cross_attn"):
            for proj in "qkvo":
                shapes[f"{b}{attn}.{proj}.weight"] = (d, d)
                shapes[f"{b}{attn}.{proj}.bias"] = (d,)
            shapes[f"{b}{attn}.norm_q.weight"] = (d,)
            shapes[f"{b}{attn}.norm_k.weight"] = (d,)
        shapes[f"{b}norm3.weight"] = (d,)
        shapes[f"{b}norm3.bias"] = (d,)
        shapes[f"{b}ffn.0.weight"] = (f, d)
        shapes[f"{b}ffn.0.bias"] = (f,)
        shapes[f"{b}ffn.2.weight"] = (d, f)
        shapes[f"{b}ffn.2.bias"] = (d,)
        shapes[f"{b}modulation"] = (1, 6, d)
    return shapes


def wan_manifest(name: str) -> Manifest:
    """Manifest of the Wan preset ``name`` (bf16, original naming)."""
    cfg = WAN_CONFIGS[name]
    tensors = [TensorInfo(n, s, "BF16", n) for n, s in wan_shapes(cfg).items()]
    return Manifest(tensors, f"preset {name}")


@dataclass(frozen=True)
class WanShape:
    """The numbers of a Wan DiT that fix its token count and activation sizes."""

    dim: int
    ffn: int
    layers: int
    patch: tuple[int, int, int]
    in_channels: int


# VAE compression: 4x in time for both; 8x in space for the Wan 2.1 VAE (16 latent channels),
# 16x for the Wan 2.2 VAE of the TI2V 5B (48 latent channels).
VAE_TIME_STRIDE = 4
VAE_SPACE_STRIDE = {16: 8, 48: 16}


def wan_shape(manifest: Manifest) -> WanShape | None:
    """Read dim/ffn/layers/patch of a Wan DiT from its manifest (original or diffusers naming);
    ``None`` when the manifest is not a Wan DiT."""
    if "patch_embedding.weight" not in manifest:
        return None
    pe = manifest["patch_embedding.weight"].shape
    if len(pe) != 5:
        return None
    ffn_names = ("blocks.0.ffn.0.weight", "blocks.0.ffn.net.0.proj.weight")
    ffn = next((manifest[n].shape[0] for n in ffn_names if n in manifest), None)
    if ffn is None:
        return None
    layers = len({b.index for b in manifest.blocks() if b.group == "blocks"})
    return WanShape(pe[0], ffn, layers, (pe[2], pe[3], pe[4]), pe[1])


# Layers whose input is the text conditioning alone, in the namings ffid meets (diffusers Wan,
# original Wan / musubi, the demo): projection protects them exactly, and the estimate counts
# their Grams at the text's token count.
TEXT_SIDE_PATTERN = (
    r"(^|\.)(attn2\.(to_k|to_v|add_k_proj|add_v_proj)|cross_attn\.(k|v|k_img|v_img)"
    r"|text_embedder\.linear_[12]|text_embedding\.[02])\.weight$"
)

# The umT5 input of the DiT's text embedding: its columns are the width of a stored text encoding.
TEXT_EMBEDDING_WEIGHTS = ("text_embedding.0.weight", "condition_embedder.text_embedder.linear_1.weight")


def wan_text_width(manifest: Manifest) -> int | None:
    """The text-encoder width a Wan DiT reads (umT5: 4096), from its manifest; ``None`` when the
    manifest has no Wan text embedding."""
    for name in TEXT_EMBEDDING_WEIGHTS:
        if name in manifest and len(manifest[name].shape) == 2:
            return int(manifest[name].shape[1])
    return None


def wan_tokens(shape: WanShape, height: int, width: int, frames: int) -> int:
    """Tokens of one video in the DiT: latent frames x latent rows x latent columns over the patch."""
    # Latent channels other than 16/48 (tiny test models) are taken as the Wan 2.1 VAE.
    stride = VAE_SPACE_STRIDE.get(shape.in_channels, VAE_SPACE_STRIDE[16])
    latent_frames = (frames - 1) // VAE_TIME_STRIDE + 1
    pt, ph, pw = shape.patch
    return math.ceil(latent_frames / pt) * math.ceil(height / stride / ph) * math.ceil(width / stride / pw)
