"""vit.py — the Vision Transformer family of geofm, ViT-Tiny to ViT-15B.

A plain pre-norm ViT (Dosovitskiy et al., 2020) as the MAE encoder (He et al., 2021) uses it:
patch embedding for any number of spectral bands, a cls token, a fixed 2-D sin-cos positional
embedding, blocks with a fused qkv projection and `F.scaled_dot_product_attention`, and a final
LayerNorm. Parameter names follow the official MAE / timm layout (`patch_embed.proj`, `cls_token`,
`pos_embed`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`), so official
checkpoints load with `load_state_dict`.

This file knows nothing about distribution. Build any size without memory and initialise later:

    with torch.device("meta"):
        model = VisionTransformer(CONFIGS["vit_15b"])   # no storage allocated
    # fsdp_setup.parallelize() shards it, then materialises and initialises each shard.

Quick check of the model table:  python vit.py
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ViTConfig:
    img_size: int = 224  # input height = width, pixels
    patch_size: int = 16  # square patch side, pixels
    in_chans: int = 3  # spectral bands of the input (3 for RGB, 13 for Sentinel-2 L1C, ...)
    embed_dim: int = 768  # token width D
    depth: int = 12  # number of transformer blocks
    num_heads: int = 12  # attention heads; embed_dim must divide evenly
    mlp_dim: int = 3072  # hidden width of the MLP
    drop_path: float = 0.0  # stochastic-depth rate of the last block (fine-tuning only)

    def __post_init__(self):
        if self.img_size % self.patch_size != 0:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}; "
                             f"choose e.g. img_size={self.img_size // self.patch_size * self.patch_size}")
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.embed_dim % 4 != 0:
            # 2-D sin-cos embedding: half the width per axis, half of that for sin and for cos.
            raise ValueError(f"embed_dim {self.embed_dim} must be a multiple of 4 for the 2-D sin-cos embedding")
        if self.in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {self.in_chans}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


# The paper's model table (Tsaris et al. 2024, arXiv 2404.11706; docs/paper.md). Patch 14 from Huge up.
CONFIGS: dict[str, ViTConfig] = {
    "vit_tiny": ViTConfig(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_dim=128),  # tests, demo
    "vit_small": ViTConfig(embed_dim=384, depth=12, num_heads=6, mlp_dim=1536),
    "vit_base": ViTConfig(embed_dim=768, depth=12, num_heads=12, mlp_dim=3072),  # 86M
    "vit_large": ViTConfig(embed_dim=1024, depth=24, num_heads=16, mlp_dim=4096),  # 303M (MAE paper)
    "vit_huge": ViTConfig(patch_size=14, embed_dim=1280, depth=32, num_heads=16, mlp_dim=5120),  # 631M
    "vit_1b": ViTConfig(patch_size=14, embed_dim=1536, depth=32, num_heads=16, mlp_dim=6144),  # 908M
    "vit_3b": ViTConfig(patch_size=14, embed_dim=2816, depth=32, num_heads=32, mlp_dim=11264),  # 3.05B
    # ViT-5B: the paper lists width 1792, depth 56, MLP 15360, 16 heads (ViT-e, PaLI's encoder): only 3.8B parameters,
    # while it reports 5,349M. Width 2816 at depth 56 (the 3B model made deeper) counts 5.33B, matching the reported
    # size and the paper's memory measurements, so that is `vit_5b`. The listed dims remain available as `vit_e`.
    "vit_5b": ViTConfig(patch_size=14, embed_dim=2816, depth=56, num_heads=32, mlp_dim=11264),  # 5.33B
    "vit_e": ViTConfig(patch_size=14, embed_dim=1792, depth=56, num_heads=16, mlp_dim=15360),  # 3.8B
    "vit_15b": ViTConfig(patch_size=14, embed_dim=5040, depth=48, num_heads=48, mlp_dim=20160),  # 14.6B
}


def get_config(name: str, **overrides) -> ViTConfig:
    """A copy of CONFIGS[name] with fields overridden (e.g. in_chans=13, img_size=128)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(CONFIGS)}")
    return replace(CONFIGS[name], **overrides)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos positional embedding, (1 + L, D) with a zero cls row, or (L, D).

    Exactly the official MAE numbers: for the patch at grid row i, column j, the first D/2 dims
    encode j and the last D/2 encode i, each half [sin(pos*w), cos(pos*w)] with
    w_k = 1 / 10000^(k / (D/4)). Computed in float64 then cast, as the official numpy code does.
    """
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    positions = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(positions, positions, indexing="ij")

    def encode(pos):  # (L,) -> (L, D/2)
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    emb = torch.cat([encode(cols), encode(rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), emb], dim=0)
    return emb.float()


class PatchEmbed(nn.Module):
    """(B, C, H, W) image -> (B, L, D) patch tokens, a strided convolution = a Linear on each patch."""

    def __init__(self, cfg: ViTConfig, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.proj(x_BCHW).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)  # one fused matmul for q, k, v (bias on, as MAE)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        B, L, D = x_BLD.shape
        qkv = self.qkv(x_BLD).view(B, L, 3, self.num_heads, D // self.num_heads)
        q_BHLd, k_BHLd, v_BHLd = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        # SDPA picks a fused kernel (flash / memory-efficient / cuDNN) for the device and dtype.
        out_BHLd = F.scaled_dot_product_attention(q_BHLd, k_BHLd, v_BHLd)
        return self.proj(out_BHLd.transpose(1, 2).reshape(B, L, D))


# Process-wide SDPA switches (train.py --sdpa): "cudnn" leaves only cuDNN and the math fallback enabled, so the whole
# model runs that kernel wherever it supports the shape. MAE's encoder attends over only 50-65 tokens, where the
# kernels differ most (docs/paper.md).
SDPA_SWITCHES = {"flash": "enable_flash_sdp", "efficient": "enable_mem_efficient_sdp", "cudnn": "enable_cudnn_sdp"}
SDPA_CHOICES = ("auto", *SDPA_SWITCHES, "math")


def apply_sdpa_choice(choice: str) -> None:
    for name, switch in SDPA_SWITCHES.items():
        getattr(torch.backends.cuda, switch)(choice in ("auto", name))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as timm's ViT


def drop_path(x_BLD: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample, rescale the survivors."""
    if rate == 0.0 or not training:
        return x_BLD
    keep = 1.0 - rate
    mask = x_BLD.new_empty(x_BLD.shape[0], 1, 1).bernoulli_(keep)
    return x_BLD * mask / keep


class Block(nn.Module):
    """Pre-norm transformer block. fsdp_setup shards and checkpoints the model one Block at a time."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, drop_path_rate: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_dim)
        self.drop_path_rate = drop_path_rate

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        x_BLD = x_BLD + drop_path(self.attn(self.norm1(x_BLD)), self.drop_path_rate, self.training)
        return x_BLD + drop_path(self.mlp(self.norm2(x_BLD)), self.drop_path_rate, self.training)


def init_param_(name: str, param: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """Initialise one parameter in place from its name, as the original MAE does.

    A rule per name rather than per module, so that fsdp_setup can initialise a sharded model one
    full-size parameter at a time (same values as an unsharded build), and MAE's extra parameters
    (mask_token, decoder_*) follow the same rules.
    """
    with torch.no_grad():
        if name.endswith(("cls_token", "mask_token")):
            nn.init.normal_(param, std=0.02, generator=generator)
        elif name.endswith("bias"):
            nn.init.zeros_(param)
        elif param.ndim == 1:  # LayerNorm weight
            nn.init.ones_(param)
        elif param.ndim == 4:  # patch embedding: xavier as if it were a Linear on flattened patches
            nn.init.xavier_uniform_(param.view(param.shape[0], -1), generator=generator)
        else:  # every Linear weight, the fused qkv included (as the official code)
            nn.init.xavier_uniform_(param, generator=generator)


class VisionTransformer(nn.Module):
    """ViT encoder: (B, C, H, W) -> (B, 1 + L, D) normalised tokens, cls token first."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        # A persistent buffer, not a Parameter: it is never trained, FSDP leaves it whole, and the
        # state-dict key is still the official `pos_embed`.
        self.register_buffer("pos_embed", torch.zeros(1, cfg.num_patches + 1, D), persistent=True)
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(D, cfg.num_heads, cfg.mlp_dim, r) for r in rates)
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.init_weights()

    def init_buffers(self) -> None:
        """(Re)compute the fixed positional embeddings, e.g. after `to_empty` from the meta device."""
        with torch.no_grad():
            self.pos_embed.copy_(sincos_pos_embed_2d(self.cfg.embed_dim, self.cfg.grid_size)[None])

    def init_weights(self, seed: int = 0) -> None:
        """Deterministic MAE init of every parameter from `seed` (independent of the global RNG).

        A no-op on the meta device. Parameters are visited in `named_parameters()` order with one
        generator, which fsdp_setup replays per shard.
        """
        if self.cls_token.is_meta:
            return
        generator = torch.Generator(device=self.cls_token.device).manual_seed(seed)
        for name, param in self.named_parameters():
            init_param_(name, param, generator)
        self.init_buffers()

    def check_input(self, imgs: torch.Tensor) -> None:
        cfg = self.cfg
        if imgs.ndim != 4 or imgs.shape[1] != cfg.in_chans or imgs.shape[2:] != (cfg.img_size, cfg.img_size):
            raise ValueError(f"expected images of shape (batch, {cfg.in_chans}, {cfg.img_size}, {cfg.img_size}) "
                             f"(in_chans, img_size of the model config), got {tuple(imgs.shape)}")

    def forward(self, imgs_BCHW: torch.Tensor) -> torch.Tensor:
        self.check_input(imgs_BCHW)
        x_BLD = self.patch_embed(imgs_BCHW)
        cls_B1D = self.cls_token.expand(x_BLD.shape[0], -1, -1)
        # Cast the fp32 buffer to the compute dtype, else bf16 activations are promoted to fp32.
        x_BLD = torch.cat([cls_B1D, x_BLD], dim=1) + self.pos_embed.to(x_BLD.dtype)
        for block in self.blocks:
            x_BLD = block(x_BLD)
        return self.norm(x_BLD)


# ---- FLOPs: the one formula that train.py, tools/bench.py and eval.py use for TFLOP/s and MFU ----


def transformer_flops(num_tokens: int, dim: int, depth: int, mlp_dim: int) -> int:
    """Forward FLOPs of `depth` blocks on one sequence of `num_tokens` tokens.

    A matmul of (n x k) by (k x m) is 2·n·k·m FLOPs. Per block: qkv 2·N·D·3D, output projection
    2·N·D·D, MLP 2·2·N·D·M, attention scores QKᵀ and weighted sum AV 2·2·N²·D. Norms, GELU,
    softmax and residual adds are ignored (memory-bound, a few percent).
    """
    N, D, M = num_tokens, dim, mlp_dim
    return depth * (8 * N * D * D + 4 * N * D * M + 4 * N * N * D)


def vit_forward_flops(cfg: ViTConfig) -> int:
    """Forward FLOPs of one image through the encoder: patch embedding + blocks on 1 + L tokens."""
    patch_embed = 2 * cfg.num_patches * cfg.patch_size**2 * cfg.in_chans * cfg.embed_dim
    return patch_embed + transformer_flops(cfg.num_patches + 1, cfg.embed_dim, cfg.depth, cfg.mlp_dim)


def count_params(cfg: ViTConfig) -> int:
    """Encoder parameters, counted on the meta device (no memory, any size)."""
    with torch.device("meta"):
        return sum(p.numel() for p in VisionTransformer(cfg).parameters())


if __name__ == "__main__":
    print(f"{'model':<10} {'width':>6} {'depth':>5} {'MLP':>6} {'heads':>5} {'patch':>5} {'params':>9}  GFLOP/img")
    for name, c in CONFIGS.items():
        print(f"{name:<10} {c.embed_dim:>6} {c.depth:>5} {c.mlp_dim:>6} {c.num_heads:>5} {c.patch_size:>5} "
              f"{count_params(c) / 1e6:>8.1f}M {vit_forward_flops(c) / 1e9:>10.1f}")
