"""train.py — MAE pretraining of a ViT, from a one-minute CPU demo to a thousand GPUs, with exact resume.

    python train.py                 # the demo: a tiny ViT MAE on generated 4-band chips, ~1 min on 2 CPU cores
    torchrun --standalone --nproc_per_node=8 train.py --model vit_3b --data /data/millionaid \
        --strategy hybrid_shard --shard-group-size 1 --batch-size 32 --epochs 800 --out runs/vit3b --resume
    srun -N128 --ntasks-per-node=8 -c7 --gpus-per-task=1 --gpu-bind=closest --signal=USR1@180 --kill-on-bad-exit=1 \
        python train.py --model vit_5b --data /data/millionaid --strategy hybrid_shard --shard-group-size 8 \
        --batch-size 32 --epochs 800 --out runs/vit5b --resume
    python checkpoint.py export --ckpt runs/vit3b --out vit3b_encoder.pt   # the encoder, for eval.py

A straight line, like nanoGPT: flags -> process group -> run folder and data -> model -> optimizer -> loop
(data, step, log, save, stop). fsdp_setup.py holds everything distributed, data.py the images, checkpoint.py
the run folder; one CPU process and a thousand GPUs run the same code. The recipe, the run folder, resume,
signals and exit codes: README.md, "Pretraining".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as tdist

import checkpoint
import data
import fsdp_setup
from fsdp_setup import on_every_rank
from mae import MaskedAutoencoder, save_reconstruction_png
from metrics import Meter
from vit import SDPA_CHOICES, apply_sdpa_choice, get_config
from weights import load_init_weights, parse_band_map

SYNTHETIC_IMAGES = 1_000_000  # `--data synthetic`: MillionAID-sized, generated on the fly


# --- Config and flags -------------------------------------------------------------------------


@dataclass
class TrainConfig:
    # model
    model: str = "vit_base"
    img_size: int | None = None  # None: the model's (224)
    in_chans: int | None = None  # None: from the data (3 for synthetic)
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    init: str | None = None  # official-layout MAE/ViT .pth to start from
    init_rgb_bands: str | None = None  # bands receiving the --init file's red,green,blue kernels; None: 0,1,2
    # data
    data: str = "demo"  # folder, manifest, "synthetic" or "demo"
    bands: str | None = None  # "3,2,1,7": 0-based bands to read; None: all
    stats: str | None = None  # None: <data>/stats.json if present
    chips_per_scene: int = 1  # crops per file per epoch (an epoch is files x chips_per_scene crops)
    crop_size: int = 512  # side of the random window cut from a bigger file before RandomResizedCrop
    max_nodata: float = 0.5  # a crop with a larger fraction of nodata/NaN values is drawn again
    workers: int = 8
    threads: int = 0  # 0: torch's default
    # schedule (epochs/steps, blr/lr, warmup_epochs/warmup_steps are alternatives; None: the recipe's)
    batch_size: int = 32  # per GPU per optimizer step (the paper's local batch)
    accum_steps: int = 1
    epochs: float | None = None
    steps: int | None = None
    blr: float | None = None
    lr: float | None = None
    warmup_epochs: float | None = None
    warmup_steps: int | None = None
    weight_decay: float = 0.05
    clip_grad: float | None = None
    seed: int = 0
    # parallelism (fsdp_setup.py)
    strategy: str = "full_shard"
    shard_group_size: int | None = None
    mixed_precision: str = "auto"
    ac: str = "none"
    compile: bool = False
    sdpa: str = "auto"
    cpu_offload: bool = False
    # run folder, checkpoints, logging
    out: str | None = None  # None: runs/demo or runs/<model>
    resume: bool = False
    ckpt_every: int = 1000
    keep: int = 3
    max_steps_per_run: int | None = None
    log_every: int = 10
    recon_every: int | None = None  # None: with each checkpoint; 0: never
    rgb_bands: str | None = None  # None: 0,1,2 (0 for 1-2 bands)
    peak_tflops: float | None = None  # None: from the device name


def demo_config() -> TrainConfig:
    """`python train.py` without --data: a 4-band 64 px sample, a ViT-Tiny with a small decoder, and an lr high
    enough that the loss falls visibly within about a minute on 2 CPU cores. One compute thread and one loader
    process: a model this small gains nothing from a second thread, and threads competing for 2 cores stall badly."""
    return TrainConfig(
        model="vit_tiny", img_size=64, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4, data="demo",
        batch_size=32, steps=800, lr=1.5e-3, warmup_steps=40, ckpt_every=800, log_every=50, threads=1, workers=1,
        rgb_bands="2,1,0",  # near-infrared, green, blue of the sample: vegetation shows red (false colour)
    )


ALTERNATIVES = {  # exclusive pairs of flags, with their help
    ("epochs", "steps"): ("run length in epochs (default 800)", "run length in optimizer steps"),
    ("blr", "lr"): ("base lr: lr = blr x global batch / 256 (default 1.5e-4)", "absolute peak lr"),
    ("warmup_epochs", "warmup_steps"): ("linear warmup in epochs (default 40)", "linear warmup in steps"),
}


def build_parser() -> argparse.ArgumentParser:
    # SUPPRESS: the namespace holds only the flags given, so that the demo's settings or the
    # dataclass's fill in the rest, and an alternative given replaces the other's default.
    p = argparse.ArgumentParser(description="MAE pretraining of a ViT. Without --data: the built-in CPU demo.",
                                argument_default=argparse.SUPPRESS)
    default, demo = TrainConfig(), demo_config()

    def add(flag: str, help: str, to=p, **kwargs):
        dest = kwargs.get("dest", flag[2:].replace("-", "_"))
        value, demo_value = getattr(default, dest), getattr(demo, dest)
        # Defaults come from the dataclasses alone; --help shows them (a None default is explained in the help).
        notes = [f"default: {value}"] * (value is not None) + [f"demo: {demo_value}"] * (demo_value != value)
        if notes and "action" not in kwargs:
            help += f" [{'; '.join(notes)}]"
        to.add_argument(flag, help=help, **kwargs)

    add("--model", help="vit_tiny, vit_small, vit_base, vit_large, vit_huge, vit_1b, vit_3b, vit_5b, vit_e, vit_15b")
    add("--img-size", type=int, help="input side in pixels (default: the model's, 224)")
    add("--in-chans", type=int, help="bands the model sees; checked against the data (default: the data's)")
    add("--decoder-embed-dim", type=int, help="MAE decoder width")
    add("--decoder-depth", type=int, help="MAE decoder blocks")
    add("--decoder-num-heads", type=int, help="MAE decoder attention heads")
    add("--mask-ratio", type=float, help="fraction of patches removed, in (0, 1)")
    add("--no-norm-pix-loss", dest="norm_pix_loss", action="store_false", help="plain pixel targets")
    add("--init", help="start from an official-layout MAE/ViT checkpoint (.pth), e.g. ImageNet MAE weights")
    add("--init-rgb-bands", help="0-based bands (of those the model sees) that take --init's red,green,blue "
        "kernels (default 0,1,2); the other bands start from their mean, all scaled by 3/bands")
    add("--data", help="image folder, manifest file, 'synthetic', or 'demo' (generated sample chips)")
    add("--bands", help="comma-separated 0-based bands to read, e.g. 3,2,1,7 (default: all)")
    add("--stats", help="per-band statistics from `python data.py stats` (default: <data>/stats.json)")
    add("--chips-per-scene", type=int, help="random crops per file per epoch, for folders of whole scenes; an "
        "epoch is files x this many crops (1: chip folders)")
    add("--crop-size", type=int, help="side of the random window read from a bigger file before RandomResizedCrop")
    add("--max-nodata", type=float, help="redraw a crop with more than this fraction of nodata/NaN values, "
        "up to 8 draws (1 keeps all)")
    add("--workers", type=int, help="DataLoader worker processes per rank")
    add("--threads", type=int, help="CPU threads of torch's own kernels (0: torch's default)")
    add("--batch-size", type=int, help="images per GPU per optimizer step")
    add("--accum-steps", type=int, help="split --batch-size into this many micro-batches")
    for (a, b), (help_a, help_b) in ALTERNATIVES.items():
        group = p.add_mutually_exclusive_group()
        add(f"--{a.replace('_', '-')}", help_a, to=group, type=float)
        add(f"--{b.replace('_', '-')}", help_b, to=group, type=int if "steps" in b else float)
    add("--weight-decay", type=float, help="AdamW weight decay (none on biases, norms, tokens)")
    add("--clip-grad", type=float, help="clip the global gradient norm to this (MAE pretraining does not)")
    add("--seed", type=int, help="seed of the init, data order, augmentations and masks")
    add("--strategy", help="full_shard | shard_grad_op | hybrid_shard | no_shard | ddp")
    add("--shard-group-size", type=int, help="GPUs sharding one replica (hybrid_shard only)")
    add("--mixed-precision", help="auto (bf16 on GPU, fp32 on CPU) | bf16 | bf16-reduce | fp32")
    add("--ac", help="activation checkpointing: none | full | k (every k-th block)")
    add("--compile", action="store_true", help="torch.compile each transformer block")
    add("--sdpa", help="attention kernel: auto | flash | efficient | cudnn | math (tools/bench.py sdpa times them)")
    add("--cpu-offload", action="store_true", help="FSDP2 CPU offload of params, grads and AdamW state (not ddp)")
    add("--out", help="run folder (default runs/demo for the demo, else runs/<model>)")
    add("--resume", action="store_true", help="continue from the newest loadable checkpoint in --out")
    add("--ckpt-every", type=int, help="checkpoint every N steps (and at the end and on SIGTERM/SIGUSR1; 0: only then)")
    add("--keep", type=int, help="checkpoints (and reconstruction pictures) kept in --out")
    add("--max-steps-per-run", type=int, help="stop cleanly, with a checkpoint, after N steps of this run")
    add("--log-every", type=int, help="one log line and metrics.jsonl record every N steps")
    add("--recon-every", type=int, help="reconstruction PNG every N steps (default: with each checkpoint; 0: never)")
    add("--rgb-bands", help="bands shown as red,green,blue in the reconstruction PNG, or one as grey")
    add("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s per GPU for MFU (default: from the device name)")
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    given = vars(build_parser().parse_args(argv))
    base = demo_config() if given.get("data", "demo") == "demo" else TrainConfig()
    for a, b in ALTERNATIVES:  # the one given replaces the other's default
        if a in given or b in given:
            base = dataclasses.replace(base, **{b if a in given else a: None})
    return dataclasses.replace(base, **given)


POSITIVE = ("img_size", "in_chans", "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "batch_size",
            "accum_steps", "epochs", "steps", "blr", "lr", "clip_grad", "keep", "max_steps_per_run", "log_every",
            "peak_tflops")
NON_NEGATIVE = ("workers", "threads", "warmup_epochs", "warmup_steps", "weight_decay", "seed", "ckpt_every",
                "recon_every")


def validate(cfg: TrainConfig, world_size: int, device: torch.device) -> None:
    """Every user error that needs no data and no memory, as a ValueError naming the flag."""
    for names, ok, rule in ((POSITIVE, lambda v: v > 0, "positive"), (NON_NEGATIVE, lambda v: v >= 0, ">= 0")):
        for name in names:
            value = getattr(cfg, name)
            if value is not None and not ok(value):  # `not ok`: NaN fails too
                raise ValueError(f"--{name.replace('_', '-')} must be {rule}, got {value}")
    if not 0 < cfg.mask_ratio < 1:  # `not`: NaN fails too
        raise ValueError(f"--mask-ratio must be in (0, 1), got {cfg.mask_ratio}")
    if cfg.batch_size % cfg.accum_steps:
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of --accum-steps {cfg.accum_steps} "
                         "(the per-GPU batch is split into equal micro-batches)")
    with torch.device("meta"):  # unknown model, image vs patch size, decoder width vs heads: no memory
        num_patches = build_mae(cfg).cfg.num_patches
    if not 0 < int(num_patches * (1 - cfg.mask_ratio)) < num_patches:
        raise ValueError(f"--mask-ratio {cfg.mask_ratio} must remove some and keep some of the {num_patches} patches")
    if cfg.sdpa not in SDPA_CHOICES:
        raise ValueError(f"--sdpa must be one of {', '.join(SDPA_CHOICES)}, got {cfg.sdpa!r}")
    if cfg.sdpa == "cudnn" and torch.version.hip:  # ROCm builds have flash and efficient (AOTriton), no cuDNN
        raise ValueError("--sdpa cudnn does not exist on ROCm; use auto, flash, efficient or math")
    band_flags = (("--bands", cfg.bands), ("--rgb-bands", cfg.rgb_bands), ("--init-rgb-bands", cfg.init_rgb_bands))
    for flag, text in band_flags:
        if any(b < 0 for b in parse_band_map(text, flag) or []):
            raise ValueError(f"{flag} {text}: band indices are 0-based and not negative")
    if cfg.rgb_bands is not None and len(parse_band_map(cfg.rgb_bands, "--rgb-bands")) not in (1, 3):
        raise ValueError(f"--rgb-bands {cfg.rgb_bands}: give three bands (red,green,blue) or one (grey)")
    if cfg.init_rgb_bands is not None and cfg.init is None:
        raise ValueError("--init-rgb-bands says where --init's red, green and blue go; it needs --init")
    if cfg.data not in ("demo", "synthetic") and not os.path.exists(cfg.data):
        raise ValueError(f"--data {cfg.data}: no such folder or manifest file (or use --data synthetic / demo)")
    for name in ("init", "stats"):
        path = getattr(cfg, name)
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"--{name} {path}: no such file")
    precision = fsdp_setup.resolve_mixed_precision(cfg.mixed_precision, device)
    fsdp_setup.validate_layout(cfg.strategy, cfg.shard_group_size, world_size, precision, cfg.ac, device,
                               cfg.cpu_offload)


# --- Model, optimizer, schedule, one step (tools/bench.py times these same functions) ----------


def build_mae(cfg: TrainConfig) -> MaskedAutoencoder:
    """The MAE of these flags, in the caller's device context (meta: no memory, any size)."""
    overrides = {k: v for k, v in (("img_size", cfg.img_size), ("in_chans", cfg.in_chans)) if v is not None}
    return MaskedAutoencoder(get_config(cfg.model, **overrides), cfg.decoder_embed_dim, cfg.decoder_depth,
                             cfg.decoder_num_heads, cfg.norm_pix_loss)


def build_model(cfg: TrainConfig, dist: fsdp_setup.Dist) -> torch.nn.Module:
    """The MAE built on the meta device, then sharded, materialised and initialised per shard by
    fsdp_setup; `--init` weights are loaded after that."""
    with torch.device("meta"):
        model = build_mae(cfg)
    precision = fsdp_setup.resolve_mixed_precision(cfg.mixed_precision, dist.device)
    model = fsdp_setup.parallelize(model, cfg.strategy, cfg.shard_group_size, precision, cfg.ac, cfg.compile,
                                   seed=cfg.seed, cpu_offload=cfg.cpu_offload)
    if cfg.init:
        with torch.device("meta"):
            shapes = build_mae(cfg)
        load_init_weights(model, shapes, cfg.init, cfg.init_rgb_bands, dist, cfg.cpu_offload)
    return model


ADAMW_IMPLEMENTATIONS = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for-loop": dict(foreach=False)}


def build_optimizer(model: torch.nn.Module, weight_decay: float, implementation: str = "fused") -> torch.optim.AdamW:
    """AdamW β=(0.9, 0.95), as MAE; no weight decay on biases, norm weights (1-D) and the cls/mask
    tokens. Fused on every device: with FSDP2 one DTensor dispatch per parameter group instead of a
    dozen per parameter (3-4x less host time per step on a 2-core CPU; BENCHMARKS.md)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            skip = param.ndim <= 1 or name.endswith(("cls_token", "mask_token"))
            (no_decay if skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.95), **ADAMW_IMPLEMENTATIONS[implementation])


def lr_at(step: int, peak_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0) -> float:
    """MAE's per-iteration schedule: linear warmup from 0, then a half-cycle cosine to `min_lr`."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_step(model, optimizer, micro_batches, *, lr: float, mask_ratio: float, clip_grad: float | None = None,
               mask_generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over this rank's micro-batches. Returns (global-batch mean loss, gradient
    norm before clipping), both still on the device: no host sync. `mask_generator` draws the
    masking noise, so that it can be checkpointed apart from any other use of the RNG."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=micro_batches[0].device)
    for i, imgs in enumerate(micro_batches):
        # Reduce gradients only once per step: non-final micro-steps just accumulate locally.
        fsdp_setup.set_grad_sync(model, i == len(micro_batches) - 1)
        noise = None
        if mask_generator is not None:
            num_patches = fsdp_setup.unwrap(model).cfg.num_patches
            noise = torch.rand(imgs.shape[0], num_patches, generator=mask_generator, device=imgs.device)
        loss, _, _ = model(imgs, mask_ratio=mask_ratio, noise=noise)
        (loss / len(micro_batches)).backward()
        loss_sum += loss.detach()
    grad_norm = fsdp_setup.clip_grad_norm_(model, clip_grad or math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss = loss_sum / len(micro_batches)
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(loss)  # SUM (gloo has no AVG); ranks hold equal-sized batches
        loss = loss / tdist.get_world_size()
    return loss, grad_norm


# --- The data and the schedule -------------------------------------------------------------------


def build_data(cfg: TrainConfig, dist, out: Path):
    """(dataset, display stats (mean, std) per band or None, number of bands). Fails early, on the
    main process before any worker starts, on a bad folder, band selection or stats file."""
    if cfg.data == "synthetic":
        in_chans = cfg.in_chans or 3
        return data.SyntheticDataset(SYNTHETIC_IMAGES, in_chans, cfg.img_size, cfg.seed), None, in_chans
    source, stats = cfg.data, cfg.stats
    if cfg.data == "demo":  # setup_run wrote the sample
        source = str(out / "sample-chips")
        stats = os.path.join(source, "stats.json")
    elif stats is None and os.path.isfile(os.path.join(cfg.data, "stats.json")):
        stats = os.path.join(cfg.data, "stats.json")
    bands = parse_band_map(cfg.bands, "--bands")
    data_cfg = data.PretrainDataConfig(img_size=cfg.img_size, bands=bands, in_chans=cfg.in_chans, stats=stats,
                                       crop_size=cfg.crop_size, chips_per_scene=cfg.chips_per_scene,
                                       max_nodata=cfg.max_nodata)
    dataset = data.PretrainDataset(source, data_cfg, seed=cfg.seed)
    in_chans = dataset[0].shape[0]  # reads one image: a wrong band selection or stats file fails here
    if cfg.rgb_bands and max(parse_band_map(cfg.rgb_bands, "--rgb-bands")) >= in_chans:
        raise ValueError(f"--rgb-bands {cfg.rgb_bands}: the data has {in_chans} bands (0-based indices)")
    info = data.open_image(dataset.paths[0]).info  # the picture undoes exactly the normalisation applied
    mean, std = dataset.normalize.band_stats(dataset.paths[0], info.bands, bands, info.dtype)
    return dataset, (torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)), in_chans


def resolve_schedule(cfg: TrainConfig, num_images: int, steps_per_epoch: int, global_batch: int) -> TrainConfig:
    """Fill in steps, warmup_steps and lr from epochs / blr and the data; check they make sense."""
    if steps_per_epoch < 1:
        raise ValueError(f"the data has {num_images} images, fewer than one global batch ({global_batch} = world "
                         "size x --batch-size); use a smaller --batch-size or more data")
    steps = cfg.steps or round((cfg.epochs or 800) * steps_per_epoch)
    # `is None`, not `or`: --warmup-epochs 0 asks for no warmup, not the recipe's 40 epochs.
    warmup_epochs = 40 if cfg.warmup_epochs is None else cfg.warmup_epochs
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(warmup_epochs * steps_per_epoch)
    if warmup >= steps:
        raise ValueError(f"warmup ({warmup} steps) is not shorter than the run ({steps} steps, {steps_per_epoch} "
                         "steps/epoch); pass a smaller --warmup-epochs or --warmup-steps")
    lr = cfg.lr if cfg.lr is not None else (cfg.blr or 1.5e-4) * global_batch / 256
    return dataclasses.replace(cfg, steps=steps, warmup_steps=warmup, lr=lr)


def setup_run(cfg: TrainConfig, dist):
    """Every user error before heavy work, on every rank alike: flags, run folder, data, schedule.
    Returns (resolved config, run folder, checkpoint to resume or None, dataset, display stats)."""
    on_every_rank(lambda: validate(cfg, dist.world_size, dist.device), dist)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out, previous = checkpoint.prepare_run_folder(cfg, dist)
    cfg = dataclasses.replace(cfg, img_size=cfg.img_size or get_config(cfg.model).img_size, out=str(out),
                              mixed_precision=fsdp_setup.resolve_mixed_precision(cfg.mixed_precision, dist.device))
    if cfg.data == "demo":  # rank 0 writes the sample once; on_every_rank's agreement is the barrier after it
        sample = out / "sample-chips"
        on_every_rank(lambda: dist.is_main and not (sample / "stats.json").is_file()
                      and data.make_demo_chips(str(sample), n=256), dist)
    dataset, pixel_stats, in_chans = on_every_rank(lambda: build_data(cfg, dist, out), dist)
    cfg = dataclasses.replace(cfg, in_chans=in_chans, rgb_bands=cfg.rgb_bands or ("0,1,2" if in_chans >= 3 else "0"))
    steps_per_epoch = len(dataset) // dist.world_size // cfg.batch_size
    global_batch = cfg.batch_size * dist.world_size
    cfg = on_every_rank(lambda: resolve_schedule(cfg, len(dataset), steps_per_epoch, global_batch), dist)
    if dist.is_main:
        config = {**dataclasses.asdict(cfg), "world_size": dist.world_size}
        checkpoint.write_atomic(out / "config.json", json.dumps(config, indent=1))
    return cfg, out, previous, dataset, pixel_stats


# --- The loop ---------------------------------------------------------------------------------


@dataclass
class Progress:
    """Where the run is: with the weights, optimizer and RNG states, all that a resume needs."""
    step: int = 0  # optimizer steps done
    epoch: int = 0
    # Samples this rank has trained on in the epoch. Counted here, not read from the sampler:
    # behind a DataLoader the sampler runs ahead by the prefetched batches.
    epoch_index: int = 0


def step_batches(loader, sampler, dataset, progress: Progress, cfg: TrainConfig, device):
    """The micro-batches of one optimizer step after another, epoch after epoch, from `progress` on
    (the loop advances it). Augmentations come from (seed, epoch, index): the same after a resume."""
    while True:
        sampler.load_state_dict({"epoch": progress.epoch, "index": progress.epoch_index})
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(progress.epoch)
        batches = iter(loader)
        while progress.epoch_index + cfg.batch_size <= sampler.num_samples:
            yield [next(batches).to(device, non_blocking=True) for _ in range(cfg.accum_steps)]
        progress.epoch, progress.epoch_index = progress.epoch + 1, 0


def train(cfg: TrainConfig, dist: fsdp_setup.Dist) -> int:
    cfg, out, previous, dataset, pixel_stats = setup_run(cfg, dist)
    apply_sdpa_choice(cfg.sdpa)  # always: "auto" undoes an earlier run's choice in the same process
    model = build_model(cfg, dist)
    optimizer = build_optimizer(model, cfg.weight_decay)
    mask_generator = torch.Generator(dist.device).manual_seed(cfg.seed * 1_000_003 + dist.rank)
    progress = resume(previous, cfg, model, optimizer, dist, mask_generator) if previous else Progress()
    meter = Meter(cfg, dist, model, len(dataset), progress.step)
    if dist.is_main:
        checkpoint.trim_metrics(out / "metrics.jsonl", progress.step)
    sampler = data.ResumableDistributedSampler(len(dataset), dist.rank, dist.world_size, seed=cfg.seed)
    loader = data.make_loader(dataset, cfg.batch_size // cfg.accum_steps, sampler, workers=cfg.workers)
    recon_imgs = torch.stack([dataset[i] for i in range(min(4, len(dataset)))]).to(dist.device)
    batches = step_batches(loader, sampler, dataset, progress, cfg, dist.device)
    first_step, last_saved, stop = progress.step, previous, fsdp_setup.StopRequest(dist)
    reason = "done" if progress.step >= cfg.steps else None
    try:
        while reason is None:
            micro_batches = meter.timed_data(batches)
            lr = lr_at(progress.step, cfg.lr, cfg.steps, cfg.warmup_steps)
            loss, grad_norm = train_step(model, optimizer, micro_batches, lr=lr, mask_ratio=cfg.mask_ratio,
                                         clip_grad=cfg.clip_grad, mask_generator=mask_generator)
            progress.step, progress.epoch_index = progress.step + 1, progress.epoch_index + cfg.batch_size
            meter.add(progress.step, lr, loss, grad_norm)
            reason = should_stop(progress.step, first_step, cfg, stop)
            save_now, draw_now = should_save(progress.step, cfg, reason), should_draw(progress.step, cfg, reason)
            if not (save_now or draw_now or progress.step % cfg.log_every == 0):
                continue
            # A sync point: check the losses (and, before a save, the weights), log, draw, save.
            record = meter.close(progress, sampler.num_samples)
            check_finite(record, model, dist, save_now, last_saved)
            meter.log(record, out)
            if draw_now:
                save_reconstruction(model, recon_imgs, pixel_stats, cfg, out / f"recon-step-{progress.step}.png", dist)
            if save_now:
                train_state = {**dataclasses.asdict(progress), "world_size": dist.world_size, "loss": record["loss"],
                               "vit_config": dataclasses.asdict(fsdp_setup.unwrap(model).cfg),
                               "config": dataclasses.asdict(cfg)}
                last_saved = checkpoint.save_checkpoint(out, model, optimizer, train_state, dist, mask_generator,
                                                        cfg.keep)
                log(dist, f"checkpoint: {last_saved}")
            meter.restart(progress.step)  # after the save: its time is not training time
    finally:
        stop.restore()
    if reason == "signal":
        log(dist, f"received {stop.signal_name or 'a stop signal on another rank'}: saved {last_saved}; "
                  "rerun with --resume to continue")
    elif reason == "max-steps-per-run":
        log(dist, f"stopped after {progress.step - first_step} steps (--max-steps-per-run): saved {last_saved}; "
                  "rerun with --resume")
    else:
        picture = out / f"recon-step-{cfg.steps}.png"
        log(dist, f"finished {cfg.steps} steps. Run folder {out}: config.json, metrics.jsonl, checkpoint {last_saved}"
                  + (f", reconstruction {picture}" if progress.step > first_step and picture.is_file() else ""))
    return 0


def should_stop(step: int, first_step: int, cfg: TrainConfig, stop: fsdp_setup.StopRequest) -> str | None:
    if stop.agreed():  # one collective per step: every rank stops at the same step
        return "signal"
    if step >= cfg.steps:
        return "done"
    if cfg.max_steps_per_run and step - first_step >= cfg.max_steps_per_run:
        return "max-steps-per-run"
    return None


def should_save(step: int, cfg: TrainConfig, reason: str | None) -> bool:
    return reason is not None or bool(cfg.ckpt_every and step % cfg.ckpt_every == 0)


def should_draw(step: int, cfg: TrainConfig, reason: str | None) -> bool:
    if cfg.recon_every is None:  # default: a picture with every checkpoint
        return should_save(step, cfg, reason)
    return cfg.recon_every != 0 and (reason == "done" or step % cfg.recon_every == 0)


def check_finite(record: dict, model, dist, save_now: bool, last_saved: Path | None) -> None:
    """Stop on a non-finite loss, or non-finite weights before a save: a checkpoint never holds NaN."""
    bad_step = record.pop("first_bad_step")
    what = "loss"
    if bad_step is None and save_now and not checkpoint.params_finite(model, dist):
        bad_step, what = record["step"], "weights"
    if bad_step is not None:
        raise TrainingDiverged(
            f"{what} not finite at step {bad_step}; stopping without writing a checkpoint. Last good checkpoint: "
            f"{last_saved or 'none (this run saved none)'}. Resume from it with a lower --lr/--blr, a longer "
            "warmup or --clip-grad.")


def resume(previous: Path, cfg: TrainConfig, model, optimizer, dist, mask_generator) -> Progress:
    on_every_rank(lambda: checkpoint.check_resumable(previous, cfg, fsdp_setup.unwrap(model)), dist)
    state = checkpoint.load_checkpoint(previous, model, optimizer, dist, mask_generator, verified=True)
    progress = Progress(state["step"], state["epoch"], state["epoch_index"])
    if state["world_size"] != dist.world_size:
        log(dist, f"warning: {previous.name} was written by {state['world_size']} ranks, this run has "
                  f"{dist.world_size}: model and optimizer are resharded, but the data order and the masks cannot "
                  "continue exactly; the sampler restarts at the next epoch boundary and masks are reseeded")
        if progress.epoch_index:
            progress.epoch, progress.epoch_index = progress.epoch + 1, 0
        mask_generator.manual_seed(cfg.seed * 1_000_003 + dist.rank + 7919 * progress.step)
    log(dist, f"resume: {previous} (step {progress.step}, epoch {progress.epoch})")
    return progress


@torch.no_grad()
def save_reconstruction(model, imgs, pixel_stats, cfg: TrainConfig, path: Path, dist) -> None:
    """Every rank runs the forward (FSDP all-gathers need all of them), with noise from its own
    seeded generator so that the training masks are not disturbed; rank 0 draws the picture."""
    mae = fsdp_setup.unwrap(model)
    generator = torch.Generator(imgs.device).manual_seed(cfg.seed)
    noise = torch.rand(imgs.shape[0], mae.cfg.num_patches, generator=generator, device=imgs.device)
    _, pred, mask = model(imgs, mask_ratio=cfg.mask_ratio, noise=noise)
    if dist.is_main:
        save_reconstruction_png(mae, imgs, pred, mask, path, parse_band_map(cfg.rgb_bands, "--rgb-bands"), pixel_stats)


class TrainingDiverged(RuntimeError):
    pass


def log(dist, message: str) -> None:
    if dist.is_main:
        print(message, flush=True)


# --- Entry points -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    dist = fsdp_setup.init_distributed(cpu_collectives=cfg.cpu_offload)
    threads = torch.get_num_threads()
    try:
        return train(cfg, dist)
    except Exception as err:
        # Divergence and on_every_rank's errors are raised on every rank alike. Anything else (a
        # broken file in this rank's loader, an out-of-memory) is this rank's alone, and the others
        # would wait for it in their next collective until the NCCL/gloo timeout, many minutes.
        if dist.world_size > 1 and not isinstance(err, (TrainingDiverged, fsdp_setup.AllRanksError)):
            user_error = data.error_message(err) if isinstance(err, ValueError) else None
            fsdp_setup.exit_rank_failed(dist.rank, user_error)
        data.stop_loader_workers()
        raise
    finally:
        torch.set_num_threads(threads)  # main() may run in a longer-lived process (tests, notebooks)
        fsdp_setup.cleanup()


def cli(argv: list[str] | None = None) -> int:
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    try:
        return main(argv)
    except (ValueError, TrainingDiverged) as err:  # user errors and divergence: the message, no traceback
        if rank == 0:
            print(f"error: {data.error_message(err)}", file=sys.stderr, flush=True)
        return 1 if isinstance(err, TrainingDiverged) else 2


if __name__ == "__main__":
    sys.exit(cli())
