"""Tests for eval.py: each protocol against an independent reference or a hand computation.

A synthetic scene dataset (4 classes told apart by colour and texture, written as PNGs and as
4-band GeoTIFFs) and a tiny MAE trained for a few dozen steps stand in for UC Merced and a
pretrained checkpoint.
"""

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import data
import eval as ev
import weights
import scenes
from _dist_util import exit_code_of_rank, run_ranks
from mae import MaskedAutoencoder
from vit import VisionTransformer, get_config

CLASSES = ["forest", "lake", "field", "desert"]
COLOURS = np.array([[40, 110, 40], [40, 60, 150], [150, 170, 60], [200, 170, 120]], dtype=np.float32)
TINY = get_config("vit_tiny")  # 32 px, patch 8, width 64, depth 2


def scene_pixels(label: int, rng, size=40, bands=3) -> np.ndarray:
    """(bands, size, size) float: the class colour, a class-specific texture, and noise."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    blobs = np.sin(2 * np.pi * (rng.uniform(1, 3) * xx + rng.uniform(0, 1))) * np.sin(2 * np.pi * rng.uniform(1, 3) * yy)
    texture = 30 * (blobs if label % 2 else np.sign(blobs))
    colour = np.resize(COLOURS[label], bands)[:, None, None] * rng.uniform(0.6, 1.4)  # brightness overlaps
    return colour + texture[None] + rng.normal(0, 40, (bands, size, size))


def make_folder_dataset(root: Path, per_class=16, seed=0) -> Path:
    """UC Merced layout: root/Images/<class>/<n>.png, RGB uint8."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        (root / "Images" / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(scene_pixels(label, rng), 0, 255).astype(np.uint8).transpose(1, 2, 0)
            Image.fromarray(pixels).save(root / "Images" / name / f"{i}.png")
    return root


def make_list_dataset(root: Path, per_class=8, seed=1) -> Path:
    """List-file layout: root/train.txt, root/val.txt with 'tiles/x.tif label' lines, 4-band uint16 GeoTIFFs."""
    rng = np.random.default_rng(seed)
    (root / "tiles").mkdir(parents=True)
    lines = {"train": [], "val": []}
    for label, name in enumerate(CLASSES):
        for i in range(per_class):
            pixels = (np.clip(scene_pixels(label, rng, bands=4), 0, 255) * 40).astype(np.uint16)
            tifffile.imwrite(root / "tiles" / f"{name}_{i}.tif", pixels, photometric="minisblack", planarconfig="separate")
            lines["train" if i < per_class // 2 else "val"].append(f"tiles/{name}_{i}.tif {name}")
    for split, rows in lines.items():
        (root / f"{split}.txt").write_text("\n".join(rows) + "\n")
    stats = data.compute_stats(str(root / "tiles"), progress=False)
    (root / "stats.json").write_text(json.dumps(stats))
    return root


def save_encoder(path: Path, model: VisionTransformer, cfg=TINY, step=0) -> str:
    """The encoder file format of `checkpoint.py export`."""
    state = model.encoder_state_dict() if isinstance(model, MaskedAutoencoder) else model.state_dict()
    torch.save({"model": state, "vit_config": asdict(cfg), "step": step}, path)
    return str(path)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """The folder dataset and a tiny MAE pretrained on its training images for 40 steps."""
    tmp = tmp_path_factory.mktemp("eval")
    root = make_folder_dataset(tmp / "ucm")
    train_items, _, _ = scenes.scene_splits(root, 0.5, seed=0)
    dataset = scenes.SceneDataset(train_items, img_size=32, train=True)
    imgs = torch.stack([dataset[i][0] for i in range(len(train_items))])
    torch.manual_seed(0)
    mae = MaskedAutoencoder(TINY, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)
    opt = torch.optim.AdamW(mae.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
    for _ in range(40):
        loss, _, _ = mae(imgs[torch.randint(len(imgs), (32,))])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"root": str(root), "encoder": save_encoder(tmp / "encoder.pt", mae, step=40), "tmp": tmp}


def evaluate(pretrained, mode, out, **overrides):
    cfg = ev.EvalConfig(mode=mode, encoder=pretrained["encoder"], data=pretrained["root"], train_ratio=0.5,
                        out=str(out), batch_size=16, workers=0, probe_batch_size=16)
    return ev.run(replace(cfg, **overrides), log=lambda *a: None)


# ---- hand computations ----


def test_metrics_by_hand(tmp_path):
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4], [0.1, 0.3, 0.6], [0.3, 0.6, 0.1]])
    labels = torch.tensor([0, 1, 2, 2, 0])  # predictions 0, 1, 0, 2, 1
    m = scenes.classification_metrics(scores, labels, ["a", "b", "c"])
    assert m["top1"] == pytest.approx(60.0)
    assert m["top5"] == pytest.approx(100.0)  # top-k with k = min(5, classes)
    assert m["confusion"] == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    assert m["per_class"] == {"a": 50.0, "b": 100.0, "c": 50.0}
    scenes.save_confusion(m["confusion"], ["a", "b", "c"], tmp_path / "cm")
    assert (tmp_path / "cm.csv").read_text().splitlines()[3] == "c,1,0,1"
    assert Image.open(tmp_path / "cm.png").size[0] > 3 * 24
    assert scenes.summarize([{"top1": 80.0, "top5": 100.0}, {"top1": 90.0, "top5": 100.0}]) == pytest.approx(
        {"top1": 85.0, "top1_std": math.sqrt(50.0), "top5": 100.0, "top5_std": 0.0})


def test_knn_by_hand():
    train = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[3.0, 1.0]])
    votes = ev.knn_scores(train, labels, test, 2, k=2, temperature=0.5)
    cos = [3 / math.sqrt(10), 4 / math.sqrt(20)]  # nearest two: train 0 (class 0), train 2 (class 1)
    assert votes[0].tolist() == pytest.approx([math.exp(cos[0] / 0.5), math.exp(cos[1] / 0.5)])


def test_lars_step_by_hand():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))  # norm 5
    b = nn.Parameter(torch.tensor([1.0]))
    opt = ev.LARS([w, b], lr=2.0, momentum=0.5, trust=0.1)
    w.grad, b.grad = torch.tensor([[0.0, 10.0]]), torch.tensor([3.0])
    opt.step()  # matrix: step = lr * trust * |w| / |g| * g = 2 * 0.1 * 0.5 * g; vector: plain lr * g
    assert w[0].tolist() == pytest.approx([3.0, 3.0]) and b.tolist() == pytest.approx([-5.0])
    w.grad, b.grad = torch.tensor([[0.0, 10.0]]), torch.tensor([0.0])
    opt.step()  # momentum: 0.5 * previous 0.5 + 0.1 * sqrt(18) / 10 * 10 on the second coordinate
    assert w[0].tolist() == pytest.approx([3.0, 3.0 - 2.0 * (0.25 + 0.1 * math.sqrt(18))])


def test_layer_decay_and_weight_decay_groups():
    model = ev.ViTClassifier(TINY, 5)  # depth 2: embeddings 0, blocks 1-2, head 3
    groups = ev.finetune_param_groups(model, 0.05, 0.5)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_param[id(named["patch_embed.proj.weight"])]["lr_scale"] == 0.125
    assert by_param[id(named["blocks.0.attn.qkv.weight"])]["lr_scale"] == 0.25
    assert by_param[id(named["blocks.1.mlp.fc2.bias"])]["lr_scale"] == 0.5
    assert by_param[id(named["head.weight"])]["lr_scale"] == 1.0
    assert by_param[id(named["head.weight"])]["weight_decay"] == 0.05
    for name in ("cls_token", "blocks.0.norm1.weight", "fc_norm.bias", "head.bias"):
        assert by_param[id(named[name])]["weight_decay"] == 0.0, name
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_classifier_is_mean_pooled_prenorm_tokens():
    encoder = VisionTransformer(TINY)
    encoder.init_weights(3)
    model = ev.ViTClassifier(TINY, 4)
    model.load_state_dict(ev.classifier_state(TINY, encoder.state_dict(), 4, seed=0))
    assert model.head.weight.std().item() == pytest.approx(2e-5, rel=0.2)
    with torch.no_grad():
        nn.init.normal_(model.head.weight)
        x = torch.randn(2, 3, 32, 32)
        tokens = torch.cat([encoder.cls_token.expand(2, -1, -1), encoder.patch_embed(x)], 1) + encoder.pos_embed
        for block in encoder.blocks:
            tokens = block(tokens)
        expected = model.head(F.layer_norm(tokens[:, 1:].mean(1), (64,), eps=1e-6))
        assert torch.allclose(model(x), expected, atol=1e-5)


# ---- scene datasets ----


def make_scenes(root, classes, per_class=5, size=(40, 48), subfolder="Images"):
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / subfolder / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
            tifffile.imwrite(root / subfolder / name / f"{name}{i:02d}.tif", pixels, photometric="rgb")
    return root


def test_scene_splits_class_folders_are_stratified_and_deterministic(tmp_path):
    root = make_scenes(tmp_path / "UCMerced_LandUse", ["beach", "forest", "harbor"], per_class=10)
    train, test, names = scenes.scene_splits(root, train_ratio=0.8, seed=1)
    assert names == ["beach", "forest", "harbor"]
    assert [sum(label == c for _, label in train) for c in range(3)] == [8, 8, 8]
    assert [sum(label == c for _, label in test) for c in range(3)] == [2, 2, 2]
    assert not {p for p, _ in train} & {p for p, _ in test}
    assert all(Path(p).parent.name == names[label] for p, label in train + test)
    assert scenes.scene_splits(root, 0.8, seed=1) == (train, test, names)
    assert scenes.scene_splits(root, 0.8, seed=2)[0] != train


def test_scene_splits_list_files(tmp_path):
    root = make_scenes(tmp_path, ["a", "b"], per_class=3, subfolder="img")
    (root / "train.txt").write_text("img/a/a00.tif 0\nimg/a/a01.tif 0\nimg/b/b00.tif 1\n")
    (root / "val.txt").write_text("img/b/b01.tif 1\n\nimg/a/a02.tif 0\n")
    train, test, names = scenes.scene_splits(root)
    assert names == ["0", "1"] and [label for _, label in train] == [0, 0, 1] and test[0] == (str(root / "img/b/b01.tif"), 1)
    (root / "val.txt").write_text("img/b/b01.tif b\n")
    (root / "train.txt").write_text("img/a/a00.tif a\nimg/b/b00.tif b\n")
    assert scenes.scene_splits(root / "train.txt") == (
        [(str(root / "img/a/a00.tif"), 0), (str(root / "img/b/b00.tif"), 1)], [(str(root / "img/b/b01.tif"), 1)], ["a", "b"])
    (root / "train.txt").write_text("img/a/a00.tif 00\nimg/b/b00.tif 01\n")  # zero-padded numeric labels
    (root / "val.txt").write_text("img/b/b01.tif 1\n")
    assert scenes.scene_splits(root) == ([(str(root / "img/a/a00.tif"), 0), (str(root / "img/b/b00.tif"), 1)],
                                       [(str(root / "img/b/b01.tif"), 1)], ["0", "1"])
    (root / "train.txt").write_text("img/a/missing.tif a\n")
    with pytest.raises(data.DataError, match="train.txt:1: .*missing.tif does not exist"):
        scenes.scene_splits(root)


def test_scene_splits_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="no classes found"):
        scenes.scene_splits(tmp_path / "empty")
    make_scenes(tmp_path / "one", ["only"])
    with pytest.raises(data.DataError, match="only one class"):
        scenes.scene_splits(tmp_path / "one")
    make_scenes(tmp_path / "gap", ["a", "b"])
    (tmp_path / "gap" / "Images" / "c").mkdir()
    with pytest.raises(data.DataError, match="class 'c' has no images"):
        scenes.scene_splits(tmp_path / "gap")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "train.txt").write_text("# no images yet\n")
    (tmp_path / "lists" / "val.txt").write_text("")
    with pytest.raises(data.DataError, match="train.txt and .*val.txt list no images"):
        scenes.scene_splits(tmp_path / "lists")


def test_scene_dataset_transforms(tmp_path):
    root = make_scenes(tmp_path, ["x", "y"], per_class=2, size=(40, 60))
    train_items, test_items, _ = scenes.scene_splits(root, 0.5)
    evaluation = scenes.SceneDataset(test_items, img_size=16)
    x, label = evaluation[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and label == test_items[0][1]
    # eval = shorter side to 16 / 0.875 = 18 (40x60 -> 18x27), then the centre 16x16
    image = torch.from_numpy(data.read_image(test_items[0][0]).astype(np.float32))
    mean, std = (torch.tensor(v).view(3, 1, 1) * 255 for v in (data.IMAGENET_MEAN, data.IMAGENET_STD))
    resized = torch.nn.functional.interpolate(((image - mean) / std)[None], size=(18, 27), mode="bilinear", antialias=True)[0]
    torch.testing.assert_close(x, resized[:, 1:17, 5:21])
    # train = a RandomResizedCrop box and one of the 8 flips/rotations, drawn from (seed, epoch, index), then
    # normalised and resized to 16x16; redone by hand for item 1 of seed 2, epoch 0, which draws a 30x40 box,
    # three quarter turns and a flip
    training = scenes.SceneDataset(train_items, img_size=16, train=True, seed=2)
    rng = np.random.default_rng((2, 0, 1))
    top, left, h, w = data.random_resized_box(rng, 40, 60, (0.08, 1.0))
    turns, flip = int(rng.integers(4)), bool(rng.integers(2))
    image = torch.from_numpy(data.read_image(train_items[1][0]).astype(np.float32))
    box = torch.rot90(((image - mean) / std)[:, top:top + h, left:left + w], turns, dims=(1, 2))
    box = box.flip(-1) if flip else box
    expected = torch.nn.functional.interpolate(box[None], size=(16, 16), mode="bilinear", antialias=True)[0]
    torch.testing.assert_close(training[1][0], expected)
    with pytest.raises(data.DataError, match=f"{test_items[0][0]} has 3 bands .* in_chans=4"):
        scenes.SceneDataset(test_items, img_size=16, in_chans=4)[0]
    stats = tmp_path / "s.json"  # of all 3 bands; select 2
    stats.write_text(json.dumps({"mean": [10.0, 20.0, 30.0], "std": [2.0, 4.0, 8.0]}))
    x, _ = scenes.SceneDataset(test_items, img_size=16, stats=stats, bands=[2, 0], in_chans=2)[0]
    selected = torch.from_numpy(data.read_image(test_items[0][0])[[2, 0]].astype(np.float32))
    expected = (selected - torch.tensor([30.0, 10.0]).view(2, 1, 1)) / torch.tensor([8.0, 2.0]).view(2, 1, 1)
    torch.testing.assert_close(x, scenes.eval_transform(expected, 16))
    assert torch.equal(scenes.SceneDataset(test_items, img_size=16, stats=stats, bands=(2, 0), in_chans=2)[0][0], x)
    with pytest.raises(data.DataError, match=r"bands=\[\] selects no bands"):  # before any file is read
        scenes.SceneDataset([("a.png", 0)], bands=[])


# ---- encoder files ----


def test_encoder_errors_name_file_key_shapes_and_fix(tmp_path):
    mae = MaskedAutoencoder(TINY, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)
    official = tmp_path / "mae_pretrain.pth"  # the official layout: {"model": state}, no config
    torch.save({"model": mae.state_dict()}, official)
    cfg, state, _ = weights.load_encoder(str(official), model="vit_tiny")
    assert cfg.in_chans == 3 and not any(k.startswith("decoder_") for k in state)
    # Another band count: the official file's RGB kernels are adapted (weights.adapt_mae_state_dict), not refused.
    assert weights.load_encoder(str(official), model="vit_tiny", in_chans=4, log=lambda _: None)[1][
        "patch_embed.proj.weight"].shape == (64, 4, 8, 8)
    with pytest.raises(ValueError, match=r"cls_token.*--model vit_tiny"):
        weights.load_encoder(str(official), model="vit_small", img_size=32)
    with pytest.raises(ValueError, match=r"pass --model.*width 64, depth 2"):
        weights.load_encoder(str(official))
    exported = save_encoder(tmp_path / "enc.pt", mae)
    assert weights.load_encoder(exported)[0] == TINY
    assert weights.load_encoder(exported, model="vit_tiny", in_chans=3)[0] == TINY
    with pytest.raises(ValueError, match="--in-chans 4 contradicts"):
        weights.load_encoder(exported, in_chans=4)
    with pytest.raises(ValueError, match="--model vit_base contradicts"):
        weights.load_encoder(exported, model="vit_base")
    with pytest.raises(ValueError, match="needs --model"):
        weights.load_encoder("random")
    with pytest.raises(ValueError, match="no such file"):
        weights.load_encoder(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt.*checkpoint.py export"):
        weights.load_encoder(str(tmp_path / "junk.pt"))


def test_training_run_folder_is_an_encoder(pretrained, tmp_path, capsys):
    import train

    run = tmp_path / "run"
    assert train.main(["--model", "vit_tiny", "--data", pretrained["root"], "--steps", "2", "--batch-size", "8",
                       "--workers", "0", "--out", str(run), "--decoder-embed-dim", "32", "--decoder-depth", "1",
                       "--decoder-num-heads", "4", "--warmup-steps", "1", "--recon-every", "0"]) == 0
    cfg, state, _ = weights.load_encoder(str(run))
    exported = weights.export_encoder(str(run))
    assert cfg == TINY and all(torch.equal(state[k], v) for k, v in exported["model"].items())
    ev.main(["knn", "--encoder", str(run), "--data", pretrained["root"], "--train-ratio", "0.5", "--workers", "0",
             "--out", str(tmp_path / "knn")])
    assert "knn: top-1" in capsys.readouterr().out
    assert json.loads((tmp_path / "knn" / "results.json").read_text())["encoder"] == str(run)


# ---- protocols ----


def linear_probe_per_epoch(encoder, train_dataset, num_classes, cfg, seed, epochs):
    """The probe as the recipe runs it: the frozen encoder re-run on every batch of every epoch
    (`epochs` passes of the encoder), the reference for eval's probe on features extracted once."""
    labels = torch.as_tensor([train_dataset[i][1] for i in range(len(train_dataset))])

    def features_of(idx):
        return ev.cls_features(encoder, torch.stack([train_dataset[i][0] for i in idx.tolist()]))

    return ev.train_linear_probe(features_of, labels, encoder.cfg.embed_dim, num_classes, cfg, seed, epochs=epochs)


def test_cached_probe_equals_per_epoch_probe(pretrained):
    train_items, _, _ = scenes.scene_splits(pretrained["root"], 0.5, seed=0)
    dataset = scenes.SceneDataset(train_items[::2], img_size=32)
    cfg, state, _ = weights.load_encoder(pretrained["encoder"])
    encoder = ev.build_encoder(cfg, state)
    probe_cfg = ev.EvalConfig(probe_batch_size=5)  # 16 images: 3 steps per epoch, a remainder dropped
    feats, labels = ev.extract_features(encoder, dataset, batch_size=7, log=lambda *a: None)
    cached = ev.linear_probe_cached(feats, labels, 4, probe_cfg, seed=3, epochs=9)
    per_epoch = linear_probe_per_epoch(encoder, dataset, 4, probe_cfg, seed=3, epochs=9)
    for a, b in zip(cached.state_dict().values(), per_epoch.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)
    with torch.no_grad():
        assert torch.equal(cached(feats).argmax(1), per_epoch(feats).argmax(1))
    assert not torch.allclose(cached[1].weight, ev.make_probe_head(64, 4, 3)[1].weight)  # it did train


def test_pretrained_beats_chance_and_random_init(pretrained, tmp_path):
    results = {}
    for name, encoder in (("mae", pretrained["encoder"]), ("random", "random")):
        for mode in ("linprobe", "knn"):
            results[name, mode] = evaluate(pretrained, mode, tmp_path / f"{name}_{mode}", encoder=encoder,
                                           model="vit_tiny", epochs=30)["top1"]
    for mode in ("linprobe", "knn"):  # measured: 100 and 100 pretrained, 91 and 91 random
        assert results["mae", mode] >= 90.0, results  # chance: 25%
        assert results["mae", mode] >= results["random", mode], results
    out = json.loads((tmp_path / "mae_knn" / "results.json").read_text())
    assert out["num_train"] == 32 and out["num_test"] == 32 and out["class_names"] == sorted(CLASSES)
    assert (tmp_path / "mae_knn" / "confusion_seed0.csv").exists() and (tmp_path / "mae_knn" / "confusion_seed0.png").exists()


def test_finetune_reaches_linear_probe(pretrained, tmp_path):
    probe = evaluate(pretrained, "linprobe", tmp_path / "lp", epochs=30)
    tuned = evaluate(pretrained, "finetune", tmp_path / "ft", epochs=16, warmup_epochs=1, batch_size=16, blr=2e-3)
    assert tuned["top1"] >= probe["top1"] - 1e-6, (tuned["top1"], probe["top1"])


def test_seeds_split_deterministically_and_report_mean_std(pretrained, tmp_path):
    a = evaluate(pretrained, "knn", tmp_path / "a", seeds=[0, 1], cache_features=True)
    b = evaluate(pretrained, "knn", tmp_path / "a", seeds=[1], cache_features=True)  # reuses the cached features
    assert a["runs"][1]["split_id"] == b["runs"][0]["split_id"] != a["runs"][0]["split_id"]
    assert a["runs"][1]["top1"] == b["runs"][0]["top1"]
    tops = [r["top1"] for r in a["runs"]]
    assert a["top1"] == pytest.approx(np.mean(tops)) and a["top1_std"] == pytest.approx(np.std(tops, ddof=1))
    assert (tmp_path / "a" / "features.pt").exists()


def test_results_record_the_split_ratio_used_and_top5_k(pretrained, tmp_path):
    """A folder dataset without --train-ratio is split 0.8 : 0.2, and results.json says so; top5_k
    tells that top-5 of a 4-class dataset is top-4 (100% by construction below 5 classes)."""
    evaluate(pretrained, "knn", tmp_path / "r", train_ratio=None)
    saved = json.loads((tmp_path / "r" / "results.json").read_text())
    assert saved["train_ratio"] == scenes.DEFAULT_TRAIN_RATIO and saved["top5_k"] == min(5, len(CLASSES))
    assert scenes.default_train_ratio(pretrained["root"], 0.5) == 0.5


def test_feature_cache_belongs_to_its_encoder_images_and_stats(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(ev, "extract_features", lambda *a, **k: calls.append(1) or (torch.zeros(1, 2), torch.zeros(1)))
    image, stats = tmp_path / "a.png", tmp_path / "stats.json"
    Image.new("RGB", (8, 8)).save(image)
    stats.write_text(json.dumps({"mean": [1.0], "std": [1.0]}))
    cfg = ev.EvalConfig(encoder=str(tmp_path / "encoder.pt"), stats=str(stats), out=str(tmp_path), cache_features=True)
    first, second = VisionTransformer(TINY), VisionTransformer(TINY)
    first.init_weights(0)
    second.init_weights(1)

    def extract(encoder):
        items = [(str(image), 0)]
        key = ev.feature_cache_key(encoder, items, TINY, cfg)
        ev.features_for(encoder, items, key, TINY, cfg, log=lambda *a: None)
        return len(calls)

    assert extract(first) == 1 and extract(first) == 1  # the second call reused the saved features
    assert extract(second) == 2  # another encoder behind the same --encoder name
    assert extract(first) == 3 and extract(first) == 3
    Image.new("RGB", (8, 9)).save(image)  # other pixels under the same path
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    assert extract(first) == 4 and extract(first) == 4
    stats.write_text(json.dumps({"mean": [5.0], "std": [2.0]}))  # recomputed statistics, same path
    assert extract(first) == 5


def test_list_file_layout_multiband(tmp_path):
    root = make_list_dataset(tmp_path / "lists")
    cfg4 = replace(TINY, in_chans=4)
    encoder = VisionTransformer(cfg4)
    encoder.init_weights(0)
    path = save_encoder(tmp_path / "enc4.pt", encoder, cfg4)
    out = ev.run(ev.EvalConfig(mode="knn", encoder=path, data=str(root), stats=str(root / "stats.json"),
                               out=str(tmp_path / "o"), workers=0, knn_k=3), log=lambda *a: None)
    assert out["num_train"] == 16 and out["num_test"] == 16 and out["top1"] >= 75.0
    assert out["train_ratio"] is None  # train.txt / val.txt are the split
    with pytest.raises(ValueError, match=r"encoder random init \(vit_tiny\) expects 3 bands, the images of --data .* "
                                         r"have 4 \(e.g. .*tif\): pick 3 of them with --bands \(0-based, e.g. --bands 0,1,2\)"):
        ev.run(ev.EvalConfig(mode="knn", encoder="random", model="vit_tiny", data=str(root), stats=str(root / "stats.json"),
                             out=str(tmp_path / "o"), workers=0), log=lambda *a: None)
    three = ev.run(ev.EvalConfig(mode="knn", encoder="random", model="vit_tiny", data=str(root), bands=[0, 1, 2],
                                 stats=str(root / "stats.json"), out=str(tmp_path / "o"), workers=0), log=lambda *a: None)
    assert three["num_test"] == 16


def test_bad_datasets_raise_clear_errors(pretrained, tmp_path):
    def knn(root, **kw):
        cfg = ev.EvalConfig(mode="knn", encoder="random", model="vit_tiny", data=str(root), out=str(tmp_path / "o"), workers=0)
        ev.run(replace(cfg, **kw), log=lambda *a: None)

    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="no classes found"):
        knn(tmp_path / "none")
    one = tmp_path / "one" / "forest"
    one.mkdir(parents=True)
    Image.new("RGB", (40, 40)).save(one / "a.png")
    with pytest.raises(ValueError, match="only one class"):
        knn(tmp_path / "one")
    (tmp_path / "one" / "lake").mkdir()
    (tmp_path / "one" / "lake" / "notes.txt").write_text("")
    with pytest.raises(ValueError, match="'lake' has no images"):
        knn(tmp_path / "one")
    with pytest.raises(ValueError, match="--train-ratio must be in"):
        knn(pretrained["root"], train_ratio=1.5)
    with pytest.raises(ValueError, match="--model 'vit_gigantic' is unknown"):
        knn(pretrained["root"], model="vit_gigantic")


def test_cli_user_errors_are_one_line_and_exit_2(pretrained, tmp_path, capsys):
    def cli(*args):
        code = ev.main(["knn", "--encoder", "random", "--model", "vit_tiny", "--out", str(tmp_path / "o"), *args])
        return code, capsys.readouterr().err

    (tmp_path / "empty").mkdir()
    make_scenes(tmp_path / "one", ["only"])
    broken = make_scenes(tmp_path / "broken", ["a", "b"])
    bad = broken / "Images" / "b" / "b03.tif"
    bad.write_bytes(bad.read_bytes()[:60])  # a truncated download
    cases = [
        (("--data", str(tmp_path / "empty")), "no classes found"),
        (("--data", str(tmp_path / "one")), "only one class"),
        (("--data", str(tmp_path / "missing")), f"--data {tmp_path / 'missing'}: no such folder"),
        (("--data", str(broken), "--workers", "2"), f"{bad}: unreadable TIFF header"),  # raised in a loader worker
        (("--data", pretrained["root"], "--model", "vit_base", "--encoder", pretrained["encoder"]),
         "--model vit_base contradicts"),
        (("--data", pretrained["root"], "--in-chans", "4"), r"expects 4 bands, the images of --data .* have 3 .*"
                                                        r"--bands 0,1,2,2\), or use --in-chans"),
    ]
    for args, message in cases:
        code, err = cli(*args)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (args, err)
        assert re.search(message, err), (message, err)


def test_eval_py_exits_2_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "eval.py", "knn", "--encoder", "random", "--model", "vit_tiny", "--data",
                             str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
                            cwd=Path(ev.__file__).parent, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr == f"error: --data {tmp_path / 'missing'}: no such folder\n"


# ---- several ranks ----


def _on_ranks(rank, root, encoder, out, world_size):
    """Sharded feature extraction vs one process; a short fine-tune; the whole knn CLI path."""
    import fsdp_setup

    quiet = lambda *a: None  # noqa: E731
    dist_info = fsdp_setup.init_distributed()
    vit_cfg, state, _ = weights.load_encoder(encoder)
    train_items, test_items, names = scenes.scene_splits(root, 0.5, seed=0)
    frozen = ev.build_encoder(vit_cfg, state)
    odd = scenes.SceneDataset(train_items + test_items[:-1], img_size=32)  # 63 images: the last block is padded
    feats, labels = ev.extract_features(frozen, odd, 5, 0, dist_info, log=quiet)
    alone, alone_labels = ev.extract_features(frozen, odd, 5, 0, replace(ev.ALONE, device=dist_info.device), log=quiet)
    assert torch.allclose(feats, alone, atol=1e-5) and torch.equal(labels, alone_labels) and len(feats) == 63

    cfg = ev.EvalConfig(batch_size=16 // world_size, workers=0, warmup_epochs=1, mixed_precision="fp32",
                        strategy="full_shard" if world_size > 1 else "ddp")
    recipe = dict(ev.finetune_recipe(vit_cfg), epochs=2, drop_path=0.0)
    model = ev.build_classifier(vit_cfg, state, len(names), cfg, seed=0, rank=rank)
    model = ev.finetune(model, ev.scene_dataset(train_items, vit_cfg, cfg, train=True), cfg, recipe, 0, dist_info, quiet)
    scores, _ = ev.predict(model, ev.scene_dataset(test_items, vit_cfg, cfg, train=False), 8, 0, dist_info, quiet)
    if rank == 0:
        torch.save(scores, os.path.join(out, f"scores_{world_size}.pt"))
    ev.run(ev.EvalConfig(mode="knn", encoder=encoder, data=root, train_ratio=0.5, workers=0,
                         out=os.path.join(out, f"knn_{world_size}")), log=quiet)  # ends the process group


def test_two_ranks_match_one_process(pretrained, tmp_path):
    """2 gloo ranks against one process: gathered features in order, FULL_SHARD fine-tuning on
    2 × 8 images per step vs DDP on 1 × 16 (the sampler interleaves the ranks, so the global
    batches are the same images; augmentation depends on the image index only), the knn CLI path."""
    run_ranks(_on_ranks, 2, args=(pretrained["root"], pretrained["encoder"], str(tmp_path), 2))
    _on_ranks(0, pretrained["root"], pretrained["encoder"], str(tmp_path), 1)
    two, one = (torch.load(tmp_path / f"scores_{n}.pt", weights_only=True) for n in (2, 1))
    assert two.shape == (32, 4) and torch.allclose(two, one, rtol=1e-4, atol=1e-7)  # logits ~3e-3, measured diff ~1e-8, (two - one).abs().max()
    assert not torch.allclose(one, one[:1].expand_as(one))  # it learned something image-dependent
    knn = [json.loads((tmp_path / f"knn_{w}" / "results.json").read_text()) for w in (1, 2)]
    assert knn[0]["runs"][0]["confusion"] == knn[1]["runs"][0]["confusion"]


def _rank_1_fails_in_knn(rank, root, encoder, out, failure):
    if rank == 1:  # rank 1's share breaks: a corrupt image (a user error) or a bug
        def broken(*args, **kwargs):
            if failure == "corrupt image":
                raise data.CorruptImageError("scene_0007.png: truncated; copy or download it again")
            raise RuntimeError("rank 1's features broke")
        ev.frozen_scores = broken
    sys.exit(ev.main(["knn", "--encoder", encoder, "--data", root, "--train-ratio", "0.5", "--workers", "0",
                      "--out", out]))


@pytest.mark.parametrize("failure", ["bug", "corrupt image"])
def test_a_rank_failing_alone_exits_at_once(pretrained, tmp_path, capfd, failure):
    """Rank 0 waits for rank 1 in a collective; rank 1 must end its process, naming its rank, so that
    the launcher stops the job: a user error with its one line and exit code 2, a bug with its
    traceback and exit code 3 (as train.py's ranks do)."""
    args = (pretrained["root"], pretrained["encoder"], str(tmp_path / "out"), failure)
    assert exit_code_of_rank(_rank_1_fails_in_knn, 1, args=args) == (3 if failure == "bug" else 2)
    err = capfd.readouterr().err
    if failure == "bug":
        assert "[rank 1] failed" in err and "RuntimeError: rank 1's features broke" in err
    else:
        assert "error: [rank 1] scene_0007.png: truncated; copy or download it again\n" in err
        assert "[rank 1] failed" not in err


def test_bands_flag_is_written_as_in_train_py():
    assert ev.parse_args(["knn", "--encoder", "random", "--data", "x", "--bands", "3,2,1"]).bands == [3, 2, 1]
    with pytest.raises(ValueError, match="--bands must be comma-separated 0-based band indices"):
        ev.parse_args(["knn", "--encoder", "random", "--data", "x", "--bands", "3 2"])
