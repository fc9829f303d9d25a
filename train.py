"""train.py — MAE pretraining of geofm's ViTs, from a 2-minute CPU demo to 1,024 GPUs, with exact resume.

    python train.py                 # the demo: a tiny ViT MAE on generated 4-band chips, CPU, ~2 min
    torchrun --standalone --nproc_per_node=8 train.py --model vit_3b --data /data/millionaid \
        --strategy hybrid_shard --shard-group-size 1 --batch-size 32 --epochs 800 --out runs/vit3b --resume
    srun -N128 --ntasks-per-node=8 -c7 --gpus-per-task=1 --gpu-bind=closest --signal=USR1@180 --kill-on-bad-exit=1 \
        python train.py --model vit_5b --data /data/millionaid --strategy hybrid_shard --shard-group-size 8 \
        --batch-size 32 --epochs 800 --out runs/vit5b --resume
    python train.py export --ckpt runs/vit3b --out vit3b_encoder.pt   # the encoder, for eval.py

A straight line, like nanoGPT: flags -> process group -> data -> model -> optimizer -> loop, with
checkpoints on the side. The same code runs one CPU process (gloo, a world-size-1 process group)
and a thousand GPUs (NCCL/RCCL); fsdp_setup.py holds everything distributed, data.py the images,
checkpoint.py the checkpoints.

Recipe (He et al. 2021, ../shared/ANCHORS.md): AdamW β=(0.9, 0.95), weight decay 0.05 except biases,
norms and the cls/mask tokens, lr = blr × global batch / 256, linear warmup then half-cycle cosine to
0, set every step. `--batch-size` is per GPU per optimizer step; `--accum-steps` splits it into
micro-batches, so the global batch is batch size × world size whatever the accumulation.

Run folder (`--out`): config.json, metrics.jsonl (one JSON record per log line), recon-step-N.png,
and checkpoints `step-N/` with a `latest` pointer (their layout, save order and export: checkpoint.py);
a kill at any moment leaves `latest` on a complete checkpoint. `--resume` continues bit-exactly (same
world size), so a requeued job script can always pass it. SIGTERM/SIGUSR1: finish the step, save, exit 0.
Exit codes: 0 done or stopped cleanly, 1 loss not finite (nothing saved), 2 bad flag or data, 3 this
rank alone failed in a multi-rank run (its traceback is printed with its rank, and it exits at once so
that the launcher ends the job; srun does so only with --kill-on-bad-exit=1).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import resource
import shutil
import signal
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as tdist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

import data
import fsdp_setup
from checkpoint import barrier, export_main, find_checkpoint, load_checkpoint, params_finite, save_checkpoint, write_atomic
from fsdp_setup import on_every_rank
from mae import MaskedAutoencoder, load_mae_checkpoint
from vit import ViTConfig, get_config

SYNTHETIC_IMAGES = 1_000_000  # `--data synthetic`: MillionAID-sized, generated on the fly


# ---------------------------------------------------------------------------------------------
# Config: one field per command-line flag


def flag(default, help: str, **argparse_kwargs):
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class TrainConfig:
    # model
    model: str = flag("vit_base", "model from vit.CONFIGS (vit_tiny ... vit_15b)")
    img_size: int | None = flag(None, "input side in pixels (default: the model's, 224)")
    in_chans: int | None = flag(None, "bands the model sees; checked against the data (default: from the data, 3 for synthetic)")
    decoder_embed_dim: int = flag(512, "MAE decoder width")
    decoder_depth: int = flag(8, "MAE decoder blocks")
    decoder_num_heads: int = flag(16, "MAE decoder attention heads")
    mask_ratio: float = flag(0.75, "fraction of patches removed")
    norm_pix_loss: bool = flag(True, "disable per-patch target normalisation", flag="--no-norm-pix-loss")
    init: str | None = flag(None, "start from an official-layout MAE/ViT checkpoint (.pth), e.g. ImageNet MAE weights")
    # data
    data: str = flag("demo", "image folder, manifest file, 'synthetic', or 'demo' (generated sample chips)")
    bands: str | None = flag(None, "comma-separated 0-based bands to read, e.g. 3,2,1,7 (default: all)")
    stats: str | None = flag(None, "per-band statistics JSON from `python data.py stats` (default: <data>/stats.json if present)")
    workers: int = flag(8, "DataLoader worker processes per rank")
    threads: int = flag(0, "CPU threads of torch's own kernels (0: torch's default, one per core)")
    # schedule
    batch_size: int = flag(32, "images per GPU per optimizer step (the paper's local batch 32)")
    accum_steps: int = flag(1, "split --batch-size into this many micro-batches (gradient accumulation)")
    epochs: float | None = flag(None, "training length in epochs (default 800, the MAE recipe)")
    steps: int | None = flag(None, "training length in optimizer steps (instead of --epochs)")
    blr: float | None = flag(None, "base lr; lr = blr x global batch / 256 (default 1.5e-4)")
    lr: float | None = flag(None, "absolute peak lr (instead of --blr)")
    warmup_epochs: float | None = flag(None, "linear warmup in epochs (default 40)")
    warmup_steps: int | None = flag(None, "linear warmup in steps (instead of --warmup-epochs)")
    weight_decay: float = flag(0.05, "AdamW weight decay (none on biases, norms, tokens)")
    clip_grad: float | None = flag(None, "clip the global gradient norm to this (MAE pretraining does not)")
    seed: int = flag(0, "seed of the init, data order, augmentations and masks")
    # parallelism (fsdp_setup.py)
    strategy: str = flag("full_shard", "full_shard | shard_grad_op | hybrid_shard | no_shard | ddp")
    shard_group_size: int | None = flag(None, "GPUs sharding one replica (hybrid_shard only)")
    mixed_precision: str = flag("auto", "auto (bf16 on GPU, fp32 on CPU) | bf16 | bf16-reduce | fp32")
    ac: str = flag("none", "activation checkpointing: none | full | k (every k-th block)")
    compile: bool = flag(False, "torch.compile each transformer block")
    sdpa: str = flag("auto", "attention kernel: auto (torch picks per call) | flash | efficient | cudnn | math; "
                             "`python bench.py sdpa` times them at MAE's shapes on your GPU")
    cpu_offload: bool = flag(False, "FSDP2 CPU offload: params, grads and AdamW state in host memory (not with ddp)")
    # run folder, checkpoints, logging
    out: str | None = flag(None, "run folder (default runs/demo for the demo, else runs/<model>)")
    resume: bool = flag(False, "continue from the newest complete checkpoint in --out; none yet: start fresh")
    ckpt_every: int = flag(1000, "checkpoint every N steps (and always at the end and on SIGTERM/SIGUSR1)")
    keep: int = flag(3, "checkpoints kept in --out")
    max_steps_per_run: int | None = flag(None, "stop cleanly (with a checkpoint) after N steps of this run")
    log_every: int = flag(10, "one log line and metrics.jsonl record every N steps")
    recon_every: int | None = flag(None, "reconstruction PNG every N steps (default: with each checkpoint; 0: never)")
    rgb_bands: str | None = flag(None, "bands shown as red,green,blue in the reconstruction PNG, or one as grey (default: 0,1,2; 0 for 1-2 bands)")
    peak_tflops: float | None = flag(None, "peak dense bf16 TFLOP/s per GPU for MFU (default: from the device name)")


# `python train.py` with no --data is the README's quick start: these replace the defaults above.
# A 4-band 64 px sample, a ViT-Tiny with a small decoder, and an lr high enough that the loss
# falls visibly within ~2 minutes on 2 CPU cores.
DEMO_DEFAULTS = dict(
    model="vit_tiny", img_size=64, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
    batch_size=32, steps=800, lr=1.5e-3, warmup_steps=40, ckpt_every=800, log_every=50,
    # One compute thread and one loader process: a model this small gains nothing from a second
    # thread, and threads that compete with the loader (or anything else) for 2 cores stall badly.
    threads=1, workers=1,
    rgb_bands="2,1,0",  # near-infrared, green, blue of the sample: vegetation shows red (false colour)
)
EXCLUSIVE = [("epochs", "steps"), ("blr", "lr"), ("warmup_epochs", "warmup_steps")]


def build_parser(with_defaults: bool = True) -> argparse.ArgumentParser:
    """The flags of TrainConfig. Without defaults, the parsed namespace holds only the flags given."""
    parser = argparse.ArgumentParser(
        description="MAE pretraining of a ViT (`python train.py export --help` for encoder export). "
        "Without --data: the built-in CPU demo, whose defaults are shown as [demo: ...].",
    )
    for f in dataclasses.fields(TrainConfig):
        meta = dict(f.metadata)
        name = meta.pop("flag", "--" + f.name.replace("_", "-"))
        help_text = meta.pop("help")
        if f.default is not None and not isinstance(f.default, bool):  # None-defaults explain themselves
            help_text += f" (default: {f.default})"
        if f.name in DEMO_DEFAULTS:
            help_text += f" [demo: {DEMO_DEFAULTS[f.name]}]"
        default = f.default if with_defaults else argparse.SUPPRESS
        if isinstance(f.default, bool):
            action = "store_false" if f.default else "store_true"
            parser.add_argument(name, dest=f.name, action=action, default=default, help=help_text)
        else:
            meta.setdefault("type", {"int": int, "float": float, "str": str}[f.type.split(" |")[0]])
            parser.add_argument(name, dest=f.name, default=default, help=help_text, **meta)
    return parser


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = build_parser()
    parser.parse_args(argv)  # --help, and errors in types, before anything else
    given = vars(build_parser(with_defaults=False).parse_args(argv))
    values = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    if given.get("data", values["data"]) == "demo":
        values.update(DEMO_DEFAULTS)
    for a, b in EXCLUSIVE:
        if a in given and b in given:
            parser.error(f"--{a.replace('_', '-')} and --{b.replace('_', '-')} are alternatives; give one")
        if a in given or b in given:  # the one given replaces a default of its alternative
            values[b if a in given else a] = None
    return TrainConfig(**{**values, **given})


def int_list(text: str | None, name: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{name} must be comma-separated integers like 3,2,1, got {text!r}") from None


def demo_config() -> TrainConfig:
    """The demo's settings: what `python train.py` runs without --data."""
    return dataclasses.replace(TrainConfig(), data="demo", **DEMO_DEFAULTS)


def build_mae(cfg: TrainConfig) -> MaskedAutoencoder:
    """The MAE of these flags, in the caller's device context (meta: no memory, any size)."""
    return MaskedAutoencoder(model_config(cfg), cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads,
                             cfg.norm_pix_loss)


def model_config(cfg: TrainConfig) -> ViTConfig:
    overrides = {k: v for k, v in (("img_size", cfg.img_size), ("in_chans", cfg.in_chans)) if v is not None}
    return get_config(cfg.model, **overrides)


def validate(cfg: TrainConfig, world_size: int, device: torch.device) -> None:
    """Every user error that needs no data and no memory, as a ValueError naming the flag."""
    with torch.device("meta"):  # unknown model, image size vs patch size, decoder width vs heads: no memory
        MaskedAutoencoder(model_config(cfg), cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads)
    if cfg.batch_size < 1 or cfg.accum_steps < 1 or cfg.batch_size % cfg.accum_steps:
        raise ValueError(
            f"--batch-size {cfg.batch_size} must be a positive multiple of --accum-steps {cfg.accum_steps} "
            "(the per-GPU batch is split into equal micro-batches)"
        )
    if not 0.0 <= cfg.mask_ratio < 1.0:
        raise ValueError(f"--mask-ratio must be in [0, 1), got {cfg.mask_ratio}")
    for name in ("steps", "epochs", "log_every", "keep", "max_steps_per_run"):
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    for name in ("warmup_steps", "warmup_epochs"):
        value = getattr(cfg, name)
        if value is not None and value < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    if cfg.clip_grad is not None and cfg.clip_grad <= 0:
        raise ValueError(f"--clip-grad must be positive, got {cfg.clip_grad} (leave it out to not clip)")
    if cfg.ckpt_every < 0 or (cfg.recon_every or 0) < 0:
        raise ValueError("--ckpt-every and --recon-every must be >= 0 (0 = only at the end / never)")
    if cfg.sdpa not in SDPA_CHOICES:
        raise ValueError(f"--sdpa must be one of {', '.join(SDPA_CHOICES)}, got {cfg.sdpa!r}")
    int_list(cfg.bands, "bands")
    int_list(cfg.rgb_bands, "rgb-bands")
    if cfg.data not in ("demo", "synthetic") and not os.path.exists(cfg.data):
        raise ValueError(f"--data {cfg.data}: no such folder or manifest file (or use --data synthetic / demo)")
    for name in ("init", "stats"):
        path = getattr(cfg, name)
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"--{name} {path}: no such file")
    fsdp_setup.validate_layout(
        cfg.strategy, cfg.shard_group_size, world_size,
        fsdp_setup.resolve_mixed_precision(cfg.mixed_precision, device), cfg.ac, device, cfg.cpu_offload,
    )


# ---------------------------------------------------------------------------------------------
# Building blocks (bench.py imports these: the same code path, not a copy)


def build_model(cfg: TrainConfig, dist: fsdp_setup.Dist) -> torch.nn.Module:
    """MaskedAutoencoder built on the meta device (no memory, any size), then sharded, materialised
    and initialised per shard by fsdp_setup; `--init` weights are loaded after that."""
    with torch.device("meta"):
        model = MaskedAutoencoder(
            model_config(cfg), cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads, cfg.norm_pix_loss
        )
    model = fsdp_setup.parallelize(
        model, cfg.strategy, cfg.shard_group_size, fsdp_setup.resolve_mixed_precision(cfg.mixed_precision, dist.device),
        cfg.ac, cfg.compile, seed=cfg.seed, cpu_offload=cfg.cpu_offload,
    )
    if cfg.init:
        load_init_weights(model, cfg, dist)
    return model


def load_init_weights(model: torch.nn.Module, cfg: TrainConfig, dist: fsdp_setup.Dist) -> None:
    """Continual pretraining: rank 0 reads an official-layout checkpoint (whole, on CPU), checks it
    against a meta-device copy of the model (mae.load_mae_checkpoint's rules), and broadcasts it
    shard by shard; other ranks never hold the full weights."""
    def read_and_check():
        if not dist.is_main:
            return {}, []
        state = torch.load(cfg.init, map_location="cpu", weights_only=True)
        state = state.get("model", state)
        with torch.device("meta"):
            reference = MaskedAutoencoder(
                model_config(cfg), cfg.decoder_embed_dim, cfg.decoder_depth, cfg.decoder_num_heads, cfg.norm_pix_loss
            )
        with warnings.catch_warnings():  # copying into meta tensors is a deliberate no-op here
            warnings.simplefilter("ignore")
            missing = load_mae_checkpoint(reference, state)
        return state, missing

    state, missing = on_every_rank(read_and_check, dist)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    plain = fsdp_setup.unwrap(model)
    # Offloaded shards are on the CPU, buffers on the GPU: the buffers join the shards for the broadcast.
    with fsdp_setup.buffers_on(plain, torch.device("cpu")) if cfg.cpu_offload else contextlib.nullcontext():
        set_model_state_dict(plain, state, options=options)
    log(dist, f"init: weights from {cfg.init}" + (f"; {len(missing)} decoder tensors keep their fresh init" if missing else ""))


# Process-wide SDPA switches: `--sdpa cudnn` leaves only cuDNN and the math fallback enabled, so the
# whole model (encoder and decoder, eager or compiled) runs that kernel wherever it supports the shape.
# MAE's encoder attends over only 50-65 tokens, where the kernels differ most (BENCHMARKS.md).
SDPA_SWITCHES = {"flash": "enable_flash_sdp", "efficient": "enable_mem_efficient_sdp", "cudnn": "enable_cudnn_sdp"}
SDPA_CHOICES = ("auto", *SDPA_SWITCHES, "math")


def apply_sdpa_choice(choice: str) -> None:
    for name, switch in SDPA_SWITCHES.items():
        getattr(torch.backends.cuda, switch)(choice in ("auto", name))


ADAMW_IMPLEMENTATIONS = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for-loop": dict(foreach=False)}


def build_optimizer(model: torch.nn.Module, weight_decay: float, implementation: str = "fused") -> torch.optim.Optimizer:
    """AdamW β=(0.9, 0.95), as MAE. No weight decay on biases, norm weights (1-D) and the cls/mask
    tokens. The fused kernel on every device (CPU, CUDA/ROCm, CPU-offloaded shards): one pass over each
    parameter instead of a dozen, and with FSDP2 one DTensor dispatch per parameter group instead of
    a dozen per parameter; on a 2-core CPU that made the step's host time 3-4x shorter (BENCHMARKS.md,
    `bench.py phases` compares the implementations)."""
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
    norm before clipping), both still on the device: no host sync.

    `mask_generator` draws the masking noise, so that it can be checkpointed apart from any other
    use of the RNG.
    """
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


# Dense bf16 TFLOP/s per device (datasheets), matched against the device name, most specific first.
PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,  # SXM
    "H200": 989.0,
    "A100": 312.0,
    "MI250X": 191.5,  # per GCD: each of a card's two dies is its own device, as on Frontier
    "MI300X": 1307.0,
}


def peak_tflops(device: torch.device, override: float | None = None) -> tuple[str, float | None]:
    """(device name, peak TFLOP/s or None). CPUs and unknown devices have no peak: MFU is then null."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if override is not None:
        return name, override
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return name, tflops
    return name, None


# ---------------------------------------------------------------------------------------------
# Data, pictures, logging


def build_data(cfg: TrainConfig, dist: fsdp_setup.Dist, out: Path):
    """(dataset, its display stats (mean, std) per band or None, number of bands). Fails early (on
    the main process, before any worker starts) on a bad folder, band selection or stats file."""
    if cfg.data == "synthetic":
        in_chans = cfg.in_chans or 3
        dataset = data.SyntheticDataset(SYNTHETIC_IMAGES, in_chans, model_config(cfg).img_size, cfg.seed)
        return dataset, None, in_chans
    source, stats = cfg.data, cfg.stats
    if cfg.data == "demo":
        source = str(out / "sample-chips")
        if dist.is_main and not os.path.isfile(os.path.join(source, "stats.json")):
            data.make_demo_chips(source, n=256)  # 64 px, 4 bands (blue ... short-wave infrared)
        barrier(dist)
        stats = os.path.join(source, "stats.json")
    elif stats is None and os.path.isfile(os.path.join(cfg.data, "stats.json")):
        stats = os.path.join(cfg.data, "stats.json")
    bands = int_list(cfg.bands, "bands")
    data_cfg = data.PretrainDataConfig(img_size=model_config(cfg).img_size, bands=bands, in_chans=cfg.in_chans, stats=stats)
    dataset = data.PretrainDataset(source, data_cfg, seed=cfg.seed)
    in_chans = dataset[0].shape[0]  # reads one image: a wrong band selection or stats file fails here
    mean, std = dataset.normalize.mean, dataset.normalize.std
    if mean is None:  # 3-band uint8: data.py normalises with ImageNet's statistics
        mean, std = [v * 255 for v in data.IMAGENET_MEAN], [v * 255 for v in data.IMAGENET_STD]
    elif bands is not None and len(mean) != len(bands):
        mean, std = [mean[b] for b in bands], [std[b] for b in bands]
    return dataset, (torch.tensor(mean), torch.tensor(std)), in_chans


@torch.no_grad()
def save_reconstruction(model, imgs, pixel_stats, rgb_bands, path: Path, dist, seed: int) -> None:
    """A PNG, one row per image: original | masked | reconstruction | reconstruction pasted into
    the visible patches, in pixel space (dataset normalisation undone), RGB from `rgb_bands`.

    Every rank runs the forward (FSDP all-gathers need all of them); noise from its own seeded
    generator, so the training masks are not disturbed. Rank 0 writes the file.
    """
    from PIL import Image

    mae = fsdp_setup.unwrap(model)
    generator = torch.Generator(imgs.device).manual_seed(seed)
    noise = torch.rand(imgs.shape[0], mae.cfg.num_patches, generator=generator, device=imgs.device)
    _, pred, mask = model(imgs, mask_ratio=0.75, noise=noise)
    if not dist.is_main:
        return
    _, recon, pasted = mae.reconstruction_images(imgs, pred, mask)
    removed = mae.unpatchify(mask.float().unsqueeze(-1).expand(-1, -1, pred.shape[-1]))
    panels = [imgs.float(), imgs.float(), recon, pasted]
    if pixel_stats is not None:
        mean, std = (s.to(imgs.device)[None, :, None, None] for s in pixel_stats)
        panels = [p * std + mean for p in panels]
    bands = (rgb_bands * 3)[:3]  # one band given: grey
    panels = [p[:, bands] for p in panels]
    # One contrast stretch for all three bands of an image (2-98 percentile of the original), so
    # band ratios, i.e. colours, survive; applied to every panel of the row alike.
    low = torch.quantile(panels[0].flatten(1), 0.02, dim=1)[:, None, None, None]
    high = torch.quantile(panels[0].flatten(1), 0.98, dim=1)[:, None, None, None]
    panels = [((p - low) / (high - low).clamp_min(1e-6)).clamp(0, 1) for p in panels]
    panels[1] = torch.where(removed[:, :3] > 0, torch.full_like(panels[1], 0.8), panels[1])  # masked: light grey
    gap = torch.ones(imgs.shape[0], 3, imgs.shape[2], 2, device=imgs.device)
    rows = torch.cat([x for p in panels for x in (p, gap)][:-1], dim=3)  # (B, 3, H, 4W + gaps)
    grid = torch.cat([x for r in rows for x in (r, torch.ones(3, 2, rows.shape[3], device=imgs.device))][:-1], dim=1)
    scale = max(1, 128 // imgs.shape[2])
    picture = (grid.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    Image.fromarray(picture).resize((picture.shape[1] * scale, picture.shape[0] * scale), Image.NEAREST).save(path)


def log(dist, message: str) -> None:
    if dist.is_main:
        print(message, flush=True)


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated device memory; on CPU the process's peak resident set (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class StopRequest:
    """SIGTERM/SIGUSR1 (SLURM preemption or time limit) only set a flag; the loop finishes the
    step, saves and exits 0. Ranks may receive the signal at different steps, so they agree:
    each step all-reduces the flag (MAX), copies the result to the host without waiting, and reads
    last step's copy, so the hot loop waits at most for last step's work, never for the step just
    queued; all ranks stop one step later."""

    def __init__(self, dist):
        self.dist, self.signal_name = dist, None
        self.on_gpu = dist.device.type == "cuda"
        self.host_flag = torch.zeros((), pin_memory=self.on_gpu)  # last step's all-reduced flag
        self.posted, self.copied = False, None  # a flag was posted; CUDA event after its copy
        self.previous = {s: signal.signal(s, self.handler) for s in (signal.SIGTERM, signal.SIGUSR1)}

    def handler(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def agreed(self) -> bool:
        if self.dist.world_size == 1:
            return self.signal_name is not None
        if self.copied is not None:
            self.copied.synchronize()  # last step's copy, not the step queued after it
        result = self.posted and bool(self.host_flag)
        flag = torch.full((), float(self.signal_name is not None), device=self.dist.device)
        tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
        # Not flag.item(): on a GPU that copy queues behind this whole step and waits for it.
        self.host_flag.copy_(flag, non_blocking=True)
        self.posted = True
        if self.on_gpu:
            self.copied = torch.cuda.Event()
            self.copied.record()
        return result

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM/SIGUSR1. SLURM signals the whole process group; torch's own
    worker handler would die on it, failing the step that the main process is about to save."""
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)


class TrainingDiverged(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# The run


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    dist = fsdp_setup.init_distributed(cpu_collectives=cfg.cpu_offload)
    threads = torch.get_num_threads()
    try:
        return train(cfg, dist)
    except Exception as err:
        # Divergence and on_every_rank's errors are raised on every rank alike. Anything else (a
        # broken file in this rank's loader, an out-of-memory) is this rank's alone, and the others
        # wait for it in their next collective until the NCCL/gloo timeout, which can be many minutes.
        if dist.world_size > 1 and not isinstance(err, (TrainingDiverged, fsdp_setup.AllRanksError)):
            exit_rank_failed(dist.rank)
        raise
    finally:
        torch.set_num_threads(threads)  # main() may run in a longer-lived process (tests, notebooks)
        fsdp_setup.cleanup()


def exit_rank_failed(rank: int) -> None:
    """Print the exception being handled with this rank, then end the process now (exit code 3).

    os._exit, not a return: destroy_process_group, atexit handlers and the DataLoader workers' join
    can block while the other ranks sit in a collective, so the process might never exit and the
    launcher never notice. torchrun then stops every rank; srun does so only with --kill-on-bad-exit=1
    (by default it lets the other tasks run on)."""
    print(f"[rank {rank}] failed; ending this process so that the launcher stops the job:\n"
          f"{traceback.format_exc()}", file=sys.stderr, end="", flush=True)
    sys.stdout.flush()
    os._exit(3)


def train(cfg: TrainConfig, dist: fsdp_setup.Dist) -> int:
    # ---- setup: every user error before heavy work, on every rank ----
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg, out, previous, dataset, pixel_stats = setup_run(cfg, dist)
    apply_sdpa_choice(cfg.sdpa)  # always: "auto" undoes an earlier run's choice in the same process
    if cfg.sdpa != "auto":
        log(dist, f"attention: SDPA kernel {cfg.sdpa} (math where it does not support a shape)")
    sampler = data.ResumableDistributedSampler(len(dataset), dist.rank, dist.world_size, seed=cfg.seed)
    loader_batch = cfg.batch_size // cfg.accum_steps
    global_batch = cfg.batch_size * dist.world_size

    # ---- model, optimizer, the per-rank masking RNG ----
    model = build_model(cfg, dist)
    optimizer = build_optimizer(model, cfg.weight_decay)
    mae = fsdp_setup.unwrap(model)
    mask_generator = torch.Generator(dist.device).manual_seed(cfg.seed * 1_000_003 + dist.rank)
    device_name, peak = peak_tflops(dist.device, cfg.peak_tflops)
    flops_per_image = 3 * mae.forward_flops_per_image(cfg.mask_ratio)  # forward + backward (2x forward)
    num_params = sum(p.numel() for p in model.parameters())
    log(dist, f"model {cfg.model} ({mae.cfg.img_size} px, patch {mae.cfg.patch_size}, {mae.cfg.in_chans} bands): "
              f"{num_params / 1e6:.2f}M parameters with the decoder, {flops_per_image / 3e9:.2f} GFLOP forward per image")
    log(dist, f"peak for MFU: {device_name} = " + (f"{peak:g} TFLOP/s" + (" (--peak-tflops)" if cfg.peak_tflops else "")
                                                if peak else "unknown (MFU null; pass --peak-tflops)"))
    log(dist, f"data {cfg.data}: {len(dataset)} images, global batch {global_batch} ({dist.world_size} x {cfg.batch_size}"
              f"{f' in {cfg.accum_steps} micro-batches' if cfg.accum_steps > 1 else ''}), "
              f"{sampler.num_samples // cfg.batch_size} steps/epoch; {cfg.steps} steps, warmup {cfg.warmup_steps}, "
              f"peak lr {cfg.lr:.3g}")
    progress = Progress()
    if previous is not None:
        progress = resume(previous, cfg, model, optimizer, dist, mask_generator)
    elif cfg.resume:
        log(dist, f"resume: no checkpoint in {out} yet, starting from scratch")
    if dist.is_main:
        trim_metrics(out / "metrics.jsonl", progress.step)

    # ---- the loop ----
    stop = StopRequest(dist)
    loader = data.make_loader(dataset, loader_batch, sampler, workers=cfg.workers)
    loader.worker_init_fn = ignore_stop_signals
    recon_imgs = torch.stack([dataset[i] for i in range(min(4, len(dataset)))]).to(dist.device)
    last_saved, last_picture, step_stats, steps_this_run = previous, None, {}, 0
    interval = Interval(progress.step)
    exit_reason = "done" if progress.step >= cfg.steps else None
    try:
        while exit_reason is None:
            sampler.load_state_dict({"epoch": progress.epoch, "index": progress.epoch_index})
            if hasattr(dataset, "set_epoch"):  # augmentations from (seed, epoch, index): the same after a resume
                dataset.set_epoch(progress.epoch)
            batches = iter(loader)
            while progress.epoch_index + cfg.batch_size <= sampler.num_samples:
                t0 = time.perf_counter()
                micro_batches = [next(batches).to(dist.device, non_blocking=True) for _ in range(cfg.accum_steps)]
                interval.data_wait += time.perf_counter() - t0
                loss, grad_norm = train_step(model, optimizer, micro_batches,
                                             lr=lr_at(progress.step, cfg.lr, cfg.steps, cfg.warmup_steps),
                                             mask_ratio=cfg.mask_ratio, clip_grad=cfg.clip_grad, mask_generator=mask_generator)
                progress.step, progress.epoch_index = progress.step + 1, progress.epoch_index + cfg.batch_size
                steps_this_run += 1
                interval.pending.append((progress.step, loss, grad_norm))
                if stop.agreed():
                    exit_reason = "signal"
                elif progress.step >= cfg.steps:
                    exit_reason = "done"
                elif cfg.max_steps_per_run and steps_this_run >= cfg.max_steps_per_run:
                    exit_reason = "max-steps-per-run"
                save_now = exit_reason is not None or (cfg.ckpt_every and progress.step % cfg.ckpt_every == 0)
                # Default: a picture with every checkpoint, those of a signal or --max-steps-per-run included.
                recon_now = save_now if cfg.recon_every is None else cfg.recon_every != 0 and (
                    exit_reason == "done" or progress.step % cfg.recon_every == 0)
                if progress.step % cfg.log_every and not save_now and not recon_now:
                    continue
                # ---- a sync point: check the losses (and, before a save, the weights), log, save ----
                metrics, first_bad_step = interval.close(progress, sampler.num_samples, cfg, global_batch,
                                                         flops_per_image, peak, dist)
                if first_bad_step or (save_now and not params_finite(model, dist)):
                    bad = first_bad_step or progress.step
                    raise TrainingDiverged(
                        f"loss is not finite at step {bad}; stopping without writing a checkpoint. Last good "
                        f"checkpoint: {last_saved or 'none (this run saved none)'}. Resume from it with a lower "
                        "--lr/--blr, a longer warmup or --clip-grad.")
                if dist.is_main:
                    with open(out / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(metrics) + "\n")
                    print(format_record(metrics, cfg.steps), flush=True)
                if recon_now:
                    last_picture = out / f"recon-step-{progress.step}.png"
                    save_reconstruction(model, recon_imgs, pixel_stats, int_list(cfg.rgb_bands, "rgb-bands"), last_picture, dist, cfg.seed)
                if save_now:
                    train_state = {**dataclasses.asdict(progress), "world_size": dist.world_size,
                                   "loss": metrics["loss"], "vit_config": dataclasses.asdict(mae.cfg),
                                   "config": dataclasses.asdict(cfg)}
                    last_saved = save_checkpoint(out, model, optimizer, train_state, dist, mask_generator, cfg.keep)
                    log(dist, f"checkpoint: {last_saved}")
                if exit_reason is not None:
                    break
                interval = Interval(progress.step)  # after the save: its time is not training time
            else:
                progress.epoch, progress.epoch_index = progress.epoch + 1, 0
    finally:
        stop.restore()

    if exit_reason == "signal":
        log(dist, f"received {stop.signal_name or 'a stop signal on another rank'}: saved {last_saved}; "
                  "rerun with --resume to continue")
    elif exit_reason == "max-steps-per-run":
        log(dist, f"stopped after {steps_this_run} steps (--max-steps-per-run): saved {last_saved}; rerun with --resume")
    else:
        # This run's picture only: the folder may hold a later step's from an earlier, longer run.
        log(dist, f"finished {cfg.steps} steps. Run folder {out}: config.json, metrics.jsonl, checkpoint {last_saved}"
                  + (f", reconstruction {last_picture}" if last_picture else ""))
    return 0


@dataclass
class Progress:
    """Where the run is: with the weights, optimizer and RNG states, what a resume needs."""
    step: int = 0  # optimizer steps done
    epoch: int = 0
    # Samples this rank has trained on in the epoch. Counted here, not read from the sampler:
    # behind a DataLoader the sampler runs ahead by the prefetched batches.
    epoch_index: int = 0


class Interval:
    """The steps since the last sync point: their losses (still on the device), data wait, wall time."""

    def __init__(self, step: int):
        self.first_step, self.start, self.data_wait, self.pending = step, time.perf_counter(), 0.0, []

    def close(self, progress, samples_per_epoch, cfg, global_batch, flops_per_image, peak, dist):
        """One host sync for all the interval's losses. Returns (metrics record, first step with a
        non-finite loss or None)."""
        losses = torch.stack([loss for _, loss, _ in self.pending]).tolist()
        first_bad = next((s for (s, _, _), loss in zip(self.pending, losses) if not math.isfinite(loss)), None)
        elapsed = time.perf_counter() - self.start
        img_per_s = (progress.step - self.first_step) * global_batch / elapsed
        tflops_per_gpu = img_per_s * flops_per_image / dist.world_size / 1e12
        metrics = {
            "step": progress.step, "epoch": round(progress.epoch + progress.epoch_index / samples_per_epoch, 4),
            "loss": sum(losses) / len(losses),  # mean over the interval's steps
            "lr": lr_at(progress.step - 1, cfg.lr, cfg.steps, cfg.warmup_steps), "grad_norm": self.pending[-1][2].item(),
            "img_per_s": round(img_per_s, 2), "tflops_per_gpu": round(tflops_per_gpu, 4),
            "mfu": round(tflops_per_gpu / peak, 4) if peak else None,
            "peak_mem_gib": round(peak_memory_gib(dist.device), 3), "data_wait_frac": round(self.data_wait / elapsed, 4),
        }
        return metrics, first_bad


def setup_run(cfg: TrainConfig, dist: fsdp_setup.Dist):
    """Validate, pick the checkpoint to resume from, prepare the run folder and the data, resolve
    the schedule. Returns (resolved cfg, run folder, checkpoint or None, dataset, pixel stats)."""
    on_every_rank(lambda: validate(cfg, dist.world_size, dist.device), dist)
    out = Path(cfg.out or ("runs/demo" if cfg.data == "demo" else f"runs/{cfg.model}"))
    previous = on_every_rank(lambda: check_run_folder(cfg, out), dist)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if previous is not None and not cfg.resume:  # only the demo gets here: it starts over in its folder
            for old in [*out.glob("step-*"), *out.glob(".tmp-step-*"), out / "latest"]:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
    barrier(dist)
    dataset, pixel_stats, in_chans = on_every_rank(lambda: build_data(cfg, dist, out), dist)
    rgb_bands = cfg.rgb_bands or ("0,1,2" if in_chans >= 3 else "0")

    def check_rgb_bands():
        if max(int_list(rgb_bands, "rgb-bands")) >= in_chans:
            raise ValueError(f"--rgb-bands {rgb_bands}: the data has {in_chans} bands (0-based indices)")

    on_every_rank(check_rgb_bands, dist)
    cfg = dataclasses.replace(cfg, in_chans=in_chans, img_size=model_config(cfg).img_size, out=str(out),
                              mixed_precision=fsdp_setup.resolve_mixed_precision(cfg.mixed_precision, dist.device), rgb_bands=rgb_bands)
    steps_per_epoch = len(dataset) // dist.world_size // cfg.batch_size
    cfg = on_every_rank(lambda: resolve_schedule(cfg, len(dataset), steps_per_epoch, cfg.batch_size * dist.world_size), dist)
    if dist.is_main:
        write_atomic(out / "config.json", json.dumps({**dataclasses.asdict(cfg), "world_size": dist.world_size}, indent=1))
    return cfg, out, previous if cfg.resume else None, dataset, pixel_stats


def resume(previous: Path, cfg: TrainConfig, model, optimizer, dist, mask_generator) -> Progress:
    on_every_rank(lambda: check_resumable(previous, cfg, fsdp_setup.unwrap(model)), dist)
    state = load_checkpoint(previous, model, optimizer, dist, mask_generator)
    progress = Progress(state["step"], state["epoch"], state["epoch_index"])
    if state["world_size"] != dist.world_size:
        log(dist, f"warning: {previous.name} was written by {state['world_size']} ranks, this run has "
                  f"{dist.world_size}: model and optimizer are resharded, but the data order and the masks cannot "
                  "continue exactly; the sampler restarts at the next epoch boundary and masks are reseeded")
        if progress.epoch_index:
            progress.epoch, progress.epoch_index = progress.epoch + 1, 0
        mask_generator.manual_seed(cfg.seed * 1_000_003 + dist.rank + 7919 * progress.step)
    latest = previous.parent / "latest"
    if latest.is_file() and latest.read_text().strip() != previous.name:
        log(dist, f"warning: {latest} names {latest.read_text().strip()!r}, not a complete checkpoint")
    log(dist, f"resume: {previous} (step {progress.step}, epoch {progress.epoch})")
    return progress


def resolve_schedule(cfg: TrainConfig, num_images: int, steps_per_epoch: int, global_batch: int) -> TrainConfig:
    """Fill in steps, warmup_steps and lr from epochs / blr and the data; check they make sense."""
    if steps_per_epoch < 1:
        raise ValueError(
            f"the data has {num_images} images, fewer than one global batch ({global_batch} = world size x "
            f"--batch-size); use a smaller --batch-size or more data"
        )
    steps = cfg.steps or round((cfg.epochs or 800) * steps_per_epoch)
    # `is None`, not `or`: --warmup-epochs 0 asks for no warmup, not the recipe's 40 epochs.
    warmup_epochs = 40 if cfg.warmup_epochs is None else cfg.warmup_epochs
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(warmup_epochs * steps_per_epoch)
    if warmup >= steps:
        raise ValueError(
            f"warmup ({warmup} steps) is not shorter than the run ({steps} steps, {steps_per_epoch} steps/epoch); "
            "pass a smaller --warmup-epochs or --warmup-steps"
        )
    lr = cfg.lr if cfg.lr is not None else (cfg.blr or 1.5e-4) * global_batch / 256
    return dataclasses.replace(cfg, steps=steps, warmup_steps=warmup, lr=lr)


def check_run_folder(cfg: TrainConfig, out: Path) -> Path | None:
    """The checkpoint to resume from (None: fresh start). A non-demo run never overwrites checkpoints silently."""
    previous = find_checkpoint(out) if out.is_dir() else None
    if previous is not None and not cfg.resume and cfg.data != "demo":
        raise ValueError(f"{out} already holds checkpoints ({previous.name}); pass --resume to continue, or choose a new --out")
    return previous


def check_resumable(folder: Path, cfg: TrainConfig, mae) -> None:
    """Same model as the checkpoint's, else DCP would fail deep inside with a shape error."""
    state = json.loads((folder / "train_state.json").read_text())
    decoder = ("decoder_embed_dim", "decoder_depth", "decoder_num_heads")
    if state["vit_config"] != dataclasses.asdict(mae.cfg) or any(state["config"][k] != getattr(cfg, k) for k in decoder):
        raise ValueError(
            f"{folder} holds a different model ({state['config']['model']}, {state['vit_config']}, decoder "
            f"{[state['config'][k] for k in decoder]}); resume with the same --model, --img-size, bands and decoder "
            "flags, or choose a new --out"
        )


def trim_metrics(path: Path, step: int) -> None:
    """Drop records after the resumed step (written after that checkpoint by a killed run); a fresh start empties the file."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        write_atomic(path, "".join(line + "\n" for line in lines))


def format_record(r: dict, total_steps: int) -> str:
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
    return (f"step {r['step']:>6}/{total_steps} | epoch {r['epoch']:7.2f} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | "
            f"grad {r['grad_norm']:.3f} | {r['img_per_s']:8.1f} img/s | {r['tflops_per_gpu']:7.2f} TFLOP/s/gpu | "
            f"MFU {mfu} | mem {r['peak_mem_gib']:.2f} GiB | data {r['data_wait_frac']:.0%}")


# ---------------------------------------------------------------------------------------------
# Command line


def cli(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    try:
        return export_main(argv[1:], prog="train.py export") if argv[:1] == ["export"] else main(argv)
    except (ValueError, TrainingDiverged) as err:  # user errors and divergence: the message, no traceback
        if rank == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 1 if isinstance(err, TrainingDiverged) else 2


if __name__ == "__main__":
    sys.exit(cli())
