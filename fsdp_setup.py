"""fsdp_setup.py — the distributed runtime: process groups, the paper's parallel layouts on FSDP2.

`init_distributed()` starts the process group however the job was launched (torchrun, plain `srun`,
or nothing: one process, the same code path). `parallelize(model, strategy, ...)` applies activation
checkpointing, per-block torch.compile, FSDP2 `fully_shard` per Block then the root (or DDP), and
materialises a meta-device model shard by shard. Rank 0 logs one `[fsdp] ...` line per decision.

    dist_info = init_distributed()
    with torch.device("meta"):
        model = MaskedAutoencoder(get_config("vit_3b"))
    validate_layout("hybrid_shard", 1, dist_info.world_size)       # cheap, before heavy work
    model = parallelize(model, "hybrid_shard", shard_group_size=1)  # sharded, on dist_info.device

The paper's FSDP1 settings (Tsaris et al. 2024) and their FSDP2 equivalents, row by row, with the
reasons: docs/fsdp.md.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import signal
import sys
import traceback
import warnings
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from vit import Block, init_param_

STRATEGIES = ("full_shard", "shard_grad_op", "hybrid_shard", "no_shard", "ddp")
PRECISIONS = ("bf16", "bf16-reduce", "fp32")
DEFAULT_MASTER_PORT = 29500


def log(message: str) -> None:
    """Print on rank 0 only, prefixed so that `grep '\\[fsdp\\]'` finds every decision made here."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[fsdp] {message}", flush=True)


# --- Process group: torchrun, srun, or a single process ------------------------------------------


@dataclass
class Dist:
    rank: int  # global rank
    local_rank: int  # rank within the node
    world_size: int
    device: torch.device  # this rank's accelerator (or cpu)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class LaunchEnv:
    launcher: str  # "torchrun" | "slurm" | "single"
    rank: int
    local_rank: int
    world_size: int
    master_addr: str | None = None  # slurm only; torchrun passes its own store
    master_port: int | None = None


def first_host(nodelist: str) -> str:
    """First hostname of a SLURM node list, e.g. 'frontier[00123-00125,00200],login1' -> 'frontier00123'.
    Each bracket contributes its first number, zero padding kept. Pure Python: no `scontrol` needed."""
    entry = re.match(r"(?:[^,\[\]]|\[[^\[\]]*\])*", nodelist).group(0)  # up to the first comma outside brackets
    host = re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,]", m.group(1))[0], entry.strip())
    if not host or nodelist[len(entry):len(entry) + 1] not in ("", ","):
        raise ValueError(f"cannot read the first host of SLURM node list {nodelist!r}; set MASTER_ADDR instead")
    return host


def resolve_launch(env: Mapping[str, str]) -> LaunchEnv:
    """Who launched us, from the environment alone. torchrun's variables win (under `srun ... torchrun`
    they are the per-process ones); SLURM's count only when srun started more than one task, so a
    one-task allocation stays a single process instead of waiting for peers that never come."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv("torchrun", int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]))
    ntasks = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", 1)))
    if "SLURM_PROCID" in env and ntasks > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
        master_addr = env.get("MASTER_ADDR") or first_host(nodelist)
        master_port = int(env.get("MASTER_PORT", DEFAULT_MASTER_PORT))
        rank, local_rank = int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0))
        return LaunchEnv("slurm", rank, local_rank, ntasks, master_addr, master_port)
    return LaunchEnv("single", 0, 0, 1)


def init_distributed(cpu_collectives: bool = False) -> Dist:
    """Start the process group (nccl on CUDA/ROCm, gloo on CPU), pin this rank's device.
    cpu_collectives=True adds gloo for CPU tensors beside nccl, which CPU offload needs; it is off by
    default because gloo connects every pair of ranks at start-up, which thousands of ranks feel."""
    launch = resolve_launch(os.environ)
    if torch.cuda.is_available():  # true on ROCm too, where "nccl" is RCCL
        # srun --gpus-per-task=1 shows each task only its own GPU: local_rank 5 is then cuda:0.
        device = torch.device("cuda", launch.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend, device_id = ("cuda:nccl,cpu:gloo" if cpu_collectives else "nccl"), device
    else:
        device, backend, device_id = torch.device("cpu"), "gloo", None
    if not dist.is_initialized():
        if launch.launcher == "torchrun":
            dist.init_process_group(backend, init_method="env://", device_id=device_id)
        elif launch.launcher == "slurm":
            dist.init_process_group(backend, init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
                                    rank=launch.rank, world_size=launch.world_size, device_id=device_id)
        else:  # an in-memory store: no port, no peers, yet every collective and DeviceMesh works
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, device_id=device_id)
    info = Dist(dist.get_rank(), launch.local_rank, dist.get_world_size(), device)
    where = f", rendezvous {launch.master_addr}:{launch.master_port}" if launch.launcher == "slurm" else ""
    log(f"launcher {launch.launcher}: world size {info.world_size}, backend {backend}, device {device}{where}")
    return info


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class AllRanksError(ValueError):
    """A ValueError that `on_every_rank` raised on every rank alike: nobody waits, no need to abort."""


def on_every_rank(fn, dist_info: Dist):
    """Run fn on every rank; a ValueError on any rank is raised on all of them, with the same message,
    so no rank is left waiting in a collective that a failed rank never joins."""
    error = None
    try:
        result = fn()
    except ValueError as err:
        error, result = str(err), None
    errors = [error]
    if dist_info.world_size > 1:
        errors = [None] * dist_info.world_size
        dist.all_gather_object(errors, error)
    failed = [rank for rank, e in enumerate(errors) if e is not None]
    if failed:
        others = " and others" if len(failed) > 1 else ""
        where = f" [rank {failed[0]}{others}]" if len(failed) < dist_info.world_size else ""
        raise AllRanksError(errors[failed[0]] + where)
    return result


class StopRequest:
    """SIGTERM/SIGUSR1 only set a flag; the loop finishes the step, saves and exits 0. `agreed()`
    all-reduces the flag (MAX) and returns last step's result, so the hot loop never waits for the
    step just queued and all ranks stop together, one step later (docs/fsdp.md)."""

    def __init__(self, dist_info: Dist):
        self.dist_info, self.signal_name = dist_info, None
        self.on_gpu = dist_info.device.type == "cuda"
        self.host_flag = torch.zeros((), pin_memory=self.on_gpu)  # last step's all-reduced flag (0 at first)
        self.copied = None  # CUDA event after the copy of last step's flag
        self.previous = {s: signal.signal(s, self.handler) for s in (signal.SIGTERM, signal.SIGUSR1)}

    def handler(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def agreed(self) -> bool:
        if self.dist_info.world_size == 1:
            return self.signal_name is not None
        if self.copied is not None:
            self.copied.synchronize()  # last step's copy, not the step queued after it
        result = bool(self.host_flag)
        flag = torch.full((), float(self.signal_name is not None), device=self.dist_info.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        # Not flag.item(): on a GPU that copy queues behind this whole step and waits for it.
        self.host_flag.copy_(flag, non_blocking=True)
        if self.on_gpu:
            self.copied = torch.cuda.Event()
            self.copied.record()
        return result

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def exit_rank_failed(rank: int, user_error: str | None = None) -> None:
    """End this process at once: a normal exit's destroy_process_group, atexit and worker joins can block while
    the other ranks wait in a collective. A `user_error` met by this rank alone (a corrupt image in its share)
    prints its one `error: [rank R] ...` line and exits 2, as a user error on every rank does; anything else
    is a bug: the traceback of the exception being handled, exit code 3."""
    if user_error is not None:
        print(f"error: [rank {rank}] {user_error}", file=sys.stderr, flush=True)
    else:
        print(f"[rank {rank}] failed; ending this process so that the launcher stops the job:\n"
              f"{traceback.format_exc()}", file=sys.stderr, end="", flush=True)
    sys.stdout.flush()
    os._exit(2 if user_error is not None else 3)


# --- Validation: every impossible layout fails here, on every rank, before any collective --------


def checkpoint_every(activation_checkpointing: str | int) -> int:
    """'none' -> 0, 'full' -> 1, k (int or digit string) -> k: checkpoint every k-th Block."""
    value = activation_checkpointing
    if value in ("none", "full"):
        return int(value == "full")
    value = int(value) if isinstance(value, str) and value.strip().isdigit() else value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError(f"activation_checkpointing (--ac) must be 'none', 'full' or a positive integer k "
                     f"(every k-th block), got {activation_checkpointing!r}")


def validate_layout(strategy: str, shard_group_size: int | None, world_size: int, mixed_precision: str = "bf16",
                    activation_checkpointing: str | int = "none", device: torch.device | None = None,
                    cpu_offload: bool = False) -> None:
    """Raise ValueError naming the setting and the fix if this layout cannot run. No communication."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy (--strategy) {strategy!r}; choose one of: {', '.join(STRATEGIES)}")
    if mixed_precision not in PRECISIONS:
        raise ValueError(f"unknown mixed_precision (--mixed-precision) {mixed_precision!r}; "
                         f"choose one of: {', '.join(PRECISIONS)}")
    checkpoint_every(activation_checkpointing)
    device = device or _default_device()
    if cpu_offload and strategy == "ddp":
        raise ValueError("--cpu-offload needs an FSDP layout (full_shard, shard_grad_op, hybrid_shard, no_shard); "
                         "DDP keeps the whole model and its optimizer on the GPU")
    if cpu_offload and dist.is_initialized() and device.type == "cuda" and "cpu:" not in str(dist.get_backend_config()):
        raise ValueError("--cpu-offload needs collectives on CPU tensors (the offloaded gradients' norm): "
                         "start the process group with init_distributed(cpu_collectives=True)")
    if strategy == "hybrid_shard":
        if shard_group_size is None:
            raise ValueError("hybrid_shard needs shard_group_size (--shard-group-size): the number of GPUs that "
                             "shard one model replica, e.g. 1 (pure data parallel), 2, 4 or 8 (one Frontier node)")
        if not isinstance(shard_group_size, int) or isinstance(shard_group_size, bool) or shard_group_size < 1:
            raise ValueError(f"shard_group_size (--shard-group-size) must be a positive integer, "
                             f"got {shard_group_size!r}")
        if world_size % shard_group_size != 0:
            divisors = [k for k in range(1, world_size + 1) if world_size % k == 0]
            raise ValueError(f"world size {world_size} is not divisible by shard_group_size {shard_group_size}; "
                             f"choose one of {divisors} or change the number of GPUs")
    elif shard_group_size is not None:
        # An error, not a note: a sweep that forgets to switch the strategy would otherwise
        # silently measure a different layout than its label says.
        raise ValueError(f"shard_group_size={shard_group_size} only applies to strategy hybrid_shard, not {strategy}; "
                         f"drop --shard-group-size or use --strategy hybrid_shard")
    if mixed_precision != "fp32" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"mixed_precision {mixed_precision!r} needs bf16, which {torch.cuda.get_device_name(device)} "
                         f"does not support; use --mixed-precision fp32")


def resolve_mixed_precision(mixed_precision: str, device: torch.device) -> str:
    """`auto`: bf16 on a GPU; fp32 on a CPU, where bf16 is slow and not bit-stable across thread counts."""
    if mixed_precision != "auto":
        return mixed_precision
    return "bf16" if device.type == "cuda" else "fp32"


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


# --- parallelize: one small apply_* function per feature, called in a fixed order ----------------


def apply_activation_checkpointing(blocks: list[nn.Module], every: int) -> None:
    """Recompute every `every`-th Block's activations in backward. `forward` is replaced in place, so
    parameter names (checkpoint keys) stay as they are; non-reentrant, to compose with FSDP2's hooks
    and torch.compile; RNG state preserved, so drop path draws the same mask when recomputed."""
    chosen = [block for i, block in enumerate(blocks) if (i + 1) % every == 0]
    for block in chosen:
        block.forward = functools.wraps(block.forward)(
            functools.partial(checkpoint, block.forward, use_reentrant=False, preserve_rng_state=True))
    kind = "full" if every == 1 else f"every {every}th block"
    log(f"activation checkpointing {kind}: {len(chosen)}/{len(blocks)} blocks (non-reentrant, RNG preserved)")


def apply_compile(blocks: list[nn.Module]) -> None:
    """torch.compile each Block in place (`Module.compile`, names unchanged). Blocks share one code
    object, so the encoder compiles once and the decoder once, however deep the model."""
    for block in blocks:
        block.compile()
    log(f"compile: torch.compile on {len(blocks)} blocks")


def build_mesh(strategy: str, shard_group_size: int | None, world_size: int, device_type: str) -> DeviceMesh:
    if strategy in ("full_shard", "shard_grad_op"):
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))
    shard = shard_group_size if strategy == "hybrid_shard" else 1  # no_shard = replicate over all
    return init_device_mesh(device_type, (world_size // shard, shard), mesh_dim_names=("replicate", "shard"))


# (param_dtype, reduce_dtype); None keeps fp32. 'bf16' reduces in fp32, so the gradient sum over hundreds
# of ranks keeps fp32 precision; 'bf16-reduce' halves the bytes.
FSDP_DTYPES = {"fp32": (None, None), "bf16": (torch.bfloat16, torch.float32), "bf16-reduce": (torch.bfloat16,) * 2}


def apply_fsdp(model: nn.Module, blocks: list[nn.Module], strategy: str, shard_group_size: int | None,
               mixed_precision: str, cpu_offload: bool = False) -> None:
    """fully_shard bottom-up: each Block (one all-gather / reduce-scatter unit), the patch embedding, the root."""
    device = _default_device()
    mesh = build_mesh(strategy, shard_group_size, dist.get_world_size(), device.type)
    reshard = strategy in ("full_shard", "hybrid_shard")  # nothing to reshard in a shard group of 1 (no_shard)
    # Pinned host memory lets the host-to-GPU copies of the offloaded shards run asynchronously.
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy()
    param_dtype, reduce_dtype = FSDP_DTYPES[mixed_precision]
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    shard = functools.partial(fully_shard, mesh=mesh, offload_policy=offload)
    for i, block in enumerate(blocks):
        # The last Block to run forward is the first one backward needs: resharding it would only
        # re-gather it at once (blocks are in forward order: encoder, then decoder).
        shard(block, reshard_after_forward=reshard and i < len(blocks) - 1, mp_policy=policy)
    # The patch embedding is its own unit so that only it receives bf16 images; the root keeps the
    # fp32 inputs, so MAE's pixel targets and the masking noise are not rounded to bf16. The root
    # keeps FSDP2's default (not resharded after forward): backward needs it first.
    shard(model.patch_embed, reshard_after_forward=reshard, mp_policy=policy)
    root_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    shard(model, mp_policy=root_policy)
    dims = ", ".join(f"{name}={size}" for name, size in zip(mesh.mesh_dim_names, mesh.shape))
    kept = " (not the last block, which backward needs first)" if reshard and blocks else ""
    log(f"layout {strategy}: mesh ({dims}), reshard_after_forward={reshard}{kept}, "
        f"{len(blocks)} blocks + patch_embed + root")
    if cpu_offload:
        how = "pinned; the optimizer steps on the CPU" if device.type == "cuda" else "no GPU here, so nothing moves"
        log(f"cpu offload: sharded fp32 params, grads and AdamW state in host memory ({how})")
    compute, reduce = ("bf16" if dtype == torch.bfloat16 else "fp32" for dtype in FSDP_DTYPES[mixed_precision])
    log(f"mixed precision {mixed_precision}: params/compute {compute}, gradient reduction {reduce}, fp32 master")
    # MAE returns pred as a slice (a view); it is never modified in place, so FSDP2's warning
    # about in-place ops on views is noise on every rank.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def apply_ddp(model: nn.Module, device: torch.device, mixed_precision: str) -> nn.Module:
    """The paper's baseline. DDP has no parameter dtype: bf16 runs the forward under torch.autocast
    (matmuls in bf16, norms and softmax in fp32, fp32 gradients); bf16-reduce adds a bf16 all-reduce hook."""
    if mixed_precision != "fp32":
        model.forward = torch.autocast(device.type, dtype=torch.bfloat16)(model.forward)
    # gradient_as_bucket_view: the gradients are views into DDP's all-reduce buckets instead of a second
    # fp32 copy of every gradient copied into them: 4 bytes/param less memory and one copy less per step.
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  gradient_as_bucket_view=True)
    if mixed_precision == "bf16-reduce":
        ddp.register_comm_hook(None, _bf16_allreduce_hook)
    # At a micro-batch of 1 the (1, 1, D) cls-token gradient is a slice of the (1, 1 + K, D) token
    # gradient: same values, other strides on size-1 dims. DDP copies it into its bucket and warns.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    log(f"layout ddp: DistributedDataParallel over {dist.get_world_size()} ranks, gradients as bucket views")
    reduce = "bf16" if mixed_precision == "bf16-reduce" else "fp32"
    how = f"autocast bf16, {reduce} gradient all-reduce" if mixed_precision != "fp32" else "fp32"
    log(f"mixed precision {mixed_precision}: {how}")
    return ddp


def _bf16_allreduce_hook(process_group, bucket):
    """DDP comm hook: all-reduce the gradient bucket in bf16 (half the bytes), average, back to fp32.
    torch ships one (bf16_compress_hook) but only for NCCL; this one also runs on gloo."""
    group = process_group or dist.group.WORLD
    grad = bucket.buffer()
    grad_bf16 = grad.to(torch.bfloat16).div_(dist.get_world_size(group))
    work = dist.all_reduce(grad_bf16, group=group, async_op=True)
    return work.get_future().then(lambda fut: grad.copy_(fut.value()[0]))


@torch.no_grad()
def init_sharded_(model: nn.Module, device: torch.device, seed: int, param_device: torch.device | None = None) -> None:
    """Materialise a meta-built model on `device` with exactly the weights of a normal build on the
    same kind of device, whatever the layout: VisionTransformer.init_weights(seed) replayed, each
    parameter drawn full-size and only this rank's shard kept (distribute_tensor cuts it as FSDP2 does,
    without communication). With CPU offload the shards live on `param_device` but are drawn on `device`."""
    model.to_empty(device=param_device or device)
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        full = torch.empty(param.shape, dtype=param.dtype, device=device)
        init_param_(name, full, generator)
        if isinstance(param, DTensor):
            local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
            param.to_local().copy_(local)
        else:
            param.copy_(full)
    _move_buffers(model, device)  # FSDP2 leaves buffers alone: they must be where the compute is
    model.init_buffers()  # the fixed sin-cos position embeddings
    where = f"{device}" + (f" (parameter shards on {param_device})" if param_device and param_device != device else "")
    per_shard = "per shard " if any(isinstance(p, DTensor) for p in model.parameters()) else ""
    log(f"init: meta model materialised on {where}, initialised {per_shard}from seed {seed}")


def parallelize(model: nn.Module, strategy: str, shard_group_size: int | None = None, mixed_precision: str = "bf16",
                activation_checkpointing: str | int = "none", compile: bool = False, seed: int = 0,
                cpu_offload: bool = False) -> nn.Module:
    """Apply the layout to a VisionTransformer / MaskedAutoencoder; returns the model to train.

    A model on the meta device is materialised on this rank's device and initialised from `seed`
    (same weights as a normal build); a model with real weights keeps them (e.g. a loaded checkpoint).
    Call init_distributed() first (with cpu_collectives=True for cpu_offload on GPUs). Build the
    optimizer afterwards, from the returned model: with cpu_offload its parameters are on the CPU.
    """
    device = _default_device()
    if not dist.is_initialized():
        raise ValueError("parallelize() needs a process group: call fsdp_setup.init_distributed() first")
    validate_layout(strategy, shard_group_size, dist.get_world_size(), mixed_precision, activation_checkpointing,
                    device, cpu_offload)
    on_meta = any(p.is_meta for p in model.parameters())
    blocks = [m for m in model.modules() if isinstance(m, Block)]  # encoder blocks, then decoder blocks

    # 1. Activation checkpointing innermost, so recomputation happens inside FSDP2's all-gathered window.
    every = checkpoint_every(activation_checkpointing)
    if every:
        apply_activation_checkpointing(blocks, every)
    # 2. Compile each block (with its checkpointing) before FSDP2 adds its hooks around it.
    if compile:
        apply_compile(blocks)
    # 3. Data parallelism. DDP needs real, identical weights on every rank before it wraps.
    if strategy == "ddp":
        if on_meta:
            init_sharded_(model, device, seed)
        return apply_ddp(model.to(device), device, mixed_precision)
    apply_fsdp(model, blocks, strategy, shard_group_size, mixed_precision, cpu_offload)
    # 4. Only now allocate memory: each rank materialises its own shards.
    if on_meta:
        init_sharded_(model, device, seed, param_device=torch.device("cpu") if cpu_offload else None)
    return model


# --- Training-loop helpers that hide FSDP2 vs DDP ------------------------------------------------


def set_grad_sync(model: nn.Module, enabled: bool) -> None:
    """Turn gradient reduction off for non-final micro-steps of gradient accumulation (FSDP1's no_sync)."""
    if isinstance(model, DistributedDataParallel):
        model.require_backward_grad_sync = enabled  # exactly what DDP.no_sync() toggles
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)  # reduce-scatter and, for HSDP, the replica all-reduce


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm; returns it as a plain scalar tensor (no host sync).
    max_norm=math.inf (train.py without --clip-grad): only the norm, the gradients are not touched.
    FSDP2's gradients are DTensors: torch reduces their norm over the shard dimension only."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm == math.inf:  # the norm alone: no multiplying every gradient by 1
        total_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    else:
        total_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return total_norm.full_tensor() if isinstance(total_norm, DTensor) else total_norm


@contextlib.contextmanager
def buffers_on(model: nn.Module, device: torch.device):
    """Move the model's buffers to `device` for the duration of the block, then back (with any values
    written meanwhile). With CPU offload the parameter shards live on the CPU and the buffers on the
    GPU, and torch's full-state-dict loading (set_model_state_dict) refuses a model on two devices."""
    homes = _move_buffers(model, device)
    try:
        yield
    finally:
        for module, name, home in homes:
            setattr(module, name, getattr(module, name).to(home))


def _move_buffers(model: nn.Module, device: torch.device) -> list[tuple[nn.Module, str, torch.device]]:
    """Move every buffer to `device` in place (still registered); returns where each was."""
    homes = [(module, name, buffer.device) for module in model.modules()
             for name, buffer in module.named_buffers(recurse=False)]
    for module, name, _ in homes:
        setattr(module, name, getattr(module, name).to(device))
    return homes


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model underneath (for state dicts and methods): DDP wraps, FSDP2 modifies in place."""
    return model.module if isinstance(model, DistributedDataParallel) else model
