"""bench.py — throughput sweep, memory/layout planner and SDPA micro-benchmark for geofm.

    python bench.py plan --model vit_15b --gpus 1024 --gpus-per-node 8 --gpu-mem-gib 64 [--json]
    python bench.py plan --check                 # the model against measured peaks (paper, H100)
    python bench.py                              # = sweep with defaults: ViT-L/H/1B/3B on a GPU, vit_tiny on CPU
    python bench.py sweep --models vit_large --batch-sizes 256 --compile on --sdpa auto cudnn --out runs/bench
    torchrun --nproc_per_node=8 bench.py sweep --models vit_3b --strategies hybrid_shard:1 hybrid_shard:8 full_shard
    python bench.py sdpa                         # each attention kernel at MAE's shapes on this card

`plan` needs no device: it predicts per-GPU memory and communication of every layout and recommends
one with the paper's rule. `sweep` times MAE training steps through train.py's own functions
(build_model, build_optimizer, train_step) on synthetic images already on the device: what it measures
is what train.py runs. Each configuration is a row (img/s, TFLOP/s per GPU, MFU, peak memory beside
the plan's, first-step time, energy per image), an impossible layout or an OOM included; under torchrun
every rank runs every configuration and rank 0 reports. On a shared machine `--interleave` takes the
configurations' timed steps in turn, so that outside load slows all alike.

The memory model (per GPU, bytes; P = all MAE parameters, P_b = the largest Block, s = shard group,
c = compute bytes (2 for bf16), r = gradient-reduction bytes (4: fp32 reduce, 2: bf16-reduce)):

  params, AdamW  4·P/s + 8·P/s   fp32 master weights, exp_avg and exp_avg_sq, sharded
  grads       4·P/s         fp32, sharded; freed after each step (zero_grad(set_to_none=True))
  gathered    c·2·P_b       full_shard / hybrid: the current Block and the prefetched next one
              c·P           shard_grad_op / no_shard: every Block stays unsharded from forward to backward
  buffers     (c + c + r + 2·r)·P_b   per Block in backward: all-gather output before copy-out, unsharded
              grads, their cast to the reduce dtype, two reduce-scatter inputs in flight (one reducing,
              one filling)
  activations per Block and token (c bytes each unless said): LayerNorm inputs 2·D, qkv input D,
              q, k, v 3·D, attention output D and its (B, L, D) copy for proj D, fc1 input D,
              GELU input M, fc2 input M = 9·D + 2·M, + LayerNorm mean/rstd 2·2 fp32, + logsumexp H fp32.
              Flash / memory-efficient / cuDNN SDPA keep only O(N) per head (no N×N matrix); the math
              backend would add the (H, N, N) probabilities. Encoder Blocks run on 1 + K visible tokens,
              decoder Blocks on 1 + L. A checkpointed Block keeps only its input (D); backward then adds
              one Block recomputed plus about one Block of gradients in flight. Outside the Blocks: the
              image (fp32 batch + compute-dtype copy), norm/embed/pred inputs, the fp32 loss terms.
  overhead    RUNTIME_OVERHEAD_GIB, one constant: allocator fragmentation, the collectives' workspaces
              and the CUDA/ROCm context, fitted to measured peaks (BENCHMARKS.md).

  peak = params + AdamW + max(grads, activations [+ gathered if kept]) + [gathered if not kept]
         + buffers + overhead
Backward creates each Block's grads as it frees that Block's activations (and, when kept, its unsharded
params), so the grads and the saved activations never peak together: the larger side counts.

DDP keeps full fp32 params, grads and DDP's gradient buckets (4 bytes/param each), AdamW state, and the
bf16 weight copies autocast keeps through forward. Communication per GPU per step uses ring collectives:
an all-gather or reduce-scatter of X bytes over n GPUs moves (n−1)/n·X per GPU, an all-reduce twice that.
FSDP gathers params in forward and, when resharded after forward (full_shard, hybrid), again in backward;
grads are reduce-scattered in the shard group, then (hybrid) all-reduced across the world/s replicas.
Collectives whose group spans nodes are also counted apart ("inter"): that is what the paper's rule avoids.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import torch

import fsdp_setup
import train
from fsdp_setup import checkpoint_every
from mae import MaskedAutoencoder
from vit import get_config

GiB = 2**30
# The one fitted constant: least squares (relative error) over the 18 measurements below. Without it the
# residuals are 1.4–2.2 GiB for the paper's FSDP runs (1 to 1,024 GCDs alike), -0.3–1.3 GiB for the H100
# runs (allocated memory only, no context), and 13 GiB for FSDP1's NO_SHARD (see BENCHMARKS.md).
RUNTIME_OVERHEAD_GIB = 1.5
# Measured peak memory per GPU to check the model against: (source, model, patch, strategy, shard group,
# world size, batch per GPU, activation checkpointing, GiB). The paper (FSDP1 on MI250X GCDs, 224 px) says
# GB, but its sharded part scales as exactly 16 bytes/param in GiB, so GiB. Whether it checkpointed is not
# stated: its numbers only fit with checkpointing (BENCHMARKS.md). The original MAE code (one H100, bf16
# autocast, no sharding, no checkpointing; ../shared/ANCHORS.md) checks the activation model alone.
PAPER, MAE_H100 = "paper, MI250X, FSDP1", "original MAE, H100"
MEASURED_MEMORY_GIB = [
    (PAPER, "vit_3b", 14, "no_shard", 1, 8, 32, "full", 61.7), (PAPER, "vit_3b", 14, "hybrid_shard", 2, 8, 32, "full", 26.3),
    (PAPER, "vit_3b", 14, "full_shard", 8, 8, 32, "full", 8.95), (PAPER, "vit_3b", 14, "full_shard", 1024, 1024, 32, "full", 4.08),
    (PAPER, "vit_5b", 14, "hybrid_shard", 2, 16, 32, "full", 43.6), (PAPER, "vit_5b", 14, "hybrid_shard", 4, 16, 32, "full", 23.5),
    (PAPER, "vit_5b", 14, "hybrid_shard", 8, 16, 32, "full", 13.4), (PAPER, "vit_5b", 14, "hybrid_shard", 16, 16, 32, "full", 8.4),
    (PAPER, "vit_5b", 14, "full_shard", 1024, 1024, 32, "full", 4.5),
    (PAPER, "vit_15b", 14, "hybrid_shard", 4, 16, 32, "full", 61.7), (PAPER, "vit_15b", 14, "hybrid_shard", 8, 16, 32, "full", 34.9),
    (PAPER, "vit_15b", 14, "hybrid_shard", 16, 16, 32, "full", 21.2), (PAPER, "vit_15b", 14, "full_shard", 1024, 1024, 32, "full", 9.8),
    (MAE_H100, "vit_base", 16, "no_shard", 1, 1, 512, "none", 26.7), (MAE_H100, "vit_large", 16, "no_shard", 1, 1, 256, "none", 23.0),
    (MAE_H100, "vit_huge", 14, "no_shard", 1, 1, 128, "none", 25.8), (MAE_H100, "vit_1b", 16, "no_shard", 1, 1, 128, "none", 27.0),
    (MAE_H100, "vit_3b", 16, "no_shard", 1, 1, 64, "none", 52.5),
]
PRECISION_BYTES = {"bf16": (2, 4), "bf16-reduce": (2, 2), "fp32": (4, 4)}  # (compute c, reduce r)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Per-step times without a host sync inside the loop: CUDA events queued on the stream on a GPU
    (read once, after one synchronize at the end), perf_counter on the CPU (which runs synchronously)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans, self.begin = [], None

    def now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        self.begin = self.now()

    def stop(self) -> None:
        self.spans.append((self.begin, self.now()))

    def step_times_s(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in self.spans]
        return [b - a for a, b in self.spans]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


# ---------------------------------------------------------------------------------------------
# plan: predicted memory and communication per layout
# ---------------------------------------------------------------------------------------------


@dataclass
class PlanConfig:
    model: str = "vit_15b"
    gpus: int = 8  # world size
    gpus_per_node: int = 8
    gpu_mem_gib: float = 80.0  # usable memory of one GPU (a Frontier MI250X GCD: 64)
    batch_size: int = 32  # images per GPU per step (the paper: 32)
    ac: str = "full"  # activation checkpointing: none | full | k (every k-th Block)
    mixed_precision: str = "bf16"  # bf16 (fp32 reduce) | bf16-reduce | fp32
    cpu_offload: bool = False  # FSDP2 CPUOffloadPolicy: sharded params, grads, AdamW state in host memory
    host_mem_gib: float | None = None  # host memory per node, checked when offloading (None: not checked)
    img_size: int | None = None  # None: the model config's (224 for the paper's models)
    patch_size: int | None = None  # None: the model config's
    in_chans: int = 3
    mask_ratio: float = 0.75
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16

    def __post_init__(self):
        if self.gpus < 1 or self.gpus_per_node < 1 or self.batch_size < 1:
            raise ValueError("--gpus, --gpus-per-node and --batch-size must be >= 1")
        if self.gpus > self.gpus_per_node and self.gpus % self.gpus_per_node:
            raise ValueError(f"--gpus {self.gpus} is not a whole number of nodes of --gpus-per-node {self.gpus_per_node}")
        if self.mixed_precision not in PRECISION_BYTES:
            raise ValueError(f"--mixed-precision must be one of {', '.join(PRECISION_BYTES)}, got {self.mixed_precision!r}")
        checkpoint_every(self.ac)  # validates
        overrides = {k: v for k, v in (("img_size", self.img_size), ("patch_size", self.patch_size)) if v}
        self.vit = get_config(self.model, in_chans=self.in_chans, **overrides)


@dataclass
class ModelSizes:
    params: int  # every trainable MAE parameter
    encoder_block: int  # parameters of one encoder Block
    decoder_block: int
    encoder_depth: int
    decoder_depth: int


def model_sizes(plan: PlanConfig) -> ModelSizes:
    """Parameter counts of the real MAE, built on the meta device (no memory, any size)."""
    cfg = plan.vit
    with torch.device("meta"):
        model = MaskedAutoencoder(cfg, plan.decoder_embed_dim, plan.decoder_depth, plan.decoder_num_heads)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    return ModelSizes(count(model), count(model.blocks[0]), count(model.decoder_blocks[0]), cfg.depth, plan.decoder_depth)


def block_activation_bytes(num_tokens: int, dim: int, mlp_dim: int, num_heads: int, act_bytes: int) -> int:
    """Bytes one Block saves for backward per sequence of `num_tokens` (fused SDPA, no N×N matrix)."""
    per_token = act_bytes * (9 * dim + 2 * mlp_dim) + 2 * 2 * 4 + num_heads * 4
    return num_tokens * per_token


def activation_bytes(plan: PlanConfig, sizes: ModelSizes) -> int:
    """Peak saved activations + backward working set for one GPU's batch."""
    cfg = plan.vit
    c = PRECISION_BYTES[plan.mixed_precision][0]
    L = cfg.num_patches
    K = int(L * (1 - plan.mask_ratio))
    Dd = plan.decoder_embed_dim
    full_enc = block_activation_bytes(1 + K, cfg.embed_dim, cfg.mlp_dim, cfg.num_heads, c)
    full_dec = block_activation_bytes(1 + L, Dd, 4 * Dd, plan.decoder_num_heads, c)
    every = checkpoint_every(plan.ac)
    # fsdp_setup checkpoints Block i of the encoder-then-decoder list when (i + 1) % every == 0.
    checkpointed = [every > 0 and (i + 1) % every == 0 for i in range(sizes.encoder_depth + sizes.decoder_depth)]
    blocks = 0
    for i, ckpt in enumerate(checkpointed):
        tokens, dim, full = (1 + K, cfg.embed_dim, full_enc) if i < sizes.encoder_depth else (1 + L, Dd, full_dec)
        blocks += c * tokens * dim if ckpt else full  # a checkpointed Block keeps only its input
    patch_dim = cfg.patch_size**2 * cfg.in_chans
    outside = (4 + c) * cfg.in_chans * cfg.img_size**2  # the fp32 batch and its compute-dtype copy
    outside += 2 * c * (1 + K) * cfg.embed_dim + 2 * c * (1 + L) * Dd  # norm + embed / norm + pred inputs
    outside += 3 * 4 * L * patch_dim  # fp32 prediction, target, difference of the loss
    working = max(full_enc, full_dec) * (2 if every else 1)  # recomputed Block + its gradients
    return plan.batch_size * (blocks + outside + working)


def layouts(world: int) -> list[tuple[str, int]]:
    """Every (strategy, shard group size) the planner compares; hybrid groups are powers of 2 dividing world."""
    rows = [("ddp", 1), ("no_shard", 1), ("full_shard", world), ("shard_grad_op", world)]
    k = 1
    while k <= world:
        if world % k == 0:
            rows.append(("hybrid_shard", k))
        k *= 2
    return rows


def layout_estimate(plan: PlanConfig, strategy: str, shard_group_size: int, sizes: ModelSizes) -> dict:
    """Predicted peak memory (GiB, by component) and communication (GiB/step) of one GPU."""
    c, r = PRECISION_BYTES[plan.mixed_precision]
    P, s, n = sizes.params, shard_group_size, plan.gpus
    P_b = max(sizes.encoder_block, sizes.decoder_block)
    replicas = n // s
    ring = lambda m: (m - 1) / m  # noqa: E731  ring collective: each GPU moves (m-1)/m of the data
    # Shard groups are consecutive ranks (inside a node when s <= gpus_per_node); replica groups are
    # strided, so they leave the node as soon as the world does.
    shard_spans_nodes = s > plan.gpus_per_node
    replica_spans_nodes = n > plan.gpus_per_node and replicas > 1
    if strategy == "ddp":
        params, grads, optimizer = 4 * P, 4 * P, 8 * P
        # autocast's bf16 weight copies: cached through forward, saved for backward, freed as it goes.
        gathered, gathered_released = (c * P if c < 4 else 0), True
        buffers = 4 * P  # DDP's gradient buckets (a second copy of every fp32 grad)
        gathers = 0
        collectives = [(2 * ring(n) * P * 4, n > plan.gpus_per_node)]  # all-reduce of the fp32 grads
    else:
        params, grads, optimizer = 4 * P / s, 4 * P / s, 8 * P / s
        keeps_all = strategy in ("shard_grad_op", "no_shard")  # reshard_after_forward=False
        # Kept Blocks are resharded one by one in backward; else two Blocks are unsharded at any time.
        gathered, gathered_released = (c * P, True) if keeps_all else (c * 2 * P_b, False)
        buffers = c * P_b + c * P_b + r * P_b + 2 * r * P_b
        gathers = 1 if keeps_all else 2  # forward, and again in backward when resharded after forward
        collectives = [
            (gathers * ring(s) * c * P, shard_spans_nodes),  # all-gather params
            (ring(s) * r * P, shard_spans_nodes),  # reduce-scatter grads
            (2 * ring(replicas) * r * P / s, replica_spans_nodes),  # all-reduce grad shards across replicas
        ]
    activations = activation_bytes(plan, sizes)
    # train.py frees the grads after each step (zero_grad(set_to_none=True)); backward creates each Block's
    # grads as it frees that Block's activations (and kept params), so the peak holds the larger side.
    released = activations + (gathered if gathered_released else 0)
    # CPU offload (FSDP only): the fp32 shards live in host memory; each all-gather first copies the
    # param shard to the GPU, each reduce-scatter sends the grad shard back, AdamW steps on the CPU.
    offload = plan.cpu_offload and strategy != "ddp"
    host, host_copies = (params + grads + optimizer, (gathers + 1) * 4 * P / s) if offload else (0, 0)
    on_gpu = 0 if offload else params + optimizer
    peak = on_gpu + max(0 if offload else grads, released) + (0 if gathered_released else gathered) + buffers
    parts = dict(params=params, grads=grads, optimizer=optimizer, gathered=gathered, buffers=buffers,
                 activations=activations)
    parts = {k: v / GiB for k, v in parts.items()}
    parts["overhead"] = RUNTIME_OVERHEAD_GIB
    mem = peak / GiB + RUNTIME_OVERHEAD_GIB
    return dict(strategy=strategy, shard_group_size=s, mem_gib=mem,
                comm_gib_per_step=sum(b for b, _ in collectives) / GiB,
                internode_gib_per_step=sum(b for b, spans in collectives if spans) / GiB,
                fits=mem <= plan.gpu_mem_gib and (plan.host_mem_gib is None or
                                                  host / GiB * min(n, plan.gpus_per_node) <= plan.host_mem_gib),
                host_gib=host / GiB, host_copy_gib_per_step=host_copies / GiB,
                **{f"{k}_gib": v for k, v in parts.items()})


def plan_layouts(plan: PlanConfig) -> list[dict]:
    sizes = model_sizes(plan)
    return [layout_estimate(plan, strategy, s, sizes) for strategy, s in layouts(plan.gpus)]


def recommend(rows: list[dict], plan: PlanConfig) -> tuple[dict | None, str]:
    """The paper's rule: fits on one GPU -> hybrid 1 (pure data parallel); else the smallest shard
    group within a node that fits (shard inside the fast links, replicate across nodes); else shard
    across all GPUs, shard_grad_op first (one all-gather per step instead of two)."""
    hybrid = {row["shard_group_size"]: row for row in rows if row["strategy"] == "hybrid_shard"}
    for k in sorted(hybrid):
        if k <= plan.gpus_per_node and hybrid[k]["fits"]:
            why = "fits on one GPU: pure data parallel" if k == 1 else "smallest shard group within a node that fits"
            return hybrid[k], why
    for strategy in ("shard_grad_op", "full_shard"):
        row = next(row for row in rows if row["strategy"] == strategy)
        if row["fits"]:
            return row, "does not fit within one node's shard group: shard across all GPUs"
    return None, ("no layout fits: use --ac full, a smaller --batch-size, more GPUs, or GPUs with more memory")


def format_plan(rows: list[dict], plan: PlanConfig, best: dict | None, why: str) -> str:
    offload = ", CPU offload (params/grads/AdamW in host memory per GPU: host)" if plan.cpu_offload else ""
    head = (f"{plan.model}, {plan.gpus} GPUs ({plan.gpus_per_node}/node, {plan.gpu_mem_gib:g} GiB), batch "
            f"{plan.batch_size}/GPU, {plan.vit.img_size} px, mask {plan.mask_ratio}, ac {plan.ac}, {plan.mixed_precision}{offload}")
    cols = ["params", "grads", "optimizer", "gathered", "buffers", "activations", "overhead"]
    labels = ["params", "grads", "AdamW", "gather", "buffer", "activ", "other", "total", "comm", "inter"]
    labels += ["host"] if plan.cpu_offload else []
    lines = [head, "GiB per GPU; total = peak = params + AdamW + max(grads, activ [+ gather when kept]) + ...; "
                   "comm = GiB each GPU sends per step, inter = of it across nodes",
             f"{'layout':<18}" + "".join(f"{label:>8}" for label in labels) + "  fits"]
    for row in rows:
        name = row["strategy"] + (f" {row['shard_group_size']}" if row["strategy"] == "hybrid_shard" else "")
        mark = " <-" if row is best else ""
        lines.append(f"{name:<18}" + "".join(f"{row[c + '_gib']:>8.2f}" for c in cols)
                     + f"{row['mem_gib']:>8.2f}{row['comm_gib_per_step']:>8.1f}{row['internode_gib_per_step']:>8.1f}"
                     + (f"{row['host_gib']:>8.1f}" if plan.cpu_offload else "")
                     + f"  {'yes' if row['fits'] else 'no'}{mark}")
    if best is None:
        lines.append(f"recommended: none — {why}")
    else:
        flag = f" --shard-group-size {best['shard_group_size']}" if best["strategy"] == "hybrid_shard" else ""
        lines.append(f"recommended: --strategy {best['strategy']}{flag} ({why}; {best['mem_gib']:.1f} of "
                     f"{plan.gpu_mem_gib:g} GiB)")
    return "\n".join(lines)


def measured_check(paper_ac: str | None = None) -> list[dict]:
    """The planner against every measured peak in MEASURED_MEMORY_GIB; `paper_ac` overrides the
    paper's (inferred) activation checkpointing, to see what the other choice would predict."""
    rows = []
    for source, model, patch, strategy, s, world, batch, ac, measured in MEASURED_MEMORY_GIB:
        ac = paper_ac if paper_ac and source == PAPER else ac
        plan = PlanConfig(model=model, patch_size=patch, gpus=world, batch_size=batch, ac=ac)
        predicted = layout_estimate(plan, strategy, s, model_sizes(plan))["mem_gib"]
        rows.append(dict(source=source, model=f"{model}/{patch}", strategy=strategy, shard_group_size=s, gpus=world,
                         batch_size=batch, ac=ac, measured_gib=measured, predicted_gib=round(predicted, 2),
                         error=round(predicted / measured - 1, 3)))
    return rows


def cmd_plan(args) -> None:
    if args.check:
        rows = measured_check(args.ac if args.ac != "full" else None)
        if args.json:
            print(json.dumps(rows, indent=1))
            return
        print("| measured on | model/patch | layout | GPUs | batch | ac | measured GiB | predicted GiB | error |\n"
              "|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['source']} | {r['model']} | {r['strategy']} {r['shard_group_size']} | {r['gpus']} | "
                  f"{r['batch_size']} | {r['ac']} | {r['measured_gib']} | {r['predicted_gib']:.1f} | {r['error']:+.0%} |")
        return
    plan = PlanConfig(model=args.model, gpus=args.gpus, gpus_per_node=args.gpus_per_node, gpu_mem_gib=args.gpu_mem_gib,
                      batch_size=args.batch_size, ac=args.ac, mixed_precision=args.mixed_precision,
                      img_size=args.img_size, patch_size=args.patch_size, in_chans=args.in_chans,
                      mask_ratio=args.mask_ratio, cpu_offload=args.cpu_offload, host_mem_gib=args.host_mem_gib)
    rows = plan_layouts(plan)
    best, why = recommend(rows, plan)
    for row in rows:
        row["recommended"] = row is best
    print(json.dumps(rows, indent=1) if args.json else format_plan(rows, plan, best, why))


# ---------------------------------------------------------------------------------------------
# sweep: MAE training steps through train.py's own functions, timed
# ---------------------------------------------------------------------------------------------

# Per-GPU batch sizes of the original MAE measurements on an H100 (../shared/ANCHORS.md) and the paper's 32.
GPU_BATCH_SIZES = {"vit_base": 512, "vit_large": 256, "vit_huge": 128, "vit_1b": 128, "vit_3b": 64,
                   "vit_5b": 32, "vit_e": 32, "vit_15b": 32}
TABLE_COLUMNS = [("model", "model"), ("layout", "layout"), ("ac", "ac"), ("compile", "compile"), ("sdpa", "SDPA"),
                 ("batch_size", "batch/GPU"), ("status", "status"), ("img_per_s", "img/s"),
                 ("tflops_per_gpu", "TFLOP/s/GPU"), ("mfu", "MFU"), ("peak_mem_gib", "peak GiB"),
                 ("predicted_mem_gib", "plan GiB"), ("first_step_s", "1st step s"), ("energy_j_per_img", "J/img")]


class PowerMeter:
    """Mean power draw (W) of this rank's GPU over a window, sampled in the background.

    `nvidia-smi -lms` runs as one child process printing a sample every 100 ms (no Python in the
    loop to compete with the training thread); else torch.cuda.power_draw() (pynvml / amdsmi, if
    installed) in a thread; else no reading. H100 power.draw is itself a ~1 s average: time at least
    a few seconds for a meaningful number.
    """

    def __init__(self, device: torch.device):
        self.device, self.samples, self.stop_event, self.threads, self.proc = device, [], None, [], None
        self.smi = shutil.which("nvidia-smi") if device.type == "cuda" and not torch.version.hip else None
        self.torch_reader = False
        if device.type == "cuda" and self.smi is None:
            try:
                torch.cuda.power_draw(device)
                self.torch_reader = True
            except Exception:  # no pynvml / amdsmi: no power readings
                pass

    def smi_id(self) -> str:
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        return visible[self.device.index] if self.device.index < len(visible) else str(self.device.index)

    def start(self) -> None:
        self.samples, self.stop_event = [], threading.Event()
        if self.smi:
            cmd = [self.smi, f"--id={self.smi_id()}", "--query-gpu=power.draw", "--format=csv,noheader,nounits", "-lms", "100"]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.threads = [threading.Thread(target=self._read_smi, daemon=True)]
        elif self.torch_reader:
            self.threads = [threading.Thread(target=self._poll_torch, args=(self.stop_event,), daemon=True)]
        for thread in self.threads:
            thread.start()

    def _read_smi(self) -> None:
        for line in self.proc.stdout:
            try:
                self.samples.append(float(line.strip()))
            except ValueError:  # "[N/A]" on cards without a power sensor
                pass

    def _poll_torch(self, stop_event: threading.Event) -> None:
        while not stop_event.wait(0.1):
            self.samples.append(torch.cuda.power_draw(self.device) / 1e3)  # mW -> W

    def stop(self) -> float | None:
        if self.stop_event is None:
            return None
        self.stop_event, stop_event = None, self.stop_event
        stop_event.set()
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=5)
            self.proc = None
        for thread in self.threads:
            thread.join(timeout=5)
        return statistics.mean(self.samples) if self.samples else None


def parse_strategy(spec: str) -> tuple[str, int | None]:
    """'full_shard' -> ('full_shard', None); 'hybrid_shard:8' -> ('hybrid_shard', 8)."""
    name, _, group = spec.partition(":")
    if group and not group.isdigit():
        raise ValueError(f"--strategies entry {spec!r}: write hybrid_shard:K with an integer shard group size K")
    return name, int(group) if group else None


# Process-wide SDPA switches: `--sdpa cudnn` leaves only cuDNN and the math fallback enabled, so the
# whole model (encoder and decoder, eager or compiled) runs that kernel wherever it supports the shape.
SDPA_SWITCHES = {"flash": "enable_flash_sdp", "efficient": "enable_mem_efficient_sdp", "cudnn": "enable_cudnn_sdp"}


def apply_sdpa_choice(choice: str) -> None:
    for name, switch in SDPA_SWITCHES.items():
        getattr(torch.backends.cuda, switch)(choice in ("auto", name))


def sweep_configs(args, on_gpu: bool) -> list[train.TrainConfig]:
    """One train.TrainConfig per point of models x strategies x ac x compile x batch sizes."""
    models = args.models or (["vit_large", "vit_huge", "vit_1b", "vit_3b"] if on_gpu else ["vit_tiny"])
    strategies = args.strategies or ["no_shard"]
    acs = args.ac or (["none"] if on_gpu else ["none", "full"])
    compiles = [c == "on" for c in (args.compile or (["on"] if on_gpu else ["off"]))]
    # MAE's decoder (512 wide, 8 Blocks) on GPU; on CPU the demo's small one, else it dominates vit_tiny.
    decoder = {} if on_gpu else {k: train.DEMO_DEFAULTS[k] for k in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads")}
    decoder.update({k: getattr(args, k) for k in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads")
                    if getattr(args, k) is not None})
    base = train.TrainConfig(data="synthetic", steps=10**9, warmup_steps=1, lr=1e-4, workers=0, seed=0,
                             mixed_precision=args.mixed_precision, mask_ratio=args.mask_ratio,
                             img_size=args.img_size, in_chans=args.in_chans, **decoder)
    configs = []
    for model, spec, ac, compiled in itertools.product(models, strategies, acs, compiles):
        strategy, group = parse_strategy(spec)
        batch_sizes = args.batch_sizes or [GPU_BATCH_SIZES.get(model, 32) if on_gpu else 8]
        for batch_size in batch_sizes:
            configs.append(dataclasses.replace(base, model=model, strategy=strategy, shard_group_size=group,
                                               ac=ac, compile=compiled, batch_size=batch_size))
    return configs


def predicted_memory_gib(cfg: train.TrainConfig, dist: fsdp_setup.Dist) -> float | None:
    """The planner's prediction for this (already validated) configuration, beside the measured peak."""
    group = {"ddp": 1, "no_shard": 1, "hybrid_shard": cfg.shard_group_size}.get(cfg.strategy, dist.world_size)
    try:
        plan = PlanConfig(
            model=cfg.model, gpus=dist.world_size, gpus_per_node=int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size)),
            batch_size=cfg.batch_size, ac=cfg.ac, mixed_precision=train.resolve_mixed_precision(cfg.mixed_precision, dist.device),
            img_size=cfg.img_size, in_chans=cfg.in_chans or 3, mask_ratio=cfg.mask_ratio,
            decoder_embed_dim=cfg.decoder_embed_dim, decoder_depth=cfg.decoder_depth, decoder_num_heads=cfg.decoder_num_heads)
    except ValueError:  # e.g. an uneven number of GPUs per node: no prediction, but still a measurement
        return None
    return layout_estimate(plan, cfg.strategy, group, model_sizes(plan))["mem_gib"]


def profile_steps(step, count: int, path: str, device: torch.device) -> None:
    """Where the time goes: `count` more steps under torch.profiler, the top ops written to `path`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(count):
            step()
        synchronize(device)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write(f"{count} steps, sorted by {sort_by}\n")
        f.write(prof.key_averages().table(sort_by=sort_by, row_limit=40, max_name_column_width=70))


class ConfigRun:
    """One configuration: train.py's model and optimizer, a synthetic batch already on the device
    (the loader is not what is measured), stepped by train.train_step exactly as training does."""

    def __init__(self, cfg: train.TrainConfig, dist: fsdp_setup.Dist):
        self.cfg, self.dist = cfg, dist
        self.model = train.build_model(cfg, dist)
        self.optimizer = train.build_optimizer(self.model, cfg)
        self.mae = fsdp_setup.unwrap(self.model)
        vit = self.mae.cfg
        self.imgs = torch.randn(cfg.batch_size, vit.in_chans, vit.img_size, vit.img_size, device=dist.device)
        self.mask_generator = torch.Generator(dist.device).manual_seed(dist.rank)
        self.step_index, self.losses, self.timer, self.first_step_s = 0, [], StepTimer(dist.device), None

    def step(self) -> torch.Tensor:
        loss = train.train_step(self.model, self.optimizer, [self.imgs], self.cfg, self.step_index,
                                mask_generator=self.mask_generator)
        self.step_index += 1
        return loss

    def warm_up(self, steps: int) -> None:
        synchronize(self.dist.device)
        start = time.perf_counter()
        self.step().item()  # the host waits for the first step: compilation + first-touch allocations
        self.first_step_s = time.perf_counter() - start
        for _ in range(steps - 1):
            self.step()
        synchronize(self.dist.device)

    def timed_step(self) -> None:
        self.timer.start()
        self.losses.append(self.step())
        self.timer.stop()

    def result(self, watts: float | None = None, peak_memory: bool = True) -> dict:
        times = self.timer.step_times_s()  # synchronizes once
        if not torch.isfinite(torch.stack(self.losses)).all():
            raise RuntimeError(f"non-finite loss while benchmarking {self.cfg.model}: a bug, not a timing")
        dist = self.dist
        step_s = statistics.median(times)
        img_per_s = self.cfg.batch_size * dist.world_size / step_s
        tflops = img_per_s * 3 * self.mae.forward_flops_per_image(self.cfg.mask_ratio) / dist.world_size / 1e12
        _, peak = train.peak_tflops(dist.device)
        # Every rank reports its own GPU's power; energy per image counts all of them.
        all_watts = [watts]
        if dist.world_size > 1:
            all_watts = [None] * dist.world_size
            torch.distributed.all_gather_object(all_watts, watts)
        total_watts = sum(all_watts) if all(w is not None for w in all_watts) else None
        return dict(
            status="ok", img_per_s=img_per_s, tflops_per_gpu=tflops, mfu=tflops / peak if peak else None,
            peak_mem_gib=train.peak_memory_gib(dist.device) if peak_memory and dist.device.type == "cuda" else None,
            first_step_s=self.first_step_s, step_s_median=step_s, step_s_min=min(times),
            power_w=total_watts, energy_j_per_img=total_watts / img_per_s if total_watts else None,
            loss=self.losses[-1].item(),
        )


def measure(cfg: train.TrainConfig, dist: fsdp_setup.Dist, args, power: PowerMeter, profile_path: str | None) -> dict:
    """Build, warm up (the first step includes compilation), time `args.steps` steps. Raises on OOM."""
    run = ConfigRun(cfg, dist)
    run.warm_up(args.warmup)
    if dist.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dist.device)  # steady state: optimizer state exists by now
    power.start()
    for _ in range(args.steps):
        run.timed_step()
    synchronize(dist.device)
    watts = power.stop()
    result = run.result(watts)
    if profile_path and dist.is_main:
        profile_steps(run.step, 3, profile_path, dist.device)
    elif profile_path:  # the other ranks take the same steps, unprofiled, so collectives match
        for _ in range(3):
            run.step()
    return result


def describe(cfg: train.TrainConfig, sdpa: str, dist: fsdp_setup.Dist, args) -> dict:
    layout = cfg.strategy + (f":{cfg.shard_group_size}" if cfg.shard_group_size else "")
    return dict(model=cfg.model, layout=layout, ac=cfg.ac, compile="on" if cfg.compile else "off", sdpa=sdpa,
                batch_size=cfg.batch_size, world_size=dist.world_size, device=device_name(dist.device),
                mixed_precision=train.resolve_mixed_precision(cfg.mixed_precision, dist.device),
                torch=torch.__version__, steps=args.steps, warmup=args.warmup)


def check_config(cfg: train.TrainConfig, row: dict, dist: fsdp_setup.Dist) -> dict | None:
    """None if the configuration can run, else its row saying why (the same on every rank: no hang)."""
    try:
        train.validate(cfg, dist.world_size, dist.device)
        row["predicted_mem_gib"] = predicted_memory_gib(cfg, dist)
    except ValueError as err:
        return {**row, "status": f"invalid: {err}"}
    return None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_one(cfg: train.TrainConfig, sdpa: str, dist: fsdp_setup.Dist, args, power: PowerMeter) -> dict:
    row = describe(cfg, sdpa, dist, args)
    invalid = check_config(cfg, row, dist)
    if invalid:
        return invalid
    torch.compiler.reset()  # each configuration compiles afresh (no recompiles with dynamic shapes)
    apply_sdpa_choice(sdpa)
    if dist.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dist.device)
    profile_path = None
    if args.profile and args.out:
        profile_path = os.path.join(args.out, f"profile-{cfg.model}-{row['layout'].replace(':', '')}-ac{cfg.ac}-"
                                              f"{'compiled' if cfg.compile else 'eager'}-sdpa{sdpa}-b{cfg.batch_size}.txt")
    try:
        result = measure(cfg, dist, args, power, profile_path)
    except torch.OutOfMemoryError:
        # Every rank runs the same shapes, so all ranks run out together. The model and the
        # traceback's frames are gone once this handler ends, before the next configuration allocates.
        result = dict(status="oom", peak_mem_gib=train.peak_memory_gib(dist.device) if dist.device.type == "cuda" else None)
    finally:
        power.stop()  # no-op unless an error left the meter running
        free_memory(dist.device)
    return {**row, **result}


def run_interleaved(configs: list[train.TrainConfig], sdpa: str, dist: fsdp_setup.Dist, args) -> list[dict]:
    """All configurations at once, their timed steps taken in turn (A B C A B C ...): load from other
    processes on a shared machine then slows all alike, so their ratios hold. Holds every model at
    once (small models only); reports no peak memory or energy, which would be shared."""
    rows, runnable = [], []
    for cfg in configs:
        row = describe(cfg, sdpa, dist, args)
        invalid = check_config(cfg, row, dist)
        rows.append(invalid or row)
        if not invalid:
            runnable.append((len(rows) - 1, cfg))
    torch.compiler.reset()
    apply_sdpa_choice(sdpa)
    try:
        runs = [(i, ConfigRun(cfg, dist)) for i, cfg in runnable]
        for _, run in runs:
            run.warm_up(args.warmup)
        for _ in range(args.steps):
            for _, run in runs:
                run.timed_step()
        for i, run in runs:
            rows[i] = {**rows[i], **run.result(peak_memory=False)}
    except torch.OutOfMemoryError:
        runs = []
        for i, _ in runnable:
            rows[i] = {**rows[i], "status": "oom"}
    finally:
        runs = []
        free_memory(dist.device)
    return rows


def markdown_table(rows: list[dict]) -> str:
    def cell(value):
        if value is None:
            return "–"
        if isinstance(value, float):
            return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
        return str(value) if len(str(value)) <= 40 else str(value)[:39] + "…"  # full text in the JSON

    lines = ["| " + " | ".join(label for _, label in TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(cell(row.get(key)) for key, _ in TABLE_COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def cmd_sweep(args) -> list[dict]:
    for choice in args.sdpa:
        if choice not in ("auto", "math", *SDPA_SWITCHES):
            raise ValueError(f"--sdpa must be auto, math or one of {', '.join(SDPA_SWITCHES)}, got {choice!r}")
    if args.interleave and len(args.sdpa) > 1:
        raise ValueError("--interleave takes one --sdpa choice (the switch is process-wide)")
    if args.steps < 1 or args.warmup < 1:
        raise ValueError(f"--steps and --warmup must be >= 1 (the first warm-up step compiles), got {args.steps}, {args.warmup}")
    dist = fsdp_setup.init_distributed()
    try:
        configs = sweep_configs(args, dist.device.type == "cuda")
        if args.mem_cap_gib and dist.device.type == "cuda":
            # E.g. "does it train on an 80 GB H100?" asked on a 141 GB H200: the allocator refuses beyond the cap.
            total = torch.cuda.get_device_properties(dist.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.mem_cap_gib * GiB / total), dist.device)
        power = PowerMeter(dist.device)
        rows = []
        if dist.is_main and args.out:
            os.makedirs(args.out, exist_ok=True)
            open(os.path.join(args.out, "bench.jsonl"), "w").close()
        if args.interleave:
            pending = iter(run_interleaved(configs, args.sdpa[0], dist, args))
            next_row = lambda cfg, sdpa: next(pending)  # noqa: E731
        else:
            next_row = lambda cfg, sdpa: run_one(cfg, sdpa, dist, args, power)  # noqa: E731
        for cfg, sdpa in itertools.product(configs, args.sdpa):
            row = next_row(cfg, sdpa)
            rows.append(row)
            if dist.is_main:
                print(json.dumps(row), flush=True)
                if args.out:  # row by row, so a sweep cut short by a time limit keeps what it measured
                    with open(os.path.join(args.out, "bench.jsonl"), "a") as f:
                        f.write(json.dumps(row) + "\n")
        if dist.is_main:
            head = (f"{device_name(dist.device)} x {dist.world_size}, torch {torch.__version__}, "
                    f"{args.steps} timed steps (median) after {args.warmup} warm-up"
                    f"{', interleaved' if args.interleave else ''}, synthetic data on the device")
            table = markdown_table(rows)
            print(f"\n{head}\n\n{table}")
            if args.out:
                write_json(os.path.join(args.out, "bench.json"), rows)
                with open(os.path.join(args.out, "bench.md"), "w") as f:
                    f.write(f"{head}\n\n{table}\n")
        return rows
    finally:
        fsdp_setup.cleanup()


# ---------------------------------------------------------------------------------------------
# sdpa: which attention kernel is fastest at MAE's (short) sequence lengths on this card
# ---------------------------------------------------------------------------------------------

# (model, batch per GPU): the encoder sees 1 + L/4 tokens, the decoder 1 + L at 16 heads of 32.
SDPA_DEFAULT_SHAPES = [("vit_large", 256), ("vit_huge", 256), ("vit_1b", 128), ("vit_3b", 64)]


def mae_attention_shapes(model: str, batch_size: int, mask_ratio: float = 0.75) -> list[tuple[str, tuple]]:
    """[(label, (B, H, N, head_dim))] of the encoder's and the decoder's attention calls."""
    cfg = get_config(model)
    L = cfg.num_patches
    K = int(L * (1 - mask_ratio))
    return [(f"{model} encoder", (batch_size, cfg.num_heads, 1 + K, cfg.embed_dim // cfg.num_heads)),
            (f"{model} decoder", (batch_size, 16, 1 + L, 512 // 16))]


def time_attention(shape: tuple, backend, device: torch.device, dtype: torch.dtype, iters: int) -> float | None:
    """Median ms of one forward + backward of SDPA on q, k, v laid out as vit.Attention makes them
    (views of one fused qkv tensor), or None if the backend cannot run this shape/dtype/device."""
    from torch.nn.attention import sdpa_kernel

    B, H, N, d = shape
    qkv = torch.randn(B, N, 3, H, d, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(B, H, N, d, device=device, dtype=dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)

    def forward_backward():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        torch.autograd.grad(out, qkv, grad_out)

    timer = StepTimer(device)
    try:
        with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
            for _ in range(3):  # warm-up: kernel selection, autotuning
                forward_backward()
            for _ in range(iters):
                timer.start()
                forward_backward()
                timer.stop()
            return statistics.median(timer.step_times_s()) * 1e3
    except RuntimeError:  # "No available kernel": this backend does not support the inputs
        return None


def cmd_sdpa(args) -> list[dict]:
    from torch.nn.attention import SDPBackend

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backends = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    if args.shapes:
        parts = [spec.split("x") for spec in args.shapes]
        if not all(len(p) == 4 and all(x.isdigit() for x in p) for p in parts):
            raise ValueError(f"--shapes takes BxHxNxd, e.g. 256x16x50x64, got {' '.join(args.shapes)}")
        shapes = [("", tuple(int(x) for x in p)) for p in parts]
    else:
        shapes = [shape for model, batch in SDPA_DEFAULT_SHAPES for shape in mae_attention_shapes(model, batch)]
    print(f"SDPA forward+backward, median ms of {args.iters}, {device_name(device)}, {dtype}, torch {torch.__version__}")
    print("| shape (B×H×N×d) | " + " | ".join(backends) + " | fastest |\n|---|" + "---|" * (len(backends) + 1))
    rows = []
    for label, shape in shapes:
        ms = {name: time_attention(shape, backend, device, dtype, args.iters) for name, backend in backends.items()}
        timed = {k: v for k, v in ms.items() if v is not None and k != "default"}
        fastest = min(timed, key=timed.get) if timed else None
        rows.append(dict(label=label, shape=list(shape), ms=ms, fastest=fastest))
        cells = " | ".join("n/a" if v is None else f"{v:.2f}" for v in ms.values())
        print(f"| {label} {'×'.join(map(str, shape))} | {cells} | {fastest} |", flush=True)
    if args.out:
        write_json(os.path.join(args.out, "sdpa.json"), rows)
    return rows


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        argv = ["sweep"] + argv  # `python bench.py` = the default sweep
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="predict per-GPU memory and communication of every layout")
    p.add_argument("--model", default="vit_15b")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-mem-gib", type=float, default=80.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--ac", default="full", help="none | full | k (checkpoint every k-th Block)")
    p.add_argument("--mixed-precision", default="bf16", choices=list(PRECISION_BYTES))
    p.add_argument("--img-size", type=int, default=None, help="default: the model config's (224)")
    p.add_argument("--patch-size", type=int, default=None, help="default: the model config's")
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--cpu-offload", action="store_true", help="FSDP2 CPU offload of params, grads and AdamW state")
    p.add_argument("--host-mem-gib", type=float, default=None, help="host memory per node, checked with --cpu-offload")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of the table")
    p.add_argument("--check", action="store_true",
                   help="compare with measured peaks (the paper's, the original MAE's on an H100) instead")
    p = sub.add_parser("sweep", help="time MAE training steps (train.py's code) for each configuration")
    p.add_argument("--models", nargs="*", default=None, help="default: vit_large vit_huge vit_1b vit_3b on GPU, vit_tiny on CPU")
    p.add_argument("--strategies", nargs="*", default=None, help="layouts, hybrid as hybrid_shard:K (default: no_shard)")
    p.add_argument("--ac", nargs="*", default=None, help="none | full | k each (default: none on GPU, none full on CPU)")
    p.add_argument("--compile", nargs="*", default=None, choices=["off", "on"], help="default: on on GPU, off on CPU")
    p.add_argument("--batch-sizes", nargs="*", type=int, default=None, help="per GPU (default: per model, 8 on CPU)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first; the first one is reported apart")
    p.add_argument("--mixed-precision", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | bf16 | bf16-reduce | fp32")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--in-chans", type=int, default=None)
    p.add_argument("--decoder-embed-dim", type=int, default=None, help="default: 512 on GPU (MAE), 64 on CPU (demo)")
    p.add_argument("--decoder-depth", type=int, default=None, help="default: 8 on GPU, 2 on CPU")
    p.add_argument("--decoder-num-heads", type=int, default=None, help="default: 16 on GPU, 4 on CPU")
    p.add_argument("--sdpa", nargs="*", default=["auto"], help="attention kernel(s): auto (torch's choice) | "
                   "flash | efficient | cudnn (that one, math as fallback) | math, e.g. the fastest of `bench.py sdpa`")
    p.add_argument("--mem-cap-gib", type=float, default=None, help="let the allocator use at most this much GPU memory")
    p.add_argument("--profile", action="store_true", help="profile 3 more steps per configuration into --out")
    p.add_argument("--interleave", action="store_true", help="build all configurations, time their steps in "
                   "turn: fair ratios on a shared machine (small models; no memory or energy)")
    p.add_argument("--out", default=None, help="folder for bench.json, bench.jsonl (row by row) and bench.md")
    p = sub.add_parser("sdpa", help="time each SDPA backend at MAE's attention shapes")
    p.add_argument("--shapes", nargs="*", default=None, help="BxHxNxd, e.g. 256x16x50x64 (default: MAE's shapes)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=None, help="folder for sdpa.json")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    command = {"plan": cmd_plan, "sdpa": cmd_sdpa, "sweep": cmd_sweep}[args.command]
    return command(args)


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:  # a bad flag or layout: the message, not a traceback
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
