"""plan.py — the memory/layout planner for geofm: which sharding layout fits, and what it costs.

    python tools/plan.py --model vit_15b --gpus 1024 --gpus-per-node 8 --gpu-mem-gib 64 [--json]
    python tools/plan.py --model vit_5b --gpus 1 --cpu-offload --host-mem-gib 120
    python tools/plan.py --check                 # the model against measured peaks (paper, H100)

The planner needs no device and runs nothing: it predicts the peak memory and the communication of
one GPU for every layout (ddp, no_shard, full_shard, shard_grad_op, and hybrid_shard with each
power-of-2 shard group dividing the world), then recommends one with the paper's rule: fits on one
GPU -> hybrid_shard 1; else the smallest shard group within a node that fits; else shard_grad_op,
then full_shard. Parameter counts come from the real MAE built on the meta device. tools/bench.py's
sweep prints this prediction ("plan GiB") beside each measured peak; `--check` compares it with the
measured peaks in MEASURED_MEMORY_GIB.

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
              decoder Blocks on 1 + L. A checkpointed Block keeps only its input (D). Backward adds
              about one Block of gradients in flight, and with checkpointing one Block recomputed.
              Outside the Blocks: the image (fp32 batch + compute-dtype copy), norm/embed/pred inputs,
              the fp32 loss terms.
  overhead    RUNTIME_OVERHEAD_GIB, one constant: allocator fragmentation, the collectives' workspaces
              and the CUDA/ROCm context, fitted to measured peaks (BENCHMARKS.md).

  peak = params + AdamW + max(grads, activations [+ gathered if kept]) + [gathered if not kept]
         + buffers + overhead
Backward creates each Block's grads as it frees that Block's activations (and, when kept, its unsharded
params), so the grads and the saved activations never peak together: the larger side counts.
With --cpu-offload (FSDP only) the fp32 params, grads and AdamW state live in host memory ("host", checked
per node against --host-mem-gib): the GPU holds gathered + buffers + activations + overhead, and each
all-gather first copies the param shard up, each reduce-scatter the grad shard back down. Not modelled:
params and grads are pinned, and pinned blocks round each tensor up to a power of two (~+15% on those
two for vit_5b); with --accum-steps > 1 FSDP2 keeps every unsharded gradient on the GPU between
micro-steps (sync off), which undoes most of the GPU saving.

DDP keeps full fp32 params and DDP's gradient buckets (4 bytes/param each; fsdp_setup sets
gradient_as_bucket_view, so the grads are views into the buckets, no second copy at --accum-steps 1;
non-final micro-steps of accumulation keep their own grads), AdamW state, and the bf16 weight copies
autocast keeps through forward. Communication per GPU per step uses ring collectives:
an all-gather or reduce-scatter of X bytes over n GPUs moves (n−1)/n·X per GPU, an all-reduce twice that.
FSDP gathers params in forward and, when resharded after forward (full_shard, hybrid), again in backward
(fsdp_setup keeps the last decoder Block gathered, ~1% of a ViT-L MAE's parameters: not modelled);
grads are reduce-scattered in the shard group, then (hybrid) all-reduced across the world/s replicas.
Collectives whose group spans nodes are also counted apart ("inter"): that is what the paper's rule avoids.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass

# `python tools/plan.py` puts tools/ on sys.path, not the repository root where vit, mae and
# fsdp_setup live: add it, so the script runs from any working directory.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# vit, mae and fsdp_setup (all torch) are imported inside the functions that need them: importing
# plan costs nothing, and bench.py, which imports it, has them loaded already.

GiB = 2**30
# The one fitted constant: least squares (relative error) over the 18 measurements below. Without it the
# residuals are 1.4–2.2 GiB for the paper's FSDP runs (1 to 1,024 GCDs alike), -0.3–1.3 GiB for the H100
# runs (allocated memory only, no context), and 13 GiB for FSDP1's NO_SHARD (see BENCHMARKS.md).
RUNTIME_OVERHEAD_GIB = 1.5
# Measured peak memory per GPU to check the model against: (source, model, patch, strategy, shard group,
# world size, batch per GPU, activation checkpointing, GiB). The paper (FSDP1 on MI250X GCDs, 224 px) says
# GB, but its sharded part scales as exactly 16 bytes/param in GiB, so GiB. Whether it checkpointed is not
# stated: its numbers only fit with checkpointing (BENCHMARKS.md). The original MAE code (one H100, bf16
# autocast, no sharding, no checkpointing; docs/paper.md) checks the activation model alone.
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
        from fsdp_setup import checkpoint_every
        from vit import get_config

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
    import torch
    from mae import MaskedAutoencoder

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
    from fsdp_setup import checkpoint_every

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
        params, grads, optimizer = 4 * P, 0, 8 * P  # grads: views into the buckets below
        # autocast's bf16 weight copies: cached through forward, saved for backward, freed as it goes.
        gathered, gathered_released = (c * P if c < 4 else 0), True
        buffers = 4 * P  # DDP's gradient buckets, allocated for the whole run
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
    rows = layouts(plan.gpus)
    if plan.cpu_offload:  # train.py refuses ddp with --cpu-offload: DDP has nothing to offload
        rows = [(strategy, s) for strategy, s in rows if strategy != "ddp"]
    return [layout_estimate(plan, strategy, s, sizes) for strategy, s in rows]


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
    total = ("total = GPU peak = gather + buffer + activ + other; params, grads, AdamW are in host memory (host)"
             if plan.cpu_offload else "total = peak = params + AdamW + max(grads, activ [+ gather when kept]) + ...")
    lines = [head, f"GiB per GPU; {total}; comm = GiB each GPU sends per step, inter = of it across nodes",
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


# ---------------------------------------------------------------------------------------------
# command line: every flag is a PlanConfig field, with the dataclass's default (one place for them)
# ---------------------------------------------------------------------------------------------


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    default = {field.name: field.default for field in dataclasses.fields(PlanConfig)}
    p.add_argument("--model", default=default["model"])
    p.add_argument("--gpus", type=int, default=default["gpus"], help="world size")
    p.add_argument("--gpus-per-node", type=int, default=default["gpus_per_node"])
    p.add_argument("--gpu-mem-gib", type=float, default=default["gpu_mem_gib"], help="usable memory of one GPU")
    p.add_argument("--batch-size", type=int, default=default["batch_size"], help="images per GPU per step")
    p.add_argument("--ac", default=default["ac"], help="none | full | k (checkpoint every k-th Block)")
    p.add_argument("--mixed-precision", default=default["mixed_precision"], choices=list(PRECISION_BYTES))
    p.add_argument("--img-size", type=int, default=default["img_size"], help="default: the model config's (224)")
    p.add_argument("--patch-size", type=int, default=default["patch_size"], help="default: the model config's")
    p.add_argument("--in-chans", type=int, default=default["in_chans"])
    p.add_argument("--mask-ratio", type=float, default=default["mask_ratio"])
    p.add_argument("--cpu-offload", action="store_true", default=default["cpu_offload"],
                   help="FSDP2 CPU offload of params, grads and AdamW state")
    p.add_argument("--host-mem-gib", type=float, default=default["host_mem_gib"],
                   help="host memory per node, checked with --cpu-offload")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of the table")
    p.add_argument("--check", action="store_true",
                   help="compare with measured peaks (the paper's, the original MAE's on an H100) instead")


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
    plan = PlanConfig(**{field.name: getattr(args, field.name) for field in dataclasses.fields(PlanConfig)
                         if hasattr(args, field.name)})  # the decoder keeps MAE's (no flags)
    rows = plan_layouts(plan)
    best, why = recommend(rows, plan)
    for row in rows:
        row["recommended"] = row is best
    print(json.dumps(rows, indent=1) if args.json else format_plan(rows, plan, best, why))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_plan_arguments(parser)
    cmd_plan(parser.parse_args(argv))


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:  # a bad flag or layout: the message, not a traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
