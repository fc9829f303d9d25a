"""eval.py — judge a pretrained encoder by scene classification: linear probe, kNN, fine-tuning.

The paper compares its models by top-1/top-5 on UC Merced, AID, NWPU-RESISC45 and MillionAID.

    python eval.py knn      --encoder encoder.pt --data UCMerced_LandUse/Images --train-ratio 0.5
    python eval.py linprobe --encoder runs/base --data AID --train-ratio 0.2 --seed 0 1 2
    python eval.py linprobe --encoder random --model vit_base --data AID --train-ratio 0.2   # baseline
    torchrun --standalone --nproc_per_node=8 eval.py finetune --encoder encoder.pt --data NWPU-RESISC45 \
        --train-ratio 0.2 --strategy full_shard

- knn: weighted kNN on frozen cls features (DINO protocol: cosine, k=20, T=0.07). No training: a
  quick health check of a checkpoint.
- linprobe: the MAE protocol — frozen encoder, cls token, BatchNorm1d(affine=False) + Linear. The
  features are extracted once (eval transform) and the head trains on them: 90 epochs in seconds
  instead of 90 passes of a billion-parameter encoder.
- finetune: the MAE recipe — mean-pooled patch tokens + LayerNorm + Linear, layer-wise lr decay,
  drop path, label smoothing 0.1, AdamW with warmup + cosine — on fsdp_setup.parallelize, so it
  runs under torchrun/srun with the training layouts (--strategy), or alone in one process.

--encoder: an encoder file (`python checkpoint.py export`, or an official MAE/timm ViT checkpoint
with --model), a training run folder, or `random` (with --model). --data: a folder with one
subfolder of images per class (found at any depth: UC Merced's Images/<class>/, AID/<class>/), or
train.txt + val.txt of 'relative/path label' lines; scene_splits and SceneDataset, here, read it.
Output in --out: results.json (top1 and top5 in percent, mean ± std over the --seed values;
top5_k = min(5, classes); the train_ratio used), per-class accuracy, confusion_seed*.csv/.png.
Under torchrun every rank extracts/evaluates a share of the images; rank 0 writes. A user error
(flags, data, encoder file) prints one `error: ...` line and exits 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

import data
import fsdp_setup
from weights import (adapt_mae_state_dict, check_mae_state, export_encoder, load_mae_checkpoint, parse_band_map,
                     read_checkpoint_file)
from train import lr_at
from vit import CONFIGS, ViTConfig, VisionTransformer, get_config

MODES = ("linprobe", "knn", "finetune")


@dataclass
class EvalConfig:
    mode: str = "linprobe"  # linprobe | knn | finetune
    encoder: str = ""  # encoder .pt, training run folder, or "random"
    data: str = ""  # class-per-subfolder root, or a folder/list file with train.txt + val.txt (scene_splits)
    train_ratio: float | None = None  # training fraction per class; None: the list files' split, else 0.8
    seeds: list[int] = field(default_factory=lambda: [0])  # one run each (split + head init); mean ± std
    out: str = "runs/eval"  # results.json, confusion matrices, cached features
    model: str | None = None  # vit.CONFIGS name, for "random" and files without vit_config
    in_chans: int | None = None  # input bands, for files without vit_config
    img_size: int | None = None  # input size, for files without vit_config
    bands: list[int] | None = None  # band indices to read from each image
    stats: str | None = None  # per-band mean/std JSON (`python data.py stats`); 3-band uint8 needs none
    epochs: int | None = None  # None: 90 (linprobe); the recipe's 100 (B) / 50 (L and up) (finetune)
    batch_size: int = 64  # images per step per process: feature extraction, fine-tuning
    workers: int = 4  # data-loading processes per process
    cache_features: bool = False  # save the frozen features in --out and reuse them next time
    # linear probe
    probe_batch_size: int = 256  # recipe: 16384 on ImageNet; small sets need more steps per epoch
    probe_optimizer: str = "sgd"  # sgd | lars (the recipe's; see train_linear_probe)
    probe_blr: float = 0.1  # lr = blr * batch / 256, as the recipe
    probe_flip: bool = False  # also train on the features of flipped training images
    # kNN
    knn_k: int = 20
    knn_temperature: float = 0.07
    # fine-tuning; None = the MAE recipe for the encoder's size (finetune_recipe)
    blr: float | None = None
    layer_decay: float | None = None
    drop_path: float | None = None
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    warmup_epochs: int = 5
    strategy: str = "ddp"  # fsdp_setup layout: ddp | no_shard | full_shard | shard_grad_op | hybrid_shard
    shard_group_size: int | None = None  # hybrid_shard only
    mixed_precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | bf16-reduce | fp32


# ---- scene datasets ----

DEFAULT_TRAIN_RATIO = 0.8  # folders of classes without --train-ratio
EVAL_CROP_FRACTION = 0.875  # test images: resize to img_size / 0.875, then centre-crop img_size


def _read_list_file(list_file, root) -> list[tuple[str, str]]:
    rows = []
    with open(list_file) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(None, 1)  # paths may contain spaces, labels don't
            if len(parts) != 2:
                raise data.DataError(f"{list_file}:{number}: expected 'relative/path label', got {line!r}")
            path = os.path.join(root, parts[0])
            if not os.path.isfile(path):
                raise data.DataError(f"{list_file}:{number}: {path} does not exist")
            rows.append((path, parts[1]))
    return rows


def _find_class_folder(root) -> tuple[str, list[str]]:
    """Breadth-first, the shallowest folder with a subfolder holding images: the class folder
    of root/<class>/*, root/Images/<class>/* (UC Merced) or root/AID/<class>/*."""
    queue = [root]
    while queue:
        folder = queue.pop(0)
        subfolders = sorted(name for name in os.listdir(folder) if os.path.isdir(os.path.join(folder, name))
                            and not name.startswith((".", "__")))
        for name in subfolders:
            if any(f.lower().endswith(data.IMAGE_EXTENSIONS) for f in os.listdir(os.path.join(folder, name))):
                return folder, subfolders
        queue += [os.path.join(folder, name) for name in subfolders]
    raise data.DataError(f"{root}: no classes found; expected <class>/ subfolders of images "
                         "(e.g. Images/<class>/*.tif) or train.txt and val.txt with 'relative/path label' lines")


def default_train_ratio(root, train_ratio=None) -> float | None:
    """The training fraction `scene_splits(root, train_ratio)` splits by: train_ratio if given,
    None where train.txt/val.txt are the split, else DEFAULT_TRAIN_RATIO."""
    if train_ratio is not None:
        return train_ratio
    root = str(root)
    return None if os.path.isfile(root if os.path.isfile(root) else os.path.join(root, "train.txt")) else DEFAULT_TRAIN_RATIO


def scene_splits(root, train_ratio=None, seed=0) -> tuple[list, list, list[str]]:
    """(train_items, test_items, class_names), items being (path, label) lists.

    root is a folder with train.txt and val.txt (or test.txt) of 'relative/path label'
    lines (labels ints or class names), or such a train.txt itself; without train_ratio
    those lists are the split. Otherwise classes are subfolders (found at any depth). With
    train_ratio (default 0.8 for folders), every class is split train_ratio : 1 - train_ratio
    by a permutation fixed by `seed`, so the split is stratified and reproducible.
    """
    root = str(root)
    list_file = root if os.path.isfile(root) else os.path.join(root, "train.txt")
    root = os.path.dirname(root) if os.path.isfile(root) else root
    if not os.path.isdir(root):
        raise data.DataError(f"--data {root}: no such folder")
    if os.path.isfile(list_file):
        test_file = next((os.path.join(root, name) for name in ("val.txt", "test.txt")
                          if os.path.isfile(os.path.join(root, name))), None)
        if test_file is None:
            raise data.DataError(f"{list_file}: no val.txt or test.txt next to it for the test split")
        train_rows, test_rows = _read_list_file(list_file, root), _read_list_file(test_file, root)
        labels = [label for _, label in train_rows + test_rows]
        if not labels:
            raise data.DataError(f"{list_file} and {test_file} list no images; add 'relative/path label' lines")
        if all(label.isdecimal() for label in labels):  # "07" and "7" are one class
            to_int = {label: int(label) for label in labels}
            class_names = [str(i) for i in range(max(to_int.values()) + 1)]
        else:
            class_names = sorted(set(labels))
            to_int = {name: i for i, name in enumerate(class_names)}
        if len(set(to_int.values())) < 2:
            raise data.DataError(f"{list_file}: only one class ({labels[0]!r}); classification needs two or more")
        train, test = [(p, to_int[label]) for p, label in train_rows], [(p, to_int[label]) for p, label in test_rows]
        if train_ratio is None:
            return train, test, class_names
        files_per_class = [sorted(p for p, label in train + test if label == c) for c in range(len(class_names))]
    else:
        class_folder, class_names = _find_class_folder(root)
        if len(class_names) < 2:
            raise data.DataError(f"{class_folder}: only one class folder ({class_names[0]}); "
                                 "classification needs two or more")
        files_per_class = []
        for name in class_names:
            try:
                files_per_class.append(data.list_images(os.path.join(class_folder, name)))
            except data.DataError:
                raise data.DataError(f"{os.path.join(class_folder, name)}: class {name!r} has no images; "
                                     "remove the folder or add images") from None
    ratio = default_train_ratio(root, train_ratio)  # not None here: no list files, or a ratio given
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label, files in enumerate(files_per_class):
        order = rng.permutation(len(files))
        n_train = min(max(round(ratio * len(files)), 1), max(len(files) - 1, 1))  # both sides get some
        train += [(files[i], label) for i in order[:n_train]]
        test += [(files[i], label) for i in order[n_train:]]
    return train, test, class_names


def eval_transform(x: torch.Tensor, img_size: int) -> torch.Tensor:
    """Resize the shorter side to img_size / 0.875, then centre-crop img_size."""
    short = round(img_size / EVAL_CROP_FRACTION)
    height, width = x.shape[-2:]
    scale = short / min(height, width)
    x = data.resize(x, max(short, round(height * scale)), max(short, round(width * scale)))
    top, left = (x.shape[-2] - img_size) // 2, (x.shape[-1] - img_size) // 2
    return x[:, top:top + img_size, left:left + img_size].contiguous()


class SceneDataset(data.EpochSeededDataset):
    """(float32 (C, img_size, img_size) normalised, label). train=True: RandomResizedCrop,
    flips and 90-degree rotations; train=False: resize to img_size/0.875, centre crop."""

    def __init__(self, items, img_size=224, train=False, stats=None, bands=None, in_chans=None,
                 seed=0, scale=(0.08, 1.0)):
        super().__init__(seed)
        data.check_bands(bands)
        self.items, self.img_size, self.train = list(items), img_size, train
        self.bands, self.in_chans, self.scale = bands, in_chans, scale
        self.normalize = data.Normalizer(stats)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index) -> tuple[torch.Tensor, int]:
        path, label = self.items[index]
        with data.open_image(path) as file:  # scenes are small; read whole
            file_bands, nodata = file.info.bands, file.info.nodata
            data.check_band_count(path, file_bands, self.bands, self.in_chans)
            image = file.read(bands=self.bands)
        if not self.train:
            x = self.normalize(image, path, file_bands, self.bands, nodata)
            return eval_transform(x, self.img_size), int(label)
        rng = self.rng(index)
        top, left, h, w = data.random_resized_box(rng, *image.shape[1:], self.scale)
        box = data.random_dihedral(image[:, top:top + h, left:left + w], rng)
        x = self.normalize(box, path, file_bands, self.bands, nodata)
        return data.resize(x, self.img_size, self.img_size), int(label)


def scene_dataset(items, vit_cfg: ViTConfig, cfg: EvalConfig, train: bool, seed: int = 0) -> SceneDataset:
    return SceneDataset(items, img_size=vit_cfg.img_size, train=train, stats=cfg.stats, bands=cfg.bands,
                        in_chans=vit_cfg.in_chans, seed=seed)


# ---- encoder ----

NON_ENCODER_PREFIXES = ("decoder_", "mask_token", "head.", "fc_norm.")  # MAE decoder, fine-tuned heads


def describe_state(state: dict[str, torch.Tensor]) -> str:
    """What ViT a state dict holds, read off its shapes, and the flags that would build it."""
    try:
        width = state["cls_token"].shape[-1]
        depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        _, in_chans, patch, _ = state["patch_embed.proj.weight"].shape
        img_size = round(math.sqrt(state["pos_embed"].shape[1] - 1)) * patch
        mlp = state["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, IndexError, ValueError):
        return "no recognisable ViT (expected cls_token, pos_embed, patch_embed.proj.weight, blocks.N.*)"
    what = f"a ViT of width {width}, depth {depth}, MLP {mlp}, patch {patch}, {in_chans} bands, {img_size} px"
    names = [n for n, c in CONFIGS.items() if (c.embed_dim, c.depth, c.mlp_dim, c.patch_size) == (width, depth, mlp, patch)]
    if names:
        return what + f"; use --model {names[0]} --in-chans {in_chans} --img-size {img_size}"
    return what + "; no vit.CONFIGS entry has these dimensions"


def load_encoder(spec: str, model: str | None = None, in_chans: int | None = None, img_size: int | None = None,
                 log=print):
    """Resolve --encoder into (ViTConfig, encoder state dict or None for random init, description).

    An official-layout file (no vit_config) made for another --img-size or --in-chans is adapted
    (mae.adapt_mae_state_dict: positions resized, RGB kernels to bands 0, 1, 2); each change is logged.

    The shapes are checked against the config on the meta device, so a mismatch fails before any
    image is read, with the key, both shapes and the flags that fit the file.
    """
    overrides = {k: v for k, v in (("in_chans", in_chans), ("img_size", img_size)) if v is not None}
    if spec == "random":
        if model is None:
            raise ValueError("--encoder random needs --model (e.g. --model vit_base) to know what to build")
        return get_config(model, **overrides), None, f"random init ({model})"
    path = Path(spec)
    if path.is_dir():
        try:
            ckpt = export_encoder(str(path))
        except ValueError as e:
            raise ValueError(f"--encoder {path}: {e}") from None
    elif path.is_file():
        try:
            ckpt = read_checkpoint_file(path)
        except ValueError as e:
            raise ValueError(f"--encoder {e}; an encoder of a training run comes from `python checkpoint.py export "
                             "--ckpt <run> --out encoder.pt`") from None
    else:
        raise ValueError(f"--encoder {spec}: no such file or folder; give an encoder .pt, a training run "
                         "folder, or `random` with --model")
    state = ckpt.get("model", ckpt)  # official MAE files wrap it in "model"; timm files are bare
    if not isinstance(state, dict):
        raise ValueError(f"--encoder {path}: its \"model\" entry is a {type(state).__name__}, not a state dict")
    state = {k: v for k, v in state.items() if torch.is_tensor(v) and not k.startswith(NON_ENCODER_PREFIXES)}
    if "vit_config" in ckpt:
        cfg = ViTConfig(**ckpt["vit_config"])
        for flag, value, own in (("--in-chans", in_chans, cfg.in_chans), ("--img-size", img_size, cfg.img_size)):
            if value is not None and value != own:
                raise ValueError(f"{flag} {value} contradicts the encoder file {path}, made for {own}; drop {flag}")
        if model is not None and replace(get_config(model), img_size=cfg.img_size, in_chans=cfg.in_chans) != replace(cfg, drop_path=0.0):
            raise ValueError(f"--model {model} contradicts the encoder file {path}, which records {cfg}; drop --model")
    elif model is None:
        raise ValueError(f"--encoder {path} does not record its architecture (no vit_config): pass --model. "
                         f"The file holds {describe_state(state)}")
    else:
        cfg = get_config(model, **overrides)
        state, notes = adapt_mae_state_dict(state, cfg, source=f"--encoder {path}")
        for note in notes:
            log(f"--encoder {path}: {note}")
    with torch.device("meta"):
        shapes_only = VisionTransformer(cfg)
    try:  # the loader's checks against a meta copy: shapes only, no data moved
        check_mae_state(shapes_only, state, source=f"--encoder {path}")
    except ValueError as e:
        raise ValueError(f"{e}. "
                         f"The file holds {describe_state(state)}") from None
    return cfg, state, str(path)


def build_encoder(cfg: ViTConfig, state: dict | None, seed: int = 0) -> VisionTransformer:
    encoder = VisionTransformer(cfg)
    if state is None:
        encoder.init_weights(seed)
    else:
        load_mae_checkpoint(encoder, state)
    return encoder.requires_grad_(False).eval()


# ---- frozen features ----


def cls_features(encoder: nn.Module, imgs_BCHW: torch.Tensor) -> torch.Tensor:
    """(B, D) fp32: the cls token after the final norm, as the MAE linear probe reads it."""
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=imgs_BCHW.device.type == "cuda"):
        return encoder(imgs_BCHW.to(next(encoder.parameters()).dtype))[:, 0].float()


def _single_thread_worker(_):
    torch.set_num_threads(1)  # loader workers share the cores with the main process


def make_eval_loader(dataset, batch_size: int, workers: int, device: torch.device):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                       pin_memory=device.type == "cuda", worker_init_fn=_single_thread_worker)


@torch.no_grad()
def predict(fn: Callable[[torch.Tensor], torch.Tensor], dataset, batch_size: int, workers: int, device: torch.device,
            rank: int = 0, world_size: int = 1, log=print, what: str = "predict"):
    """fn(images) for every image, in dataset order: ((N, K) fp32, labels (N,)) on CPU, on every rank.

    Each rank takes one contiguous block, padded with the last image so that all ranks run the same
    number of batches (a sharded model needs every rank in every forward); blocks are gathered in order.
    Logs images/s and the ETA every few seconds.
    """
    n = len(dataset)
    per_rank = math.ceil(n / world_size)
    block = [min(i, n - 1) for i in range(rank * per_rank, (rank + 1) * per_rank)]
    outs, labels, done = [], [], 0
    start = last = time.perf_counter()
    for imgs, ys in make_eval_loader(torch.utils.data.Subset(dataset, block), batch_size, workers, device):
        outs.append(fn(imgs.to(device, non_blocking=True)).float())
        labels.append(torch.as_tensor(ys).to(device))
        done += len(imgs)
        now = time.perf_counter()
        if now - last >= 5.0 or done == len(block):
            rate = done / max(now - start, 1e-9)
            log(f"{what}: {min(done * world_size, n)}/{n} images, {rate * world_size:.0f} img/s, "
                f"ETA {(len(block) - done) / rate:.0f} s")
            last = now
    out, label = torch.cat(outs), torch.cat(labels)
    if world_size > 1:
        out, label = (torch.cat(_all_gather(t, world_size))[:n] for t in (out, label))
    return out.cpu(), label.cpu()


def _all_gather(t: torch.Tensor, world_size: int) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(world_size)]
    torch.distributed.all_gather(parts, t.contiguous())
    return parts


def extract_features(encoder, dataset, batch_size=64, workers=0, device=torch.device("cpu"), flip=False,
                     rank=0, world_size=1, log=print):
    """Frozen cls features (N, D) fp32 and labels (N,) of every image in dataset order, on CPU."""
    # A frozen encoder on the GPU is stored in bf16: autocast runs its matmuls in bf16 anyway, and
    # half the memory lets one GPU hold a 15B encoder (30 GB). LayerNorm still computes in fp32.
    encoder = encoder.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
    fn = (lambda x: cls_features(encoder, x.flip(-1))) if flip else (lambda x: cls_features(encoder, x))
    return predict(fn, dataset, batch_size, workers, device, rank, world_size, log, f"features{' (flipped)' * flip}")


# ---- linear probe ----


class LARS(torch.optim.Optimizer):
    """SGD + momentum whose step for each weight matrix is scaled by trust·‖w‖/‖g‖ (You et al., 2017).

    The MAE linear-probe optimiser; vectors (biases) take plain SGD steps, as in the recipe.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, trust: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust=trust))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = p.norm(), update.norm()
                    update = update * torch.where((w_norm > 0) & (u_norm > 0), group["trust"] * w_norm / u_norm, 1.0)
                momentum = self.state[p].setdefault("momentum", torch.zeros_like(p))
                p.sub_(group["lr"] * momentum.mul_(group["momentum"]).add_(update))


def make_probe_head(dim: int, num_classes: int, seed: int) -> nn.Sequential:
    """BatchNorm1d without affine (per-feature standardisation, as the recipe) + Linear, init std 0.01."""
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01, generator=torch.Generator().manual_seed(seed))
    nn.init.zeros_(head[1].bias)
    return head


def train_linear_probe(features_of: Callable[[torch.Tensor], torch.Tensor], labels_N: torch.Tensor, dim: int,
                       num_classes: int, cfg: EvalConfig, seed: int, device=torch.device("cpu"),
                       epochs: int = 90) -> nn.Sequential:
    """Train the probe head; `features_of(indices)` returns the (B, D) features of those training images.

    Why SGD and not the recipe's LARS by default: LARS caps every step at 0.001·‖w‖ and was tuned for
    1.28M images × 90 epochs at batch 16384. The distance its weights travel grows with images ×
    epochs, so on UC Merced-sized sets (10³ images) the head barely leaves its init (measured on a
    4-class synthetic set of 160 training images: LARS 30-44% top-1, SGD 92-98%, chance 25%). Plain
    SGD + momentum 0.9 keeps the rest of the recipe: blr 0.1, lr = blr·batch/256, 10 warmup epochs of
    90, cosine, no weight decay. `--probe-optimizer lars` restores the recipe for MillionAID-scale sets.
    """
    n = len(labels_N)
    batch = min(cfg.probe_batch_size, n)
    head = make_probe_head(dim, num_classes, seed).to(device)
    peak_lr = cfg.probe_blr * batch / 256
    opt = (LARS if cfg.probe_optimizer == "lars" else torch.optim.SGD)(head.parameters(), lr=peak_lr, momentum=0.9)
    order_gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = n // batch  # drop_last, as the recipe: BatchNorm wants full batches
    total, warmup = epochs * steps_per_epoch, epochs // 9 * steps_per_epoch  # recipe: 10 of 90 epochs
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=order_gen)
        for idx in order[: steps_per_epoch * batch].split(batch):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, peak_lr, total, warmup)
            loss = F.cross_entropy(head(features_of(idx).to(device)), labels_N[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return head.eval()


def linear_probe_cached(train_feats_ND, train_labels_N, num_classes, cfg, seed, device=torch.device("cpu"), epochs=90):
    feats = train_feats_ND.to(device)
    return train_linear_probe(lambda idx: feats[idx.to(device)], train_labels_N, feats.shape[1], num_classes, cfg,
                              seed, device, epochs)


# ---- kNN ----


def knn_scores(train_feats_ND, train_labels_N, test_feats_MD, num_classes, k=20, temperature=0.07, chunk=1024):
    """Weighted kNN votes (M, C): cosine similarity; each of the k nearest votes exp(sim / T) for its class."""
    train = F.normalize(train_feats_ND.float(), dim=1)
    k = min(k, len(train))
    votes = []
    for test in F.normalize(test_feats_MD.float(), dim=1).split(chunk):
        sims, idx = (test @ train.T).topk(k, dim=1)
        votes.append(torch.zeros(len(test), num_classes).scatter_add_(1, train_labels_N[idx], (sims / temperature).exp()))
    return torch.cat(votes)


# ---- fine-tuning ----


class ViTClassifier(VisionTransformer):
    """The MAE fine-tune model: mean of the patch tokens -> LayerNorm `fc_norm` -> Linear `head`.

    A VisionTransformer subclass, so the encoder keys stay top-level (pretrained weights load as
    they are) and fsdp_setup shards its Blocks. The global-pool recipe drops the final `norm`.
    """

    def __init__(self, cfg: ViTConfig, num_classes: int):
        super().__init__(cfg)
        self.norm = nn.Identity()
        self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.head = nn.Linear(cfg.embed_dim, num_classes)
        self.init_weights()

    def forward(self, imgs_BCHW: torch.Tensor) -> torch.Tensor:
        tokens_BLD = super().forward(imgs_BCHW)
        return self.head(self.fc_norm(tokens_BLD[:, 1:].mean(dim=1)))


def classifier_state(vit_cfg: ViTConfig, state: dict | None, num_classes: int, seed: int) -> dict:
    """The starting weights of a ViTClassifier: the encoder's (random from `seed` if None, without
    the final norm), a fresh fc_norm and the recipe's near-zero head (std 2e-5), so the first steps
    do not wreck the pretrained features."""
    if state is None:
        state = build_encoder(vit_cfg, None, seed).state_dict()
    D = vit_cfg.embed_dim
    head = nn.init.trunc_normal_(torch.empty(num_classes, D), std=2e-5, generator=torch.Generator().manual_seed(seed))
    return {**{k: v for k, v in state.items() if not k.startswith("norm.")}, "fc_norm.weight": torch.ones(D),
            "fc_norm.bias": torch.zeros(D), "head.weight": head, "head.bias": torch.zeros(num_classes)}


def build_classifier(vit_cfg: ViTConfig, state: dict | None, num_classes: int, cfg: EvalConfig, seed: int, rank: int):
    """Meta build -> fsdp_setup.parallelize -> weights broadcast from rank 0, which alone holds a full copy."""
    with torch.device("meta"):
        model = ViTClassifier(vit_cfg, num_classes)
    model = fsdp_setup.parallelize(model, cfg.strategy, cfg.shard_group_size, cfg.mixed_precision, seed=seed)
    full = classifier_state(vit_cfg, state, num_classes, seed) if rank == 0 else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def finetune_recipe(cfg: ViTConfig) -> dict:
    """MAE fine-tune defaults by encoder width: B (and smaller), L, H (and larger)."""
    if cfg.embed_dim <= 768:
        return dict(layer_decay=0.65, drop_path=0.1, blr=5e-4, epochs=100)
    if cfg.embed_dim <= 1024:
        return dict(layer_decay=0.75, drop_path=0.2, blr=1e-3, epochs=50)
    return dict(layer_decay=0.75, drop_path=0.3, blr=1e-3, epochs=50)


def layer_id(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for blocks.i, depth + 1 for fc_norm and the head."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def finetune_param_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups with lr_scale = layer_decay^(depth + 1 - layer): the head learns at the full lr,
    the patch embedding at decay^(depth + 1). No weight decay for biases, norms and the cls token."""
    depth = model.cfg.depth
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        no_decay = p.ndim == 1 or name == "cls_token"
        lid = layer_id(name, depth)
        group = groups.setdefault((lid, no_decay), {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                                    "lr_scale": layer_decay ** (depth + 1 - lid)})
        group["params"].append(p)
    return list(groups.values())


def finetune(model: nn.Module, train_dataset, cfg: EvalConfig, recipe: dict, seed: int, device: torch.device,
             rank: int = 0, world_size: int = 1, log=print) -> nn.Module:
    """Full fine-tuning of a parallelized ViTClassifier. The recipe without mixup/cutmix/RandAugment:
    the augmentation is SceneDataset's (random resized crop, flips, 90° rotations)."""
    torch.manual_seed(seed + rank)  # drop path draws from the global generator
    sampler = torch.utils.data.DistributedSampler(train_dataset, world_size, rank, shuffle=True, seed=seed, drop_last=True)
    loader = torch.utils.data.DataLoader(train_dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                         num_workers=cfg.workers, pin_memory=device.type == "cuda",
                                         worker_init_fn=_single_thread_worker)
    if len(loader) == 0:
        raise ValueError(f"{len(train_dataset)} training images do not fill one step of --batch-size "
                         f"{cfg.batch_size} × {world_size} processes; lower --batch-size")
    peak_lr = recipe["blr"] * cfg.batch_size * world_size / 256  # the recipe's linear scaling rule
    groups = finetune_param_groups(fsdp_setup.unwrap(model), cfg.weight_decay, recipe["layer_decay"])
    opt = torch.optim.AdamW(groups, lr=peak_lr, fused=True)  # betas (0.9, 0.999), as the recipe's fine-tuning; fused as train.py
    epochs, steps_per_epoch = recipe["epochs"], len(loader)
    total, warmup = epochs * steps_per_epoch, min(cfg.warmup_epochs, epochs) * steps_per_epoch
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    model.train()
    step = 0
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        train_dataset.set_epoch(epoch)  # fresh augmentations, from (seed, epoch, index)
        loss_sum, start = torch.zeros((), device=device), time.perf_counter()
        for imgs, labels in loader:
            lr = lr_at(step, peak_lr, total, warmup, min_lr=1e-6)
            for group in opt.param_groups:
                group["lr"] = lr * group["lr_scale"]
            loss = loss_fn(model(imgs.to(device, non_blocking=True)).float(), labels.to(device, non_blocking=True))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            step += 1
        rate = steps_per_epoch * cfg.batch_size * world_size / (time.perf_counter() - start)
        log(f"finetune epoch {epoch + 1}/{epochs}: loss {loss_sum.item() / steps_per_epoch:.4f} (rank 0), "
            f"lr {lr:.2e}, {rate:.0f} img/s")
    return model.eval()


# ---- metrics and outputs ----


def classification_metrics(scores_NC: torch.Tensor, labels_N: torch.Tensor, class_names: list[str]) -> dict:
    """top-1 and top-5 (percent), per-class top-1 (percent; None for a class without test images),
    and the confusion matrix (rows: true class, columns: predicted)."""
    C = len(class_names)
    topk = scores_NC.topk(min(5, C), dim=1).indices
    hits = topk == labels_N[:, None]
    confusion = torch.zeros(C, C, dtype=torch.long)
    confusion.index_put_((labels_N, topk[:, 0]), torch.ones(len(labels_N), dtype=torch.long), accumulate=True)
    per_class = {name: 100.0 * confusion[c, c].item() / confusion[c].sum().item() if confusion[c].sum() else None
                 for c, name in enumerate(class_names)}
    return {"top1": 100.0 * hits[:, 0].float().mean().item(), "top5": 100.0 * hits.any(1).float().mean().item(),
            "per_class": per_class, "confusion": confusion.tolist()}


def save_confusion(confusion: list[list[int]], class_names: list[str], stem: Path) -> None:
    """stem.csv (counts, class names as header) and stem.png (rows normalised; darker = more)."""
    with open(stem.with_suffix(".csv"), "w") as f:
        f.write("true\\predicted," + ",".join(class_names) + "\n")
        f.writelines(name + "," + ",".join(map(str, row)) + "\n" for name, row in zip(class_names, confusion))
    C, font = len(class_names), ImageFont.load_default()
    cell = 24 if C <= 40 else 10
    left, top = 8 + int(max(font.getlength(f"{i} {n}") for i, n in enumerate(class_names))), 24
    img = Image.new("RGB", (left + C * cell + 8, top + C * cell + 8), "white")
    draw = ImageDraw.Draw(img)
    for j in range(C):  # columns are labelled by class index, in the order of the rows
        draw.text((left + j * cell + 3, 6), str(j), fill="black", font=font)
    for i, (name, row) in enumerate(zip(class_names, confusion)):
        y = top + i * cell
        draw.text((4, y + cell // 2 - 6), f"{i} {name}", fill="black", font=font)
        for j, count in enumerate(row):
            frac, x = count / max(sum(row), 1), left + j * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(int(255 * (1 - frac)), int(255 * (1 - 0.6 * frac)), 255),
                           outline=(220, 220, 220))
            if count and cell >= 20:
                draw.text((x + 3, y + 5), str(count), fill="white" if frac > 0.5 else "black", font=font)
    img.save(stem.with_suffix(".png"))


def summarize(runs: list[dict]) -> dict:
    """Mean and sample standard deviation (0 for a single run) of top-1 and top-5 over the seeds."""
    out = {}
    for key in ("top1", "top5"):
        values = [r[key] for r in runs]
        out[key], out[key + "_std"] = statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def split_id(items) -> str:
    """A short fingerprint of a split, to check that two evaluations used the same images."""
    return hashlib.sha1("\n".join(f"{p}\t{y}" for p, y in sorted((str(p), y) for p, y in items)).encode()).hexdigest()[:12]


def report(results: dict, log=print) -> None:
    for r in results["runs"]:
        log(f"seed {r['seed']}: top-1 {r['top1']:.2f}  top-5 {r['top5']:.2f}  ({r['num_train']} train / {r['num_test']} test)")
    log("per-class top-1 (mean over seeds):")
    for name in results["class_names"]:
        accs = [r["per_class"][name] for r in results["runs"] if r["per_class"][name] is not None]
        log(f"  {name:<32} {statistics.fmean(accs):6.2f}" if accs else f"  {name:<32}    n/a")
    n = len(results["runs"])
    log(f"{results['mode']}: top-1 {results['top1']:.2f} ± {results['top1_std']:.2f}  top-5 {results['top5']:.2f} ± "
        f"{results['top5_std']:.2f}  over {n} seed{'s' * (n > 1)} ({results['encoder']})")


# ---- the three protocols ----


def check_scene_data(splits: dict, vit_cfg: ViTConfig, cfg: EvalConfig, source: str, log=print) -> None:
    """The data mistakes that would otherwise surface deep inside a run, with the eval.py flags that fix them."""
    for seed, (train_items, test_items, class_names) in splits.items():
        if not train_items or not test_items:
            raise ValueError(f"--data {cfg.data}: {len(train_items)} training and {len(test_items)} test images "
                             f"(seed {seed}); both splits need images: add some or change --train-ratio")
        for what, items in (("training", train_items), ("test", test_items)):
            missing = sorted(set(range(len(class_names))) - {label for _, label in items})
            if missing and what == "training":
                raise ValueError(f"--data {cfg.data}: no training images for class(es) "
                                 f"{[class_names[c] for c in missing[:5]]} (seed {seed}); add images or raise --train-ratio")
            if missing:
                log(f"warning: no test images for class(es) {[class_names[c] for c in missing[:5]]} (seed {seed})")
    first = next(iter(splits.values()))[0][0]
    with data.open_image(first[0]) as image:
        file_bands = image.info.bands
    data.check_bands(cfg.bands)
    selected = file_bands if cfg.bands is None else len(cfg.bands)
    if selected != vit_cfg.in_chans:
        have = f"{file_bands}" + (f" ({selected} selected by --bands)" if cfg.bands is not None else "")
        example = ",".join(str(min(b, file_bands - 1)) for b in range(vit_cfg.in_chans))
        other = "--in-chans" if cfg.encoder == "random" else "an encoder pretrained on them"
        raise ValueError(f"the encoder {source} expects {vit_cfg.in_chans} bands, the images of --data {cfg.data} "
                         f"have {have} (e.g. {first[0]}): pick {vit_cfg.in_chans} of them with --bands (0-based, "
                         f"e.g. --bands {example}), or use {other}")
    scene_dataset([first], vit_cfg, cfg, train=False)[0]  # band indices, statistics: data.py names file and fix


def feature_cache_key(encoder: nn.Module, items, vit_cfg: ViTConfig, cfg: EvalConfig) -> dict:
    """What saved features depend on: the encoder's weights (hashed, so another encoder under the
    same file name does not match), the images (path, label, size, modification time), the band
    selection and the statistics file's contents."""
    weights = hashlib.sha256()
    for name, tensor in encoder.state_dict().items():
        weights.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        weights.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy())
    images = hashlib.sha256()
    for path, label in items:
        stat = os.stat(path)
        images.update(f"{path}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    stats = hashlib.sha256(Path(cfg.stats).read_bytes()).hexdigest() if cfg.stats else None
    return {"encoder": weights.hexdigest(), "images": images.hexdigest(), "vit_config": asdict(vit_cfg),
            "bands": cfg.bands, "stats": stats}


def features_for(encoder, items, flip, key, vit_cfg, cfg, device, rank, world_size, log):
    """extract_features over `items`; with --cache-features saved to --out/features[_flip].pt with
    `key` (feature_cache_key), and reused from there while the key matches."""
    path = Path(cfg.out) / f"features{'_flip' * flip}.pt"
    if cfg.cache_features and path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["key"] == key:
            log(f"features: reusing {path}")
            return saved["features"], saved["labels"]
    feats, labels = extract_features(encoder, scene_dataset(items, vit_cfg, cfg, train=False), cfg.batch_size,
                                     cfg.workers, device, flip, rank, world_size, log)
    if cfg.cache_features and rank == 0:
        torch.save({"key": key, "features": feats, "labels": labels}, path)
    return feats, labels


def run_frozen(cfg, vit_cfg, state, splits, class_names, device, rank, world_size, log) -> list[dict]:
    """linprobe / knn for every seed, on features extracted once for all images (the splits only re-index)."""
    encoder = build_encoder(vit_cfg, state)
    train_items, test_items, _ = next(iter(splits.values()))
    all_items = sorted((str(p), y) for p, y in train_items + test_items)
    row = {p: i for i, (p, _) in enumerate(all_items)}
    key = feature_cache_key(encoder, all_items, vit_cfg, cfg) if cfg.cache_features else None
    feats, labels = features_for(encoder, all_items, False, key, vit_cfg, cfg, device, rank, world_size, log)
    if cfg.mode == "linprobe" and cfg.probe_flip:
        flipped, _ = features_for(encoder, all_items, True, key, vit_cfg, cfg, device, rank, world_size, log)
    del encoder
    runs = []
    for seed, (train_items, test_items, _) in splits.items():
        train_idx, test_idx = (torch.tensor([row[str(p)] for p, _ in items]) for items in (train_items, test_items))
        if cfg.mode == "knn":
            scores = knn_scores(feats[train_idx], labels[train_idx], feats[test_idx], len(class_names), cfg.knn_k,
                                cfg.knn_temperature)
        else:
            train_feats, train_labels = feats[train_idx], labels[train_idx]
            if cfg.probe_flip:
                train_feats, train_labels = torch.cat([train_feats, flipped[train_idx]]), train_labels.repeat(2)
            head = linear_probe_cached(train_feats, train_labels, len(class_names), cfg, seed, device, cfg.epochs or 90)
            with torch.no_grad():
                scores = head(feats[test_idx].to(device)).float().cpu()
        runs.append({"seed": seed, "num_train": len(train_items), "num_test": len(test_items),
                     "split_id": split_id(train_items), **classification_metrics(scores, labels[test_idx], class_names)})
    return runs


def run_finetune(cfg, vit_cfg, state, splits, class_names, device, rank, world_size, log) -> list[dict]:
    recipe = finetune_recipe(vit_cfg)
    recipe.update({k: v for k, v in (("blr", cfg.blr), ("layer_decay", cfg.layer_decay), ("drop_path", cfg.drop_path),
                                     ("epochs", cfg.epochs)) if v is not None})
    log(f"finetune recipe: {recipe}, batch {cfg.batch_size} × {world_size}, layout {cfg.strategy}")
    runs = []
    for seed, (train_items, test_items, _) in splits.items():
        model = build_classifier(replace(vit_cfg, drop_path=recipe["drop_path"]), state, len(class_names), cfg, seed, rank)
        model = finetune(model, scene_dataset(train_items, vit_cfg, cfg, train=True, seed=seed), cfg, recipe, seed,
                         device, rank, world_size, log)
        scores, labels = predict(model, scene_dataset(test_items, vit_cfg, cfg, train=False), cfg.batch_size,
                                 cfg.workers, device, rank, world_size, log, "test")
        runs.append({"seed": seed, "num_train": len(train_items), "num_test": len(test_items),
                     "split_id": split_id(train_items), **classification_metrics(scores, labels, class_names)})
        del model
    return runs


def setup(cfg: EvalConfig, log=print) -> tuple:
    """(ViTConfig, encoder state or None, its description, {seed: split}), with every check that
    needs no model: the encoder file against the flags, the dataset against the encoder."""
    vit_cfg, state, source = load_encoder(cfg.encoder, cfg.model, cfg.in_chans, cfg.img_size, log)
    splits = {seed: scene_splits(cfg.data, cfg.train_ratio, seed) for seed in cfg.seeds}
    check_scene_data(splits, vit_cfg, cfg, source, log)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    return vit_cfg, state, source, splits


def run(cfg: EvalConfig, log=print) -> dict:
    """Evaluate one encoder on one dataset for every seed; writes --out (rank 0) and returns results.json's dict."""
    validate(cfg)
    dist_info = fsdp_setup.init_distributed()  # a world of one without torchrun/srun
    rank, world_size, device = dist_info.rank, dist_info.world_size, dist_info.device
    try:
        log = log if rank == 0 else (lambda *a, **k: None)
        cfg = replace(cfg, mixed_precision=fsdp_setup.resolve_mixed_precision(cfg.mixed_precision, device))
        if cfg.mode == "finetune":
            fsdp_setup.validate_layout(cfg.strategy, cfg.shard_group_size, world_size, cfg.mixed_precision, device=device)
        vit_cfg, state, source, splits = fsdp_setup.on_every_rank(lambda: setup(cfg, log), dist_info)
        class_names = next(iter(splits.values()))[2]
        log(f"{cfg.mode}: encoder {source}, {len(class_names)} classes in {cfg.data}, {world_size} × {device}")
        run_mode = run_finetune if cfg.mode == "finetune" else run_frozen
        try:
            runs = run_mode(cfg, vit_cfg, state, splits, class_names, device, rank, world_size, log)
        except (ValueError, FileNotFoundError) as err:  # e.g. a corrupt image in this rank's share
            if world_size == 1:
                raise
            # The other ranks wait for this one in a collective it will never join: end the process
            # and let torchrun (or srun --kill-on-bad-exit=1) stop them.
            print(f"error: [rank {rank}] {data.error_message(err)}", file=sys.stderr, flush=True)
            os._exit(2)
        # train_ratio: the one the split used (0.8 for folders without --train-ratio; None: the list
        # files' split). top5_k: below 5 classes "top-5" is top-C, 100% by construction.
        results = {"mode": cfg.mode, "encoder": source, "data": cfg.data,
                   "train_ratio": default_train_ratio(cfg.data, cfg.train_ratio),
                   **summarize(runs), "top5_k": min(5, len(class_names)), "num_train": runs[0]["num_train"], "num_test": runs[0]["num_test"],
                   "seeds": cfg.seeds, "class_names": class_names, "vit_config": asdict(vit_cfg), "runs": runs,
                   "config": asdict(cfg)}
        if rank == 0:
            for r in runs:
                save_confusion(r["confusion"], class_names, Path(cfg.out) / f"confusion_seed{r['seed']}")
            with open(Path(cfg.out) / "results.json", "w") as f:
                json.dump(results, f, indent=1)
            report(results, log)
        return results
    finally:
        fsdp_setup.cleanup()


# ---- command line ----


def validate(cfg: EvalConfig) -> None:
    """Flag errors, before any file is read."""
    if cfg.mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")
    if cfg.train_ratio is not None and not 0.0 < cfg.train_ratio < 1.0:
        raise ValueError(f"--train-ratio must be in (0, 1), e.g. 0.2 for AID's 20% protocol; got {cfg.train_ratio}")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ValueError(f"--seed needs one or more distinct values, got {cfg.seeds}")
    for name in ("batch_size", "probe_batch_size", "knn_k") + (("epochs",) if cfg.epochs is not None else ()):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.probe_optimizer not in ("sgd", "lars"):
        raise ValueError(f"--probe-optimizer must be sgd or lars, got {cfg.probe_optimizer!r}")
    if cfg.model is not None and cfg.model not in CONFIGS:
        raise ValueError(f"--model {cfg.model!r} is unknown; choose one of: {', '.join(CONFIGS)}")


def parse_args(argv=None) -> EvalConfig:
    d = EvalConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("mode", choices=MODES, help="knn: no training, quick; linprobe: the paper's protocol; finetune: full fine-tuning")
    p.add_argument("--encoder", required=True, help="encoder .pt (`checkpoint.py export`, or an official MAE/timm ViT with --model), a training run folder, or 'random'")
    p.add_argument("--data", required=True, help="scene dataset: a root with one subfolder of images per class, or a folder / train.txt with train.txt + val.txt ('relative/path label' lines)")
    p.add_argument("--train-ratio", type=float, default=None, help="training fraction per class (UCM 0.5/0.8, AID 0.2/0.5, NWPU 0.1/0.2); default: the list files' split, else 0.8")
    p.add_argument("--seed", dest="seeds", type=int, nargs="+", default=d.seeds, help="one run per seed (split and head); reports mean ± std")
    p.add_argument("--out", default=d.out, help="output folder: results.json, confusion_seed*.csv/png, features*.pt")
    p.add_argument("--model", default=None, help=f"architecture for 'random' and files without vit_config: {', '.join(CONFIGS)}")
    p.add_argument("--in-chans", type=int, default=None, help="input bands, for files without vit_config")
    p.add_argument("--img-size", type=int, default=None, help="input size in pixels, for files without vit_config")
    p.add_argument("--bands", default=None, help="comma-separated 0-based bands to read from each image, e.g. 3,2,1 (as train.py)")
    p.add_argument("--stats", default=None, help="per-band mean/std JSON (`python data.py stats`), as in pretraining; 3-band uint8 images default to ImageNet's")
    p.add_argument("--epochs", type=int, default=None, help="default: 90 (linprobe); 100 for B and smaller, 50 for L and up (finetune)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step per process: feature extraction, fine-tuning")
    p.add_argument("--workers", type=int, default=d.workers, help="data-loading processes per process")
    p.add_argument("--cache-features", action="store_true", help="save frozen features in --out and reuse them when encoder and images match")
    p.add_argument("--probe-batch-size", type=int, default=d.probe_batch_size, help="linprobe: head batch on the cached features")
    p.add_argument("--probe-optimizer", default=d.probe_optimizer, choices=["sgd", "lars"], help="linprobe: lars is the recipe's, for MillionAID-scale sets")
    p.add_argument("--probe-blr", type=float, default=d.probe_blr, help="linprobe: base lr, lr = blr * batch / 256")
    p.add_argument("--probe-flip", action="store_true", help="linprobe: also train on features of horizontally flipped training images")
    p.add_argument("--knn-k", type=int, default=d.knn_k, help="knn: neighbours that vote")
    p.add_argument("--knn-temperature", type=float, default=d.knn_temperature, help="knn: vote weight exp(cosine / T)")
    p.add_argument("--blr", type=float, default=None, help="finetune: base lr, lr = blr * batch * processes / 256; default 5e-4 (B), 1e-3 (L and up)")
    p.add_argument("--layer-decay", type=float, default=None, help="finetune: layer-wise lr decay; default 0.65 (B), 0.75 (L and up)")
    p.add_argument("--drop-path", type=float, default=None, help="finetune: stochastic depth; default 0.1 (B), 0.2 (L), 0.3 (H and up)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="finetune: AdamW weight decay")
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help="finetune: label smoothing")
    p.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs, help="finetune: linear warmup epochs")
    p.add_argument("--strategy", default=d.strategy, choices=fsdp_setup.STRATEGIES, help="finetune: layout across the torchrun/srun processes, as in training")
    p.add_argument("--shard-group-size", type=int, default=None, help="finetune: GPUs sharding one replica (hybrid_shard)")
    p.add_argument("--mixed-precision", default=d.mixed_precision, choices=("auto", *fsdp_setup.PRECISIONS), help="finetune: auto is bf16 on GPU, fp32 on CPU")
    args = vars(p.parse_args(argv))
    return EvalConfig(**{**args, "bands": parse_band_map(args["bands"], "--bands")})



def main(argv=None) -> int:
    """`python eval.py ...`. A user error (flags, data, encoder file) prints `error: <message>`, on
    rank 0 only, as train.py does, and exits 2; anything else is a bug and shows its traceback."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    try:
        run(parse_args(argv))
    except (ValueError, FileNotFoundError) as err:
        if rank == 0:
            print(f"error: {data.error_message(err)}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
