"""Official-layout MAE/ViT weights as the start of geospatial pretraining (weights.py's loader).

References: a VisionTransformer with a learned (random) positional table written in the official
layout, kernels and tables computed here by hand from the file, and a pickle whose payload would
create a file when unpickled.
"""

from __future__ import annotations

import argparse
import builtins
import pickle

import pytest
import torch
import torch.nn.functional as F

import eval as ev
import fsdp_setup
import train
from mae import MaskedAutoencoder
from vit import VisionTransformer, get_config, sincos_pos_embed_2d
from weights import adapt_band_kernels, load_mae_checkpoint, read_mae_checkpoint

TINY = get_config("vit_tiny")  # 32 px, patch 8: a 4x4 grid, width 64


def reference_vit(seed: int = 1) -> VisionTransformer:
    """A 3-band ViT whose every tensor is random, its positional table included (a learned one)."""
    vit = VisionTransformer(TINY)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in vit.state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
    return vit


def save_official(path, state, **extra) -> str:
    torch.save({"model": state, **extra}, path)
    return str(path)


def test_identity_load_gives_the_reference_features(tmp_path):
    reference = reference_vit()
    path = save_official(tmp_path / "mae_pretrain_vit_tiny.pth", reference.state_dict())
    model = VisionTransformer(TINY)
    notes = []
    assert load_mae_checkpoint(model, path, log=notes.append) == []
    assert notes == []  # same size, same bands: nothing adapted
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), reference(x))
    mapped = VisionTransformer(TINY)  # the identity mapping asked for explicitly: a copy, scaled by 3/3
    load_mae_checkpoint(mapped, path, band_map=[0, 1, 2], log=notes.append)
    assert torch.equal(mapped(x), reference(x))


def test_learned_table_resized_bicubic_and_bands_mapped(tmp_path):
    reference = reference_vit()
    state = reference.state_dict()
    path = save_official(tmp_path / "learned.pth", state)
    model = VisionTransformer(get_config("vit_tiny", img_size=64, in_chans=4))  # 8x8 grid, 4 bands
    notes = []
    load_mae_checkpoint(model, path, band_map=[2, 1, 0], log=notes.append)
    assert any("bicubic" in n and "4x4 to 8x8" in n for n in notes) and any("3 -> 4 bands" in n for n in notes)
    assert all(n.startswith(path) for n in notes)
    # Positions: the cls row as in the file, the 4x4 patch rows resized as a 64-channel image.
    table = state["pos_embed"]
    grid = table[0, 1:].reshape(4, 4, 64).permute(2, 0, 1)[None]
    expected = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).reshape(64, 64)
    assert torch.equal(model.pos_embed[0, 0], table[0, 0])
    assert torch.allclose(model.pos_embed[0, 1:], expected, atol=1e-6)
    # Bands, by hand: band 2 <- red, 1 <- green, 0 <- blue, band 3 <- mean of the three; all x 3/4.
    W = state["patch_embed.proj.weight"]
    red, green, blue = W[:, 0], W[:, 1], W[:, 2]
    expected_kernels = torch.stack([blue, green, red, (red + green + blue) / 3], dim=1) * 0.75
    assert torch.allclose(model.patch_embed.proj.weight, expected_kernels, atol=1e-7)
    assert torch.equal(model.patch_embed.proj.bias, state["patch_embed.proj.bias"])
    assert torch.equal(model.blocks[1].mlp.fc2.weight, state["blocks.1.mlp.fc2.weight"])
    assert model(torch.randn(2, 4, 64, 64)).shape == (2, 65, 64)


def test_sincos_table_rebuilt_and_default_band_rule():
    mae = MaskedAutoencoder(TINY, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)
    mae.init_weights(seed=3)  # fixed sin-cos tables, as the official MAE pretraining has
    state = mae.state_dict()
    target = MaskedAutoencoder(get_config("vit_tiny", img_size=48, in_chans=5), 32, 1, 4)
    missing = load_mae_checkpoint(target, state, source="imagenet.pth", log=lambda _: None)
    assert missing == []
    assert torch.equal(target.pos_embed[0], sincos_pos_embed_2d(64, 6))
    assert torch.equal(target.decoder_pos_embed[0], sincos_pos_embed_2d(32, 6))
    W = state["patch_embed.proj.weight"]
    mean = W.mean(dim=1)
    expected = torch.stack([W[:, 0], W[:, 1], W[:, 2], mean, mean], dim=1) * 3 / 5  # default 0,1,2
    assert torch.allclose(target.patch_embed.proj.weight, expected, atol=1e-7)
    # The decoder's outputs, (row, column, band) per patch: the same mapping, unscaled.
    pred = state["decoder_pred.weight"].reshape(64, 3, 32)
    expected_pred = torch.cat([pred, pred.mean(1, keepdim=True).expand(-1, 2, -1)], dim=1).reshape(64 * 5, 32)
    assert torch.allclose(target.decoder_pred.weight, expected_pred, atol=1e-7)
    loss, _, _ = target(torch.randn(2, 5, 48, 48))
    assert torch.isfinite(loss)


def test_one_band_sees_a_grey_image_as_the_rgb_model_does():
    W = torch.randn(64, 3, 8, 8)
    one = adapt_band_kernels(W, 1, None, scale=True)
    assert torch.allclose(one[:, 0], W[:, 0] + W[:, 1] + W[:, 2], atol=1e-6)  # the sum of the RGB kernels
    grey = torch.randn(2, 1, 32, 32)
    assert torch.allclose(F.conv2d(grey, one, stride=8), F.conv2d(grey.expand(-1, 3, -1, -1), W, stride=8), atol=1e-5)


def test_bad_band_map_names_flag_and_file():
    state = reference_vit().state_dict()
    model = VisionTransformer(get_config("vit_tiny", in_chans=4))
    with pytest.raises(ValueError, match=r"--init-rgb-bands 0,1,4: x.pth has 3 input bands.*of the 4"):
        load_mae_checkpoint(model, state, source="x.pth", band_map=[0, 1, 4])
    with pytest.raises(ValueError, match=r"--init-rgb-bands 0,0,1"):
        load_mae_checkpoint(model, state, source="x.pth", band_map=[0, 0, 1])


def test_another_width_is_reported_with_the_file_path(tmp_path):
    path = save_official(tmp_path / "small.pth", VisionTransformer(get_config("vit_small", img_size=32)).state_dict())
    with pytest.raises(ValueError, match=r"small.pth does not fit this model.*cls_token: file \(1, 1, 384\) vs model \(1, 1, 64\)"):
        load_mae_checkpoint(VisionTransformer(get_config("vit_tiny", img_size=64)), path, log=lambda _: None)


def test_official_run_checkpoint_with_namespace_args_loads(tmp_path):
    """checkpoint-799.pth of the official run: model, AdamW state, epoch, scaler numbers, argparse args."""
    reference = reference_vit()
    mae = MaskedAutoencoder(TINY, 32, 1, 4)
    optimizer = torch.optim.AdamW(mae.parameters(), lr=1e-3, betas=(0.9, 0.95))
    mae(torch.randn(2, 3, 32, 32))[0].backward()
    optimizer.step()
    args = argparse.Namespace(batch_size=64, epochs=800, model="mae_vit_tiny", input_size=32, mask_ratio=0.75,
                              norm_pix_loss=True, lr=None, blr=1.5e-4, output_dir="./output_dir", device="cuda",
                              distributed=True, dist_url="env://")
    scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000, "_growth_tracker": 7}
    path = save_official(tmp_path / "checkpoint-799.pth", reference.state_dict(), optimizer=optimizer.state_dict(),
                         epoch=799, scaler=scaler, args=args)
    with pytest.raises(Exception):  # what the plain safe loader says about it
        torch.load(path, weights_only=True)
    state = read_mae_checkpoint(path)
    assert state.keys() == reference.state_dict().keys()
    model = VisionTransformer(TINY)
    load_mae_checkpoint(model, path)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(model(x), reference(x))


class _CreatesFile:
    """Unpickling this calls open(marker, "w"): a stand-in for any code a hostile pickle runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_CreatesFile(control))).close()
    assert control.exists()  # the payload is live: plain unpickling runs it
    marker = tmp_path / "marker"
    path = save_official(tmp_path / "hostile.pth", reference_vit().state_dict(), extra=_CreatesFile(marker))
    with pytest.raises(ValueError, match=r"hostile.pth: not readable as a checkpoint without running code \(.*io.open[^(]*\)"):
        read_mae_checkpoint(path)
    with pytest.raises(ValueError, match=r"hostile.pth"):
        load_mae_checkpoint(VisionTransformer(TINY), path)
    assert not marker.exists()


def test_train_init_at_another_size_and_band_count(tmp_path, capsys):
    reference = reference_vit()
    path = save_official(tmp_path / "mae.pth", reference.state_dict())
    cfg = train.TrainConfig(model="vit_tiny", img_size=64, in_chans=4, decoder_embed_dim=32, decoder_depth=1,
                            decoder_num_heads=4, init=path, init_rgb_bands="2,1,0", mixed_precision="fp32")
    dist = fsdp_setup.init_distributed()
    try:
        model = train.build_model(cfg, dist)
        weights = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in model.state_dict().items()}
        W = reference.state_dict()["patch_embed.proj.weight"]
        expected = torch.stack([W[:, 2], W[:, 1], W[:, 0], W.mean(1)], dim=1) * 0.75
        assert torch.allclose(weights["patch_embed.proj.weight"], expected, atol=1e-7)
        assert weights["pos_embed"].shape == (1, 65, 64)
        loss, _, _ = model(torch.randn(2, 4, 64, 64))
        assert torch.isfinite(loss)
        # A whole official MAE (decoder included, sin-cos tables): the decoder's outputs follow the bands.
        mae = MaskedAutoencoder(TINY, 32, 1, 4)
        mae.init_weights(seed=5)
        torch.save({"model": mae.state_dict()}, tmp_path / "full.pth")
        full = train.build_model(train.dataclasses.replace(cfg, init=str(tmp_path / "full.pth")), dist)
        weights = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in full.state_dict().items()}
        pred = mae.decoder_pred.weight.detach().reshape(64, 3, 32)
        expected_pred = torch.stack([pred[:, 2], pred[:, 1], pred[:, 0], pred.mean(1)], dim=1).reshape(64 * 4, 32)
        assert torch.allclose(weights["decoder_pred.weight"], expected_pred, atol=1e-7)
        assert torch.equal(weights["decoder_pos_embed"][0], sincos_pos_embed_2d(32, 8))
        assert torch.equal(weights["decoder_blocks.0.mlp.fc1.weight"], mae.decoder_blocks[0].mlp.fc1.weight)
    finally:
        fsdp_setup.cleanup()
    out = capsys.readouterr().out
    assert "init: pos_embed: a learned table" in out and "model bands 2,1,0 take the file's bands 0,1,2" in out
    assert train.parse_args(["--init-rgb-bands", "3,2,1"]).init_rgb_bands == "3,2,1"


def test_eval_encoder_official_file_at_another_size_and_band_count(tmp_path):
    path = save_official(tmp_path / "mae_pretrain.pth", reference_vit().state_dict())
    notes = []
    cfg, state, _ = ev.load_encoder(path, model="vit_tiny", in_chans=4, img_size=64, log=notes.append)
    assert (cfg.in_chans, cfg.img_size) == (4, 64)
    assert state["patch_embed.proj.weight"].shape == (64, 4, 8, 8) and state["pos_embed"].shape == (1, 65, 64)
    # By hand: bands 0-2 take the file's RGB kernels, band 3 their mean, all scaled by 3/4.
    rgb = reference_vit().state_dict()["patch_embed.proj.weight"]
    expected = torch.cat([rgb, rgb.mean(dim=1, keepdim=True)], dim=1) * 0.75
    torch.testing.assert_close(state["patch_embed.proj.weight"], expected, rtol=0, atol=1e-7)
    assert len(notes) == 2 and all(n.startswith(f"--encoder {path}") for n in notes)
    encoder = ev.build_encoder(cfg, state)
    assert encoder(torch.randn(1, 4, 64, 64)).shape == (1, 65, 64)
