"""bench.py — throughput sweep, memory/layout planner and SDPA micro-benchmark for geofm.

Three subcommands:

    python bench.py plan --model vit_15b --gpus 1024 --gpus-per-node 8 --gpu-mem-gib 64 [--json]
    python bench.py [sweep] --models vit_large --strategies full_shard --batch-sizes 256 --out runs/bench
    torchrun --nproc_per_node=8 bench.py sweep --models vit_3b --strategies hybrid_shard:1 hybrid_shard:8
    python bench.py sdpa                       # fastest attention kernel at MAE's shapes on this card

`plan` needs no device: it predicts per-GPU memory and communication for every layout and picks one.
`sweep` times MAE training steps through train.py's own functions (build_model, build_optimizer,
train_step) on synthetic data already on the device, so what it measures is what train.py runs.

The memory model (per GPU, bytes; P = all MAE parameters, P_b = the largest Block, s = shard group,
c = compute bytes (2 for bf16), r = gradient-reduction bytes (4: fp32 reduce, 2: bf16-reduce)):

  state       16·P/s        fp32 master params 4 + fp32 grads 4 + AdamW exp_avg, exp_avg_sq 8, sharded
  gathered    c·2·P_b       full_shard / hybrid: the current Block and the prefetched next one
              c·P           shard_grad_op / no_shard: every Block stays unsharded from forward to backward
  buffers     c·P_b + c·P_b + 2·r·P_b   all-gather output before copy-out, unsharded grads of one Block,
                                        two reduce-scatter inputs in flight (one reducing, one filling)
  activations per Block and token (c bytes each unless said): LayerNorm inputs 2·D, qkv input D,
              q, k, v 3·D, attention output D and its (B, L, D) copy for proj D, fc1 input D,
              GELU input M, fc2 input M = 9·D + 2·M, + LayerNorm mean/rstd 2·2 fp32, + logsumexp H fp32.
              Flash / memory-efficient / cuDNN SDPA keep only O(N) per head (no N×N matrix); the math
              backend would add the (H, N, N) probabilities. Encoder Blocks run on 1 + K visible tokens,
              decoder Blocks on 1 + L. A checkpointed Block keeps only its input (D); backward then adds
              one Block recomputed plus about one Block of gradients in flight. Outside the Blocks: the
              image (fp32 batch + compute-dtype copy), norm/embed/pred inputs, the fp32 loss terms.
  overhead    RUNTIME_OVERHEAD_GIB, one constant: allocator fragmentation, the collectives' workspaces
              and the CUDA/ROCm context. Calibrated on the paper's 13 measurements (BENCHMARKS.md).

DDP keeps full fp32 params, grads and DDP's gradient buckets (4 bytes/param each), AdamW state, and the
bf16 weight copies autocast keeps through forward. Communication per GPU per step uses ring collectives:
an all-gather or reduce-scatter of X bytes over n GPUs moves (n−1)/n·X per GPU, an all-reduce twice that.
FSDP gathers params in forward and, when resharded after forward (full_shard, hybrid), again in backward;
grads are reduce-scattered in the shard group, then (hybrid) all-reduced across the world/s replicas.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass

import torch

from mae import MaskedAutoencoder
from vit import get_config

GiB = 2**30
# The one fitted constant: the least-squares fit (relative error) of the 13 memory measurements below,
# activation checkpointing on. Their residuals without it are 0.7–1.2 GiB within 1–2 nodes and 1.7–3.2 GiB
# at 1,024 GCDs (reduce-scatters queueing behind slow collectives, not modelled); FSDP1's NO_SHARD: 8.2.
RUNTIME_OVERHEAD_GIB = 1.7
# Peak memory per MI250X GCD measured by the paper (GB there; their sharded part scales as exactly
# 16 bytes/param in GiB, so GiB): (model, strategy, shard group, world size, GiB). Batch 32, 224 px.
PAPER_MEMORY_GIB = [
    ("vit_3b", "no_shard", 1, 8, 61.7), ("vit_3b", "hybrid_shard", 2, 8, 26.3),
    ("vit_3b", "full_shard", 8, 8, 8.95), ("vit_3b", "full_shard", 1024, 1024, 4.08),
    ("vit_5b", "hybrid_shard", 2, 16, 43.6), ("vit_5b", "hybrid_shard", 4, 16, 23.5),
    ("vit_5b", "hybrid_shard", 8, 16, 13.4), ("vit_5b", "hybrid_shard", 16, 16, 8.4),
    ("vit_5b", "full_shard", 1024, 1024, 4.5),
    ("vit_15b", "hybrid_shard", 4, 16, 61.7), ("vit_15b", "hybrid_shard", 8, 16, 34.9),
    ("vit_15b", "hybrid_shard", 16, 16, 21.2), ("vit_15b", "full_shard", 1024, 1024, 9.8),
]
STRATEGIES = ("ddp", "no_shard", "full_shard", "shard_grad_op", "hybrid_shard")
PRECISION_BYTES = {"bf16": (2, 4), "bf16-reduce": (2, 2), "fp32": (4, 4)}  # (compute c, reduce r)


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
    img_size: int | None = None  # None: the model config's (224 for the paper's models)
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
        self.vit = get_config(self.model, in_chans=self.in_chans, **({"img_size": self.img_size} if self.img_size else {}))


def checkpoint_every(ac: str | int) -> int:
    """0 = no checkpointing, 1 = every Block ("full"), k = every k-th Block."""
    if ac in ("none", 0, "0"):
        return 0
    if ac == "full":
        return 1
    try:
        k = int(ac)
    except (TypeError, ValueError):
        k = -1
    if k < 1:
        raise ValueError(f"activation checkpointing must be 'none', 'full' or a positive integer k, got {ac!r}")
    return k


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

    def saved(depth: int, full: int, block_input: int) -> int:
        checkpointed = depth // every if every else 0
        return checkpointed * block_input + (depth - checkpointed) * full

    blocks = saved(sizes.encoder_depth, full_enc, c * (1 + K) * cfg.embed_dim)
    blocks += saved(sizes.decoder_depth, full_dec, c * (1 + L) * Dd)
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
        gathered = c * P if c < 4 else 0  # autocast's bf16 weight copies, alive from forward to backward
        buffers = 4 * P  # DDP's gradient buckets (a second copy of every fp32 grad)
        collectives = [(2 * ring(n) * P * 4, n > plan.gpus_per_node)]  # all-reduce of the fp32 grads
    else:
        params, grads, optimizer = 4 * P / s, 4 * P / s, 8 * P / s
        keeps_all = strategy in ("shard_grad_op", "no_shard")  # reshard_after_forward=False
        gathered = c * P if keeps_all else c * 2 * P_b
        buffers = c * P_b + c * P_b + 2 * r * P_b
        gathers = 1 if keeps_all else 2  # forward, and again in backward when resharded after forward
        collectives = [
            (gathers * ring(s) * c * P, shard_spans_nodes),  # all-gather params
            (ring(s) * r * P, shard_spans_nodes),  # reduce-scatter grads
            (2 * ring(replicas) * r * P / s, replica_spans_nodes),  # all-reduce grad shards across replicas
        ]
    activations = activation_bytes(plan, sizes)
    parts = dict(params=params, grads=grads, optimizer=optimizer, gathered=gathered, buffers=buffers,
                 activations=activations)
    parts = {k: v / GiB for k, v in parts.items()}
    parts["overhead"] = RUNTIME_OVERHEAD_GIB
    mem = sum(parts.values())
    return dict(strategy=strategy, shard_group_size=s, mem_gib=mem,
                comm_gib_per_step=sum(b for b, _ in collectives) / GiB,
                internode_gib_per_step=sum(b for b, spans in collectives if spans) / GiB,
                fits=mem <= plan.gpu_mem_gib, **{f"{k}_gib": v for k, v in parts.items()})


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
            why = "fits on one GPU: pure data parallel" if k == 1 else f"smallest shard group within a node that fits"
            return hybrid[k], why
    for strategy in ("shard_grad_op", "full_shard"):
        row = next(row for row in rows if row["strategy"] == strategy)
        if row["fits"]:
            return row, "does not fit within one node's shard group: shard across all GPUs"
    return None, ("no layout fits: use --ac full, a smaller --batch-size, more GPUs, or GPUs with more memory")


def format_plan(rows: list[dict], plan: PlanConfig, best: dict | None, why: str) -> str:
    head = (f"{plan.model}, {plan.gpus} GPUs ({plan.gpus_per_node}/node, {plan.gpu_mem_gib:g} GiB), batch "
            f"{plan.batch_size}/GPU, {plan.vit.img_size} px, mask {plan.mask_ratio}, ac {plan.ac}, {plan.mixed_precision}")
    cols = ["params", "grads", "optimizer", "gathered", "buffers", "activations", "overhead"]
    labels = ["params", "grads", "AdamW", "gather", "buffer", "activ", "other", "total", "comm", "inter"]
    lines = [head, "GiB per GPU; comm = GiB each GPU sends per step, inter = of it across nodes",
             f"{'layout':<18}" + "".join(f"{label:>8}" for label in labels) + "  fits"]
    for row in rows:
        name = row["strategy"] + (f" {row['shard_group_size']}" if row["strategy"] == "hybrid_shard" else "")
        mark = " <-" if row is best else ""
        lines.append(f"{name:<18}" + "".join(f"{row[c + '_gib']:>8.2f}" for c in cols)
                     + f"{row['mem_gib']:>8.2f}{row['comm_gib_per_step']:>8.1f}{row['internode_gib_per_step']:>8.1f}"
                     + f"  {'yes' if row['fits'] else 'no'}{mark}")
    if best is None:
        lines.append(f"recommended: none — {why}")
    else:
        flag = f" --shard-group-size {best['shard_group_size']}" if best["strategy"] == "hybrid_shard" else ""
        lines.append(f"recommended: --strategy {best['strategy']}{flag} ({why}; {best['mem_gib']:.1f} of "
                     f"{plan.gpu_mem_gib:g} GiB)")
    return "\n".join(lines)


def paper_check(ac: str = "full") -> list[dict]:
    """The planner against every memory measurement of the paper (MI250X GCD, 64 GiB)."""
    rows = []
    for model, strategy, s, world, measured in PAPER_MEMORY_GIB:
        plan = PlanConfig(model=model, gpus=world, gpu_mem_gib=64.0, batch_size=32, ac=ac)
        predicted = layout_estimate(plan, strategy, s, model_sizes(plan))["mem_gib"]
        rows.append(dict(model=model, strategy=strategy, shard_group_size=s, gpus=world, measured_gib=measured,
                         predicted_gib=round(predicted, 2), error=round(predicted / measured - 1, 3)))
    return rows


def cmd_plan(args) -> None:
    if args.paper:
        rows = paper_check(args.ac)
        if args.json:
            print(json.dumps(rows, indent=1))
            return
        print(f"| model | layout | GPUs | paper GiB | predicted GiB (ac {args.ac}) | error |\n|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['model']} | {r['strategy']} {r['shard_group_size']} | {r['gpus']} | {r['measured_gib']} | "
                  f"{r['predicted_gib']:.1f} | {r['error']:+.0%} |")
        return
    plan = PlanConfig(model=args.model, gpus=args.gpus, gpus_per_node=args.gpus_per_node, gpu_mem_gib=args.gpu_mem_gib,
                      batch_size=args.batch_size, ac=args.ac, mixed_precision=args.mixed_precision,
                      img_size=args.img_size, in_chans=args.in_chans, mask_ratio=args.mask_ratio)
    rows = plan_layouts(plan)
    best, why = recommend(rows, plan)
    for row in rows:
        row["recommended"] = row is best
    print(json.dumps(rows, indent=1) if args.json else format_plan(rows, plan, best, why))


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
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--json", action="store_true", help="print a JSON list instead of the table")
    p.add_argument("--paper", action="store_true", help="compare with the paper's measured memory instead")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.command == "plan":
        cmd_plan(args)


if __name__ == "__main__":
    main()
