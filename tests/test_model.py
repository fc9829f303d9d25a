"""vit.py and mae.py against independent computations written here."""

import math

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mae import MaskedAutoencoder, mae_forward_flops
from vit import CONFIGS, VisionTransformer, count_params, drop_path, get_config, sincos_pos_embed_2d, vit_forward_flops
from weights import load_mae_checkpoint

TINY = CONFIGS["vit_tiny"]  # 32 px, patch 8 -> 16 patches, width 64


def tiny_mae(**kw):
    torch.manual_seed(0)
    return MaskedAutoencoder(TINY, decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4, **kw)


# ---- model table ----

PAPER_PARAMS = {"vit_base": 87e6, "vit_large": 304e6, "vit_huge": 635e6, "vit_1b": 914e6,
                "vit_3b": 3067e6, "vit_5b": 5349e6, "vit_15b": 14720e6}


@pytest.mark.parametrize("name", PAPER_PARAMS)
def test_param_counts_match_paper(name):
    counted = count_params(CONFIGS[name])
    assert abs(counted - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.02, (name, counted)


# (width, depth, MLP, heads, patch) as the paper's table prints them; vit_5b is the documented
# exception (docs/paper.md section 2): the 3B width at depth 56, the printed dims being vit_e.
PAPER_DIMS = {"vit_base": (768, 12, 3072, 12, 16), "vit_large": (1024, 24, 4096, 16, 16),
              "vit_huge": (1280, 32, 5120, 16, 14), "vit_1b": (1536, 32, 6144, 16, 14),
              "vit_3b": (2816, 32, 11264, 32, 14), "vit_5b": (2816, 56, 11264, 32, 14),
              "vit_e": (1792, 56, 15360, 16, 14), "vit_15b": (5040, 48, 20160, 48, 14)}


@pytest.mark.parametrize("name", PAPER_DIMS)
def test_paper_dims(name):
    c = CONFIGS[name]
    assert (c.embed_dim, c.depth, c.mlp_dim, c.num_heads, c.patch_size) == PAPER_DIMS[name]
    assert (c.img_size, c.in_chans) == (224, 3)


# Encoder sizes at 224 px counted independently with the fixed position table as a parameter (as the
# official code stores it), in millions, rounded as docs/paper.md section 2 lists them.
COUNTED_WITH_POS_TABLE = {"vit_base": 85.8, "vit_large": 303.3, "vit_huge": 630.8, "vit_1b": 907.9,
                          "vit_3b": 3048.6, "vit_5b": 5333.3, "vit_e": 3805.4, "vit_15b": 14638.7}


@pytest.mark.parametrize("name", COUNTED_WITH_POS_TABLE)
def test_param_count_by_hand(name):
    c = CONFIGS[name]
    D, M, C, p = c.embed_dim, c.mlp_dim, c.in_chans, c.patch_size
    # per Block: 2 LayerNorms (2D each), qkv (3D² + 3D), proj (D² + D), fc1 (DM + M), fc2 (MD + D)
    block = 4 * D * D + 2 * D * M + 9 * D + M
    by_hand = (D * C * p * p + D) + D + c.depth * block + 2 * D  # patch embedding, cls, blocks, final norm
    assert count_params(c) == by_hand
    assert round((by_hand + (c.num_patches + 1) * D) / 1e6, 1) == COUNTED_WITH_POS_TABLE[name]


# ---- positional embedding ----

def test_sincos_matches_formula():
    D, g = 16, 3
    emb = sincos_pos_embed_2d(D, g).numpy()
    assert emb.shape == (1 + g * g, D)
    assert np.all(emb[0] == 0)  # cls row
    omega = [1 / 10000 ** (k / (D // 4)) for k in range(D // 4)]
    for i in range(g):  # grid row
        for j in range(g):  # grid column
            row = emb[1 + i * g + j]
            expect = ([math.sin(j * w) for w in omega] + [math.cos(j * w) for w in omega]
                      + [math.sin(i * w) for w in omega] + [math.cos(i * w) for w in omega])
            np.testing.assert_allclose(row, expect, atol=1e-6)


# ---- patches ----

@pytest.mark.parametrize("C", [3, 13])
def test_patchify_order_and_roundtrip(C):
    cfg = get_config("vit_tiny", in_chans=C)
    model = MaskedAutoencoder(cfg, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)
    imgs = torch.randn(2, C, 32, 32)
    x = model.patchify(imgs)
    p, g = 8, 4
    assert x.shape == (2, g * g, p * p * C)
    # Element (b, patch at grid (h, w), pixel (r, q) of the patch, channel c) by hand: (p, q, c) order.
    for (b, h, w, r, q, c) in [(0, 0, 0, 0, 0, 0), (1, 2, 3, 5, 7, C - 1), (0, 3, 1, 2, 6, 1)]:
        assert x[b, h * g + w, (r * p + q) * C + c] == imgs[b, c, h * p + r, w * p + q]
    assert torch.equal(model.unpatchify(x), imgs)


# ---- masking ----

def test_random_masking_invariants():
    model = tiny_mae()
    B, L, D = 4, 16, 64
    x = torch.randn(B, L, D)
    noise = torch.rand(B, L)
    for ratio in [0.0, 0.5, 0.75, 0.9]:
        kept, mask, ids_restore = model.random_masking(x, ratio, noise)
        K = int(L * (1 - ratio))
        assert kept.shape == (B, K, D)
        assert torch.all(mask.sum(1) == L - K)
        ids_shuffle = torch.argsort(noise, dim=1)
        assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(L).expand(B, L))
        for b in range(B):
            order = np.argsort(noise[b].numpy(), kind="stable")  # ascending noise
            assert {i for i in range(L) if mask[b, i] == 0} == set(order[:K].tolist())  # the K lowest stay
            assert torch.equal(kept[b], x[b, torch.from_numpy(order[:K])])  # in ascending-noise order


def test_loss_equals_hand_computation():
    model = tiny_mae().eval()
    imgs = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, 16)
    for norm_pix in (True, False):
        model.norm_pix_loss = norm_pix
        loss, pred, mask = model(imgs, mask_ratio=0.75, noise=noise)
        total, count = 0.0, 0
        for b in range(3):
            removed = np.argsort(noise[b].numpy(), kind="stable")[4:]  # int(16 * 0.25) = 4 kept
            for idx in removed:
                h, w = divmod(int(idx), 4)
                patch = imgs[b, :, h * 8:(h + 1) * 8, w * 8:(w + 1) * 8].permute(1, 2, 0).reshape(-1).double().numpy()
                if norm_pix:
                    patch = (patch - patch.mean()) / math.sqrt(patch.var(ddof=1) + 1e-6)
                total += ((pred[b, idx].detach().double().numpy() - patch) ** 2).mean()
                count += 1
        assert count == 36 and mask.sum() == 36
        assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_mask_ratio_zero_encoder_is_plain_vit():
    mae = tiny_mae()
    vit = VisionTransformer(TINY)
    vit.load_state_dict(mae.encoder_state_dict())
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    latent, mask, ids_restore = mae.forward_encoder(imgs, 0.0, noise)
    assert mask.sum() == 0
    # Attention is permutation-equivariant, so unshuffling the latent must give the plain forward.
    patches = torch.gather(latent[:, 1:], 1, ids_restore.unsqueeze(-1).expand(-1, -1, 64))
    expect = vit(imgs)
    torch.testing.assert_close(latent[:, 0], expect[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(patches, expect[:, 1:], atol=1e-5, rtol=1e-5)


# ---- training signal ----

def test_gradients_reach_every_trainable_parameter():
    model = tiny_mae()
    loss, _, _ = model(torch.randn(2, 3, 32, 32))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    names = dict(model.named_parameters())
    assert "pos_embed" not in names and "decoder_pos_embed" not in names  # fixed, never trained
    assert "pos_embed" in model.state_dict()


def test_init_matches_recipe():
    model = tiny_mae()
    # Position tables by hand at one entry each: encoder (D 64) patch at grid row 2, column 1, dim 3 =
    # sin(column · ω_3), ω_3 = 1/10000^(3/16); decoder (D 32) dim 24 = cos(row · ω_0) = cos(2).
    assert model.pos_embed[0, 1 + 2 * 4 + 1, 3].item() == pytest.approx(math.sin(1 / 10000 ** (3 / 16)), abs=1e-6)
    assert model.decoder_pos_embed[0, 1 + 2 * 4 + 1, 24].item() == pytest.approx(math.cos(2.0), abs=1e-6)
    assert torch.all(model.pos_embed[0, 0] == 0) and torch.all(model.decoder_pos_embed[0, 0] == 0)
    tokens = torch.cat([model.cls_token.flatten(), model.mask_token.flatten()])  # 96 draws of normal(0.02)
    assert tokens.std().item() == pytest.approx(0.02, rel=0.25) and tokens.abs().max() < 0.1
    # xavier_uniform: U(±sqrt(6 / (fan_in + fan_out))); the fused qkv as one (3D, D) matrix, the patch
    # embedding as a Linear on flattened patches (fans D and C·p², not the conv default's C·p² and D·p²)
    for name, w, fans in [("qkv", model.blocks[0].attn.qkv.weight, 3 * 64 + 64),
                          ("decoder_pred", model.decoder_pred.weight, 32 + 8 * 8 * 3),
                          ("patch_embed", model.patch_embed.proj.weight, 64 + 3 * 8 * 8)]:
        bound = math.sqrt(6 / fans)
        assert 0.9 * bound < w.abs().max() <= bound, name
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1), name  # a uniform's std
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.all(p == 0), name
        elif "norm" in name:
            assert torch.all(p == 1), name
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))


def test_drop_path_drops_whole_samples_and_rescales():
    x = torch.randn(400, 3, 8) + 5  # no exact zeros
    torch.manual_seed(0)
    out = drop_path(x, 0.25, training=True)
    kept = out.flatten(1).ne(0).all(1)
    dropped = out.flatten(1).eq(0).all(1)
    assert torch.all(kept | dropped)  # each sample whole: kept or dropped, never in part
    torch.testing.assert_close(out[kept], x[kept] / 0.75)
    assert 0.65 < kept.float().mean().item() < 0.85  # 300 of 400 expected, σ ≈ 8.7
    assert drop_path(x, 0.25, training=False) is x and drop_path(x, 0.0, training=True) is x


def test_meta_build_then_init_equals_normal_build():
    normal = tiny_mae()
    with torch.device("meta"):
        meta = MaskedAutoencoder(TINY, decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4)
    meta.to_empty(device="cpu")
    meta.init_weights()
    for (k, a), (_, b) in zip(normal.state_dict().items(), meta.state_dict().items()):
        assert torch.equal(a, b), k


# ---- reconstruction picture ----

def test_reconstruction_is_in_input_space():
    model = tiny_mae()
    imgs = torch.rand(2, 3, 32, 32) * 100 + 50  # far from zero mean / unit variance
    _, _, mask = model(imgs)
    # What a perfect decoder outputs, by hand: each patch in (row, column, channel) order, normalised
    # by its own mean and unbiased variance + 1e-6.
    perfect_pred = torch.empty(2, 16, 8 * 8 * 3)
    for b in range(2):
        for idx in range(16):
            h, w = divmod(idx, 4)
            patch = imgs[b, :, h * 8:(h + 1) * 8, w * 8:(w + 1) * 8].permute(1, 2, 0).reshape(-1).double()
            perfect_pred[b, idx] = ((patch - patch.mean()) / (patch.var() + 1e-6).sqrt()).float()
    masked, recon, pasted = model.reconstruction_images(imgs, perfect_pred, mask)
    torch.testing.assert_close(recon, imgs, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(pasted, imgs, atol=1e-3, rtol=1e-4)
    removed = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, 192)).bool()
    assert torch.all(masked[removed] == 0) and torch.equal(masked[~removed], imgs[~removed])


# ---- checkpoints ----

OFFICIAL_KEYS = ["patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed",
                 "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.bias",
                 "blocks.1.norm2.bias", "blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc2.bias", "norm.weight",
                 "mask_token", "decoder_embed.weight", "decoder_pos_embed", "decoder_blocks.1.attn.qkv.weight",
                 "decoder_norm.bias", "decoder_pred.weight"]


def official_keys(depth: int, decoder_depth: int) -> set[str]:
    """Every key of an official MAE state dict, written out from its layout (docs/paper.md section 9)."""
    wb = (".weight", ".bias")
    block = [f"{m}{s}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2") for s in wb]
    keys = {"cls_token", "pos_embed", "mask_token", "decoder_pos_embed"}
    keys |= {f"{m}{s}" for m in ("patch_embed.proj", "norm", "decoder_embed", "decoder_norm", "decoder_pred") for s in wb}
    keys |= {f"blocks.{i}.{k}" for i in range(depth) for k in block}
    keys |= {f"decoder_blocks.{i}.{k}" for i in range(decoder_depth) for k in block}
    return keys


def test_official_key_layout_and_loading(tmp_path):
    model = tiny_mae()
    sd = model.state_dict()
    assert set(OFFICIAL_KEYS) <= set(sd)
    assert set(sd) == official_keys(depth=2, decoder_depth=2)  # nothing more, nothing less
    # An official checkpoint is {"model": state_dict}; with or without the decoder.
    other = MaskedAutoencoder(TINY, decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4)
    other.init_weights(seed=1)
    torch.save({"model": other.encoder_state_dict()}, tmp_path / "enc.pth")
    missing = load_mae_checkpoint(model, str(tmp_path / "enc.pth"))
    assert missing and all(k.startswith(("decoder_", "mask_token")) for k in missing)
    assert torch.equal(model.blocks[1].mlp.fc1.weight, other.blocks[1].mlp.fc1.weight)
    model.load_state_dict(other.state_dict())  # the whole MAE, strict
    with pytest.raises(ValueError, match="enc.pth does not fit"):  # another width (size and bands are adapted)
        load_mae_checkpoint(MaskedAutoencoder(get_config("vit_small", img_size=32), decoder_embed_dim=32,
                                              decoder_depth=2, decoder_num_heads=4), str(tmp_path / "enc.pth"))


# ---- FLOPs, checked against torch's own FLOP counter ----

def test_flop_formula_matches_flop_counter():
    # The math SDPA backend runs attention as plain matmuls, which the counter sees (the fused CPU
    # kernel it does not count).
    cfg = get_config("vit_tiny", in_chans=5)
    vit = VisionTransformer(cfg)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        vit(torch.randn(1, 5, 32, 32))
    assert counter.get_total_flops() == vit_forward_flops(cfg)
    mae = MaskedAutoencoder(cfg, decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        mae(torch.randn(1, 5, 32, 32), mask_ratio=0.75)
    assert counter.get_total_flops() == mae.forward_flops_per_image(0.75)
    assert mae_forward_flops(cfg, 0.75, 32, 2) == mae.forward_flops_per_image(0.75)


def test_mfu_convention_matches_anchor():
    # docs/paper.md section 11: official MAE ViT-L/16 eager, 1,696 img/s at MFU 0.214 of 989 TFLOP/s.
    train_flops = 3 * mae_forward_flops(CONFIGS["vit_large"], 0.75)
    assert 1696 * train_flops / 989e12 == pytest.approx(0.214, abs=0.002)


# ---- bad input ----

def test_bad_input_errors():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        get_config("vit_base", img_size=100)
    with pytest.raises(ValueError, match="num_heads"):
        get_config("vit_tiny", num_heads=5)
    with pytest.raises(ValueError, match="unknown model"):
        get_config("vit_gigantic")
    model = tiny_mae()
    with pytest.raises(ValueError, match=r"\(batch, 3, 32, 32\)"):
        model(torch.randn(2, 4, 32, 32))
    with pytest.raises(ValueError, match=r"\(batch, 3, 32, 32\)"):
        model(torch.randn(2, 3, 48, 48))
    for ratio in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="mask_ratio"):
            model(torch.randn(2, 3, 32, 32), mask_ratio=ratio)


def test_reconstruction_picture_error_panel(tmp_path):
    """A perfect prediction (the normalised target itself) shows black on every removed patch of the
    error panel; a zero prediction shows grey 0.5 (loss 1: no better than the patch mean)."""
    from PIL import Image

    from mae import MaskedAutoencoder, save_reconstruction_png

    torch.manual_seed(0)
    mae = MaskedAutoencoder(get_config("vit_tiny", img_size=32, in_chans=3), 32, 1, 4)
    imgs = torch.randn(1, 3, 32, 32)
    mask = torch.zeros(1, 16)
    mask[0, :12] = 1  # the first 12 patches (rows 0-2 of the 4x4 grid) removed
    target = mae.patchify(imgs)
    perfect = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    for pred, expected in ((perfect, 0), (torch.zeros_like(perfect), 128)):
        save_reconstruction_png(mae, imgs, pred, mask, tmp_path / "r.png", [0, 1, 2])
        picture = np.asarray(Image.open(tmp_path / "r.png"))
        scale, x0 = 4, 4 * (4 * 32 + 4 * 2)  # 32 px images are drawn 4x; the error panel is the 5th
        removed_patch = picture[scale * 4, x0 + scale * 4]  # inside patch (0, 0)
        visible_patch = picture[scale * 28, x0 + scale * 4]  # inside patch (3, 0)
        assert abs(int(removed_patch[0]) - expected) <= 1 and removed_patch[0] == removed_patch[2]
        assert tuple(visible_patch) == (0, 0, round(0.35 * 255))
