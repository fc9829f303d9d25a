"""eval.py — judge a pretrained encoder by scene classification: linear probe, kNN, fine-tuning.

    python eval.py knn      --encoder encoder.pt --data UCMerced_LandUse/Images --train-ratio 0.5
    python eval.py linprobe --encoder runs/base --data AID --train-ratio 0.2 --seed 0 1 2
    python eval.py linprobe --encoder random --model vit_base --data AID --train-ratio 0.2   # baseline
    torchrun --standalone --nproc_per_node=8 eval.py finetune --encoder encoder.pt --data NWPU-RESISC45 \
        --train-ratio 0.2 --strategy full_shard

knn: weighted kNN on frozen cls features, a quick check. linprobe: the MAE protocol on frozen cls
features extracted once. finetune: the MAE recipe on fsdp_setup.parallelize (--strategy). The datasets
and scores are scenes.py's. --out gets results.json (top-1/top-5, mean ± std over --seed) and confusion
matrices; a user error prints one `error: ...` line and exits 2. Protocols, dataset layouts, split
rules, outputs and the measured numbers behind the defaults: docs/eval.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

import data
import fsdp_setup
import scenes
from weights import load_encoder, load_mae_checkpoint, parse_band_map
from train import lr_at
from vit import CONFIGS, ViTConfig, VisionTransformer

MODES = ("linprobe", "knn", "finetune")
ALONE = fsdp_setup.Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))  # one process, no torchrun


@dataclass
class EvalConfig:  # one field per flag (`--seed` fills seeds); what each means: parse_args' help, docs/eval.md
    mode: str = "linprobe"
    encoder: str = ""
    data: str = ""
    train_ratio: float | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    out: str = "runs/eval"
    model: str | None = None
    in_chans: int | None = None
    img_size: int | None = None
    bands: list[int] | None = None
    stats: str | None = None
    epochs: int | None = None
    batch_size: int = 64
    workers: int = 4
    cache_features: bool = False
    probe_batch_size: int = 256
    probe_optimizer: str = "sgd"
    probe_blr: float = 0.1
    probe_flip: bool = False
    knn_k: int = 20
    knn_temperature: float = 0.07
    blr: float | None = None
    layer_decay: float | None = None
    drop_path: float | None = None
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    warmup_epochs: int = 5
    strategy: str = "ddp"
    shard_group_size: int | None = None
    mixed_precision: str = "auto"


# ---- encoder and scene data, as the flags select them ----


def build_encoder(cfg: ViTConfig, state: dict | None, seed: int = 0) -> VisionTransformer:
    encoder = VisionTransformer(cfg)
    if state is None:
        encoder.init_weights(seed)
    else:
        load_mae_checkpoint(encoder, state)
    return encoder.requires_grad_(False).eval()


def scene_dataset(items, vit_cfg: ViTConfig, cfg: EvalConfig, train: bool, seed: int = 0) -> scenes.SceneDataset:
    return scenes.SceneDataset(items, img_size=vit_cfg.img_size, train=train, stats=cfg.stats, bands=cfg.bands,
                               in_chans=vit_cfg.in_chans, seed=seed)


def check_scene_data(splits: dict, vit_cfg: ViTConfig, cfg: EvalConfig, source: str, log=print) -> None:
    """The data mistakes that would otherwise surface deep inside a run, with the eval.py flags that fix them."""
    for seed, (train_items, test_items, class_names) in splits.items():
        if not train_items or not test_items:
            raise ValueError(f"--data {cfg.data}: {len(train_items)} training and {len(test_items)} test images "
                             f"(seed {seed}); both splits need images: add some or change --train-ratio")
        no_train, no_test = ([name for c, name in enumerate(class_names) if c not in {y for _, y in items}][:5]
                             for items in (train_items, test_items))
        if no_train:
            raise ValueError(f"--data {cfg.data}: no training images for class(es) {no_train} (seed {seed}); "
                             "add images or raise --train-ratio")
        if no_test:
            log(f"warning: no test images for class(es) {no_test} (seed {seed})")
    first = next(iter(splits.values()))[0][0]
    with data.open_image(first[0]) as image:
        file_bands = image.info.bands
    data.check_bands(cfg.bands)
    if (file_bands if cfg.bands is None else len(cfg.bands)) != vit_cfg.in_chans:
        have = f"{file_bands}" + (f" ({len(cfg.bands)} selected by --bands)" if cfg.bands is not None else "")
        example = ",".join(str(min(b, file_bands - 1)) for b in range(vit_cfg.in_chans))
        other = "--in-chans" if cfg.encoder == "random" else "an encoder pretrained on them"
        raise ValueError(f"the encoder {source} expects {vit_cfg.in_chans} bands, the images of --data {cfg.data} "
                         f"have {have} (e.g. {first[0]}): pick {vit_cfg.in_chans} of them with --bands (0-based, "
                         f"e.g. --bands {example}), or use {other}")
    scene_dataset([first], vit_cfg, cfg, train=False)[0]  # band indices, statistics: data.py names file and fix


# ---- inference over a dataset, frozen features, feature cache ----


def _one_thread(_):
    torch.set_num_threads(1)  # loader workers share the cores with the main process


def make_loader(dataset, batch_size: int, workers: int, device: torch.device, sampler=None):
    return torch.utils.data.DataLoader(dataset, batch_size, sampler=sampler, drop_last=sampler is not None,
                                       num_workers=workers, pin_memory=device.type == "cuda",
                                       worker_init_fn=_one_thread)


@torch.no_grad()
def predict(fn, dataset, batch_size: int, workers: int, dist=ALONE, log=print, what: str = "predict"):
    """fn(images) for every image, in dataset order: ((N, K) fp32, labels (N,)) on CPU, on every rank. Ranks take
    equal contiguous blocks (the last image pads them), as a sharded model needs every rank in every forward."""
    n, world = len(dataset), dist.world_size
    per_rank = math.ceil(n / world)
    block = [min(i, n - 1) for i in range(dist.rank * per_rank, (dist.rank + 1) * per_rank)]
    outs, labels, done = [], [], 0
    start = last = time.perf_counter()
    for imgs, ys in make_loader(torch.utils.data.Subset(dataset, block), batch_size, workers, dist.device):
        outs.append(fn(imgs.to(dist.device, non_blocking=True)).float())
        labels.append(torch.as_tensor(ys).to(dist.device))
        done += len(imgs)
        if (now := time.perf_counter()) - last >= 5.0 or done == len(block):
            rate = done / max(now - start, 1e-9)
            log(f"{what}: {min(done * world, n)}/{n} images, {rate * world:.0f} img/s, "
                f"ETA {(len(block) - done) / rate:.0f} s")
            last = now
    outs, labels = torch.cat(outs), torch.cat(labels)
    if world > 1:  # every rank's block, in rank order
        parts = [[torch.empty_like(t) for _ in range(world)] for t in (outs, labels)]
        for gathered, t in zip(parts, (outs, labels)):
            torch.distributed.all_gather(gathered, t)
        outs, labels = (torch.cat(gathered)[:n] for gathered in parts)
    return outs.cpu(), labels.cpu()


def cls_features(encoder: nn.Module, imgs_BCHW: torch.Tensor) -> torch.Tensor:
    """(B, D) fp32: the cls token after the final norm, as the MAE linear probe reads it."""
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=imgs_BCHW.device.type == "cuda"):
        return encoder(imgs_BCHW.to(next(encoder.parameters()).dtype))[:, 0].float()


def extract_features(encoder, dataset, batch_size=64, workers=0, dist=ALONE, flip=False, log=print):
    """Frozen cls features (N, D) fp32 and labels (N,) of every image in dataset order, on CPU."""
    # bf16 on a GPU: autocast runs the matmuls in bf16 anyway, and half the memory holds a 15B encoder.
    encoder = encoder.to(dist.device, torch.bfloat16 if dist.device.type == "cuda" else torch.float32).eval()
    fn = (lambda x: cls_features(encoder, x.flip(-1))) if flip else (lambda x: cls_features(encoder, x))
    return predict(fn, dataset, batch_size, workers, dist, log, f"features{' (flipped)' * flip}")


def feature_cache_key(encoder: nn.Module, items, vit_cfg: ViTConfig, cfg: EvalConfig) -> str:
    """A hash of what saved features depend on: the encoder's weights (not its file name), the images
    (path, label, size, modification time), the ViT config, the band selection and the statistics file."""
    key = hashlib.sha256(json.dumps([asdict(vit_cfg), cfg.bands]).encode())
    for name, tensor in encoder.state_dict().items():
        key.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        key.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy())
    for path, label in items:
        stat = os.stat(path)
        key.update(f"{path}\t{label}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    key.update(Path(cfg.stats).read_bytes() if cfg.stats else b"no stats")
    return key.hexdigest()


def features_for(encoder, items, key, vit_cfg, cfg, dist=ALONE, log=print, flip=False):
    """extract_features over `items`; with --cache-features saved in --out, reused while `key` matches."""
    path = Path(cfg.out) / f"features{'_flip' * flip}.pt"
    if cfg.cache_features and path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["key"] == key:
            log(f"features: reusing {path}")
            return saved["features"], saved["labels"]
    dataset = scene_dataset(items, vit_cfg, cfg, train=False)
    feats, labels = extract_features(encoder, dataset, cfg.batch_size, cfg.workers, dist, flip, log)
    if cfg.cache_features and dist.rank == 0:
        torch.save({"key": key, "features": feats, "labels": labels}, path)
    return feats, labels


# ---- linear probe and kNN ----


class LARS(torch.optim.Optimizer):
    """SGD + momentum whose step for each weight matrix is scaled by trust·‖w‖/‖g‖ (You et al., 2017);
    the MAE linear-probe optimiser. Vectors (biases) take plain SGD steps, as in the recipe."""

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


def train_linear_probe(features_of, labels_N: torch.Tensor, dim: int, num_classes: int, cfg: EvalConfig, seed: int,
                       device=torch.device("cpu"), epochs: int = 90) -> nn.Sequential:
    """Train the probe head on `features_of(indices)`, the (B, D) features of those training images. SGD by
    default, else the recipe: LARS barely moves a head trained on a few thousand images (docs/eval.md)."""
    n = len(labels_N)
    batch = min(cfg.probe_batch_size, n)
    head = make_probe_head(dim, num_classes, seed).to(device)
    peak_lr = cfg.probe_blr * batch / 256
    opt = (LARS if cfg.probe_optimizer == "lars" else torch.optim.SGD)(head.parameters(), lr=peak_lr, momentum=0.9)
    order_gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = n // batch  # drop_last, as the recipe: BatchNorm wants full batches
    total, warmup = epochs * steps_per_epoch, epochs // 9 * steps_per_epoch  # recipe: 10 of 90 epochs
    for epoch in range(epochs):
        order = torch.randperm(n, generator=order_gen)[:steps_per_epoch * batch]
        for i, idx in enumerate(order.split(batch)):
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch * steps_per_epoch + i, peak_lr, total, warmup)
            loss = F.cross_entropy(head(features_of(idx).to(device)), labels_N[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return head.eval()


def linear_probe_cached(train_feats_ND, train_labels_N, num_classes, cfg, seed, device=torch.device("cpu"), epochs=90):
    feats = train_feats_ND.to(device)
    return train_linear_probe(lambda idx: feats[idx.to(device)], train_labels_N, feats.shape[1], num_classes, cfg,
                              seed, device, epochs)


def knn_scores(train_feats_ND, train_labels_N, test_feats_MD, num_classes, k=20, temperature=0.07, chunk=1024):
    """Weighted kNN votes (M, C): cosine similarity; each of the k nearest votes exp(sim / T) for its class."""
    train = F.normalize(train_feats_ND.float(), dim=1)
    votes = []
    for test in F.normalize(test_feats_MD.float(), dim=1).split(chunk):
        sims, idx = (test @ train.T).topk(min(k, len(train)), dim=1)
        weights = (sims / temperature).exp()
        votes.append(torch.zeros(len(test), num_classes).scatter_add_(1, train_labels_N[idx], weights))
    return torch.cat(votes)


# ---- fine-tuning ----


class ViTClassifier(VisionTransformer):
    """The MAE fine-tune model: mean patch token -> LayerNorm `fc_norm` -> Linear `head`, no final `norm`. A
    VisionTransformer, so encoder weights load as they are and fsdp_setup shards its Blocks."""

    def __init__(self, cfg: ViTConfig, num_classes: int):
        super().__init__(cfg)
        self.norm = nn.Identity()
        self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.head = nn.Linear(cfg.embed_dim, num_classes)
        self.init_weights()

    def forward(self, imgs_BCHW: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc_norm(super().forward(imgs_BCHW)[:, 1:].mean(dim=1)))


def classifier_state(vit_cfg: ViTConfig, state: dict | None, num_classes: int, seed: int) -> dict:
    """A ViTClassifier's starting weights: the encoder's (random from `seed` if None) without the final
    norm, a fresh fc_norm, and the recipe's near-zero head (std 2e-5) that leaves the features intact."""
    state = build_encoder(vit_cfg, None, seed).state_dict() if state is None else state
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
    return dict(layer_decay=0.75, drop_path=0.2 if cfg.embed_dim <= 1024 else 0.3, blr=1e-3, epochs=50)


def finetune_param_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups with lr_scale = layer_decay^(depth + 1 - layer), layer 0 the embeddings, i + 1 block i,
    depth + 1 fc_norm and the head. No weight decay for biases, norms and the cls token."""
    depth = model.cfg.depth
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        no_decay = p.ndim == 1 or name == "cls_token"
        layer = (0 if name.startswith(("cls_token", "pos_embed", "patch_embed"))
                 else int(name.split(".")[1]) + 1 if name.startswith("blocks.") else depth + 1)
        group = groups.setdefault((layer, no_decay), {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                                      "lr_scale": layer_decay ** (depth + 1 - layer)})
        group["params"].append(p)
    return list(groups.values())


def finetune(model: nn.Module, train_dataset, cfg: EvalConfig, recipe: dict, seed: int, dist=ALONE,
             log=print) -> nn.Module:
    """Fine-tune a parallelized ViTClassifier: the recipe, SceneDataset's augmentation instead of mixup/RandAugment."""
    torch.manual_seed(seed + dist.rank)  # drop path draws from the global generator
    sampler = torch.utils.data.DistributedSampler(train_dataset, dist.world_size, dist.rank, seed=seed, drop_last=True)
    loader = make_loader(train_dataset, cfg.batch_size, cfg.workers, dist.device, sampler)
    global_batch = cfg.batch_size * dist.world_size
    if len(loader) == 0:
        raise ValueError(f"{len(train_dataset)} training images do not fill one step of --batch-size "
                         f"{cfg.batch_size} × {dist.world_size} processes; lower --batch-size")
    peak_lr = recipe["blr"] * global_batch / 256
    groups = finetune_param_groups(fsdp_setup.unwrap(model), cfg.weight_decay, recipe["layer_decay"])
    opt = torch.optim.AdamW(groups, lr=peak_lr, fused=True)  # betas (0.9, 0.999) as the recipe; fused as train.py
    epochs, steps_per_epoch = recipe["epochs"], len(loader)
    total, warmup = epochs * steps_per_epoch, min(cfg.warmup_epochs, epochs) * steps_per_epoch
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    model.train()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        train_dataset.set_epoch(epoch)  # fresh augmentations, from (seed, epoch, index)
        loss_sum, start = torch.zeros((), device=dist.device), time.perf_counter()
        for i, (imgs, labels) in enumerate(loader):
            lr = lr_at(epoch * steps_per_epoch + i, peak_lr, total, warmup, min_lr=1e-6)
            for group in opt.param_groups:
                group["lr"] = lr * group["lr_scale"]
            imgs, labels = imgs.to(dist.device, non_blocking=True), labels.to(dist.device, non_blocking=True)
            loss = loss_fn(model(imgs).float(), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
        log(f"finetune epoch {epoch + 1}/{epochs}: loss {loss_sum.item() / steps_per_epoch:.4f} (rank 0), "
            f"lr {lr:.2e}, {steps_per_epoch * global_batch / (time.perf_counter() - start):.0f} img/s")
    return model.eval()


# ---- running a protocol ----


def frozen_scores(cfg, vit_cfg, state, splits, dist, log):
    """knn / linprobe: (test scores, test labels) per split, on features extracted once for all images."""
    encoder = build_encoder(vit_cfg, state)
    train_items, test_items, class_names = next(iter(splits.values()))
    items = sorted((str(p), y) for p, y in train_items + test_items)  # every split re-indexes these
    row = {p: i for i, (p, _) in enumerate(items)}
    key = feature_cache_key(encoder, items, vit_cfg, cfg) if cfg.cache_features else None
    feats, labels = features_for(encoder, items, key, vit_cfg, cfg, dist, log)
    if cfg.mode == "linprobe" and cfg.probe_flip:
        flipped, _ = features_for(encoder, items, key, vit_cfg, cfg, dist, log, flip=True)
    del encoder
    for seed, (train_items, test_items, _) in splits.items():
        train, test = (torch.tensor([row[str(p)] for p, _ in split]) for split in (train_items, test_items))
        if cfg.mode == "knn":
            scores = knn_scores(feats[train], labels[train], feats[test], len(class_names), cfg.knn_k,
                                cfg.knn_temperature)
        else:
            train_feats, train_labels = feats[train], labels[train]
            if cfg.probe_flip:
                train_feats, train_labels = torch.cat([train_feats, flipped[train]]), train_labels.repeat(2)
            head = linear_probe_cached(train_feats, train_labels, len(class_names), cfg, seed, dist.device,
                                       cfg.epochs or 90)
            with torch.no_grad():
                scores = head(feats[test].to(dist.device)).float().cpu()
        yield scores, labels[test]


def finetune_scores(cfg, vit_cfg, state, splits, dist, log):
    """finetune: (test scores, test labels) per split, of a classifier fine-tuned on its training images."""
    recipe = finetune_recipe(vit_cfg)
    recipe.update({k: getattr(cfg, k) for k in recipe if getattr(cfg, k) is not None})
    log(f"finetune recipe: {recipe}, batch {cfg.batch_size} × {dist.world_size}, layout {cfg.strategy}")
    for seed, (train_items, test_items, class_names) in splits.items():
        model_cfg = replace(vit_cfg, drop_path=recipe["drop_path"])
        model = build_classifier(model_cfg, state, len(class_names), cfg, seed, dist.rank)
        finetune(model, scene_dataset(train_items, vit_cfg, cfg, train=True, seed=seed), cfg, recipe, seed, dist, log)
        test = scene_dataset(test_items, vit_cfg, cfg, train=False)
        yield predict(model, test, cfg.batch_size, cfg.workers, dist, log, "test")
        del model


def validate(cfg: EvalConfig) -> None:
    """Flag errors, before any file is read."""
    if cfg.mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")
    if cfg.probe_optimizer not in ("sgd", "lars"):
        raise ValueError(f"--probe-optimizer must be sgd or lars, got {cfg.probe_optimizer!r}")
    if cfg.train_ratio is not None and not 0.0 < cfg.train_ratio < 1.0:
        raise ValueError(f"--train-ratio must be in (0, 1), e.g. 0.2 for AID's 20% protocol; got {cfg.train_ratio}")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ValueError(f"--seed needs one or more distinct values, got {cfg.seeds}")
    for name in ("batch_size", "probe_batch_size", "knn_k") + (("epochs",) if cfg.epochs is not None else ()):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.model is not None and cfg.model not in CONFIGS:
        raise ValueError(f"--model {cfg.model!r} is unknown; choose one of: {', '.join(CONFIGS)}")


def setup(cfg: EvalConfig, log=print) -> tuple:
    """(ViTConfig, encoder state or None, its description, {seed: split}), checked against flags and each other."""
    vit_cfg, state, source = load_encoder(cfg.encoder, cfg.model, cfg.in_chans, cfg.img_size, log)
    splits = {seed: scenes.scene_splits(cfg.data, cfg.train_ratio, seed) for seed in cfg.seeds}
    check_scene_data(splits, vit_cfg, cfg, source, log)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    return vit_cfg, state, source, splits


def run(cfg: EvalConfig, log=print) -> dict:
    """Evaluate one encoder on one dataset for every seed; writes --out (rank 0) and returns results.json's dict."""
    validate(cfg)
    dist = fsdp_setup.init_distributed()  # a world of one without torchrun/srun
    try:
        log = log if dist.rank == 0 else (lambda *a, **k: None)
        cfg = replace(cfg, mixed_precision=fsdp_setup.resolve_mixed_precision(cfg.mixed_precision, dist.device))
        if cfg.mode == "finetune":
            fsdp_setup.validate_layout(cfg.strategy, cfg.shard_group_size, dist.world_size, cfg.mixed_precision,
                                       device=dist.device)
        vit_cfg, state, source, splits = fsdp_setup.on_every_rank(lambda: setup(cfg, log), dist)
        class_names = next(iter(splits.values()))[2]
        log(f"{cfg.mode}: encoder {source}, {len(class_names)} classes in {cfg.data}, "
            f"{dist.world_size} × {dist.device}")
        protocol = finetune_scores if cfg.mode == "finetune" else frozen_scores
        try:
            scored = list(protocol(cfg, vit_cfg, state, splits, dist, log))  # (test scores, test labels) per seed
        except Exception as err:  # e.g. a corrupt image in this rank's share
            if dist.world_size == 1:
                raise
            # The other ranks wait for this one in a collective it will never join: end the process
            # and let torchrun (or srun --kill-on-bad-exit=1) stop them.
            user_error = isinstance(err, (ValueError, FileNotFoundError))
            fsdp_setup.exit_rank_failed(dist.rank, data.error_message(err) if user_error else None)
        runs = [{"seed": seed, "num_train": len(train), "num_test": len(test), "split_id": scenes.split_id(train),
                 **scenes.classification_metrics(scores, labels, class_names)}
                for (seed, (train, test, _)), (scores, labels) in zip(splits.items(), scored)]
        # top5_k: below 5 classes "top-5" is top-C, 100% by construction.
        results = {"mode": cfg.mode, "encoder": source, "data": cfg.data,
                   "train_ratio": scenes.default_train_ratio(cfg.data, cfg.train_ratio), **scenes.summarize(runs),
                   "top5_k": min(5, len(class_names)), "num_train": runs[0]["num_train"],
                   "num_test": runs[0]["num_test"], "seeds": cfg.seeds, "class_names": class_names,
                   "vit_config": asdict(vit_cfg), "runs": runs, "config": asdict(cfg)}
        if dist.rank == 0:
            for r in runs:
                scenes.save_confusion(r["confusion"], class_names, Path(cfg.out) / f"confusion_seed{r['seed']}")
            (Path(cfg.out) / "results.json").write_text(json.dumps(results, indent=1))
            scenes.report(results, log)
        return results
    finally:
        fsdp_setup.cleanup()


def parse_args(argv=None) -> EvalConfig:
    d = EvalConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("mode", choices=MODES, help="knn: quick, no training; linprobe: the paper's; finetune: all weights")
    p.add_argument("--encoder", required=True, help="encoder .pt (`checkpoint.py export`, or an official MAE/timm "
                   "ViT with --model), a training run folder, or 'random'")
    p.add_argument("--data", required=True, help="a folder of class subfolders of images, or of train.txt + "
                   "val.txt ('relative/path label' lines), or that train.txt")
    p.add_argument("--train-ratio", type=float, help="training fraction per class (UCM 0.5/0.8, AID 0.2/0.5, "
                   "NWPU 0.1/0.2); default: the list files' split, else 0.8")
    p.add_argument("--seed", dest="seeds", type=int, nargs="+", default=d.seeds,
                   help="one run per seed (split, head); reports mean ± std")
    p.add_argument("--out", default=d.out, help="output folder: results.json, confusion_seed*.csv/png, features*.pt")
    p.add_argument("--model", help=f"architecture for 'random' and files without vit_config: {', '.join(CONFIGS)}")
    p.add_argument("--in-chans", type=int, help="input bands, for files without vit_config")
    p.add_argument("--img-size", type=int, help="input size in pixels, for files without vit_config")
    p.add_argument("--bands", help="comma-separated 0-based bands to read, e.g. 3,2,1 (as train.py)")
    p.add_argument("--stats", help="per-band mean/std JSON (`python data.py stats`); 3-band uint8: ImageNet's")
    p.add_argument("--epochs", type=int, help="default: 90 (linprobe); 100 for B and smaller, 50 for L+ (finetune)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step per process")
    p.add_argument("--workers", type=int, default=d.workers, help="data-loading processes per process")
    p.add_argument("--cache-features", action="store_true", help="save frozen features in --out; reuse them "
                   "when encoder, images and stats match")
    p.add_argument("--probe-batch-size", type=int, default=d.probe_batch_size, help="linprobe: head batch")
    p.add_argument("--probe-optimizer", choices=("sgd", "lars"), default=d.probe_optimizer,
                   help="linprobe: lars is the recipe's, for MillionAID sizes")
    p.add_argument("--probe-blr", type=float, default=d.probe_blr, help="linprobe: base lr, lr = blr * batch / 256")
    p.add_argument("--probe-flip", action="store_true", help="linprobe: also train on flipped training images")
    p.add_argument("--knn-k", type=int, default=d.knn_k, help="knn: neighbours that vote")
    p.add_argument("--knn-temperature", type=float, default=d.knn_temperature, help="knn: vote weight exp(cos / T)")
    p.add_argument("--blr", type=float, help="finetune: lr = blr * batch * processes / 256; default 5e-4 (B), "
                   "1e-3 (L and up)")
    p.add_argument("--layer-decay", type=float, help="finetune: layer-wise lr decay; default 0.65 (B), 0.75 (L+)")
    p.add_argument("--drop-path", type=float, help="finetune: stochastic depth; default 0.1 (B), 0.2 (L), 0.3 (H+)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="finetune: AdamW weight decay")
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help="finetune: label smoothing")
    p.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs, help="finetune: linear warmup epochs")
    p.add_argument("--strategy", choices=fsdp_setup.STRATEGIES, default=d.strategy,
                   help="finetune: layout across the processes, as in training")
    p.add_argument("--shard-group-size", type=int, help="finetune: GPUs sharding one replica (hybrid_shard)")
    p.add_argument("--mixed-precision", choices=("auto", *fsdp_setup.PRECISIONS), default=d.mixed_precision,
                   help="finetune: auto is bf16 on GPU, fp32 on CPU")
    args = vars(p.parse_args(argv))
    return EvalConfig(**{**args, "bands": parse_band_map(args["bands"], "--bands")})


def main(argv=None) -> int:
    """`python eval.py`: a user error prints `error: <message>` on rank 0 and exits 2, as train.py does."""
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
