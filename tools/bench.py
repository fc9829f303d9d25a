"""bench.py — throughput sweep, where a step's time goes, the SDPA micro-benchmark, the data loader's speed.

    python tools/bench.py                        # = sweep with defaults: ViT-L/H/1B/3B on a GPU, vit_tiny on CPU
    python tools/bench.py sweep --models vit_large --batch-sizes 256 --compile on --sdpa auto cudnn --out runs/bench
    torchrun --nproc_per_node=8 tools/bench.py sweep --models vit_3b --strategies hybrid_shard:1 hybrid_shard:8 full_shard
    python tools/bench.py sdpa                   # each attention kernel at MAE's shapes on this card
    python tools/bench.py phases --img-size 64   # forward+backward vs grad norm+AdamW step per layout/AdamW
    python tools/bench.py data [folder] [--workers N] [--chip-size N]   # loader vs bare decode, window vs scene
    python tools/bench.py gdal [--repeats N] [--size N]   # geotiff.py vs GDAL (rasterio), same files and windows

`sweep` times MAE training steps through train.py's own functions (build_model, build_optimizer,
train_step) on synthetic images already on the device: what it measures is what train.py runs. Each
configuration is a row (img/s, TFLOP/s per GPU, MFU, peak memory beside tools/plan.py's prediction,
first-step time, energy per image), an impossible layout or an OOM included; under torchrun every rank
runs every configuration and rank 0 reports. On a shared machine `--interleave` takes the configurations'
timed steps in turn, so that outside load slows all alike. `sdpa` times each attention backend's forward +
backward at MAE's sequence lengths. `phases` splits a step into forward + backward and gradient norm +
AdamW step for each layout and AdamW implementation (fused, foreach, for-loop) at a small batch: the
per-step overheads of FSDP2's hooks and of the optimizer on DTensors. `data` times data.py's
PretrainDataset against tifffile's bare decode of the same files, and a 512x512 window of a tiled
10000x10000 scene against reading the whole scene. `gdal` times geotiff.py against GDAL (through
rasterio, a benchmark-only dependency: `pip install -e .[bench]`) on files GDAL wrote in five layouts,
the same random windows, band subsets and full reads for both, each open-read-close as a loader reads,
and checks that both return the same pixels. The layout planner, which needs no device, is
tools/plan.py.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import itertools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

# `python tools/bench.py` puts tools/ on sys.path, not the repository root where train, data and
# fsdp_setup live: add it, so the script runs from any working directory.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tifffile  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import data  # noqa: E402
import fsdp_setup  # noqa: E402
import geotiff  # noqa: E402
import metrics  # noqa: E402
import train  # noqa: E402
from plan import GiB, PlanConfig, layout_estimate, model_sizes  # noqa: E402
from vit import SDPA_CHOICES, apply_sdpa_choice, get_config  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Per-step times without a host sync inside the loop: CUDA events queued on the stream on a GPU
    (read once, after one synchronize at the end), `clock` (seconds) on the CPU, which runs
    synchronously. Tests pass a fake clock to check the arithmetic downstream."""

    def __init__(self, device: torch.device, clock=time.perf_counter):
        self.cuda = device.type == "cuda"
        self.clock = clock
        self.spans, self.begin = [], None

    def now(self):
        if not self.cuda:
            return self.clock()
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
# sweep: MAE training steps through train.py's own functions, timed
# ---------------------------------------------------------------------------------------------

# Per-GPU batch sizes of the original MAE measurements on an H100 (docs/paper.md) and the paper's 32.
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


def default_decoder(on_gpu: bool) -> dict:
    """MAE's decoder (512 wide, 8 Blocks) on GPU; on CPU the demo's small one, else it dominates vit_tiny."""
    demo = train.demo_config()
    return {} if on_gpu else {k: getattr(demo, k) for k in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads")}


def sweep_configs(args, on_gpu: bool) -> list[train.TrainConfig]:
    """One train.TrainConfig per point of models x strategies x ac x compile x batch sizes."""
    models = args.models or (["vit_large", "vit_huge", "vit_1b", "vit_3b"] if on_gpu else ["vit_tiny"])
    strategies = args.strategies or ["no_shard"]
    acs = args.ac or (["none"] if on_gpu else ["none", "full"])
    compiles = [c == "on" for c in (args.compile or (["on"] if on_gpu else ["off"]))]
    decoder = default_decoder(on_gpu)
    decoder.update({k: getattr(args, k) for k in ("decoder_embed_dim", "decoder_depth", "decoder_num_heads")
                    if getattr(args, k) is not None})
    base = train.TrainConfig(data="synthetic", steps=10**9, warmup_steps=1, lr=1e-4, workers=0, seed=0,
                             mixed_precision=args.mixed_precision, mask_ratio=args.mask_ratio, cpu_offload=args.cpu_offload,
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
            batch_size=cfg.batch_size, ac=cfg.ac, mixed_precision=fsdp_setup.resolve_mixed_precision(cfg.mixed_precision, dist.device),
            img_size=cfg.img_size, in_chans=cfg.in_chans or 3, mask_ratio=cfg.mask_ratio,
            decoder_embed_dim=cfg.decoder_embed_dim, decoder_depth=cfg.decoder_depth, decoder_num_heads=cfg.decoder_num_heads,
            cpu_offload=cfg.cpu_offload)
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
        self.optimizer = train.build_optimizer(self.model, cfg.weight_decay)
        self.mae = fsdp_setup.unwrap(self.model)
        vit = self.mae.cfg
        self.imgs = torch.randn(cfg.batch_size, vit.in_chans, vit.img_size, vit.img_size, device=dist.device)
        self.mask_generator = torch.Generator(dist.device).manual_seed(dist.rank)
        self.step_index, self.losses, self.timer, self.first_step_s = 0, [], StepTimer(dist.device), None

    def step(self) -> torch.Tensor:
        cfg = self.cfg
        lr = train.lr_at(self.step_index, cfg.lr, cfg.steps, cfg.warmup_steps)  # the schedule train.py follows
        loss, _ = train.train_step(self.model, self.optimizer, [self.imgs], lr=lr, mask_ratio=cfg.mask_ratio,
                                   clip_grad=cfg.clip_grad, mask_generator=self.mask_generator)
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
        _, peak = metrics.peak_tflops(dist.device)
        # Every rank reports its own GPU's power; energy per image counts all of them.
        all_watts = [watts]
        if dist.world_size > 1:
            all_watts = [None] * dist.world_size
            torch.distributed.all_gather_object(all_watts, watts)
        total_watts = sum(all_watts) if all(w is not None for w in all_watts) else None
        return dict(
            status="ok", img_per_s=img_per_s, tflops_per_gpu=tflops, mfu=tflops / peak if peak else None,
            peak_mem_gib=metrics.peak_memory_gib(dist.device) if peak_memory and dist.device.type == "cuda" else None,
            # The process's peak resident host memory so far (Linux: KiB): what CPU offload moves there.
            host_peak_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
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
    layout = cfg.strategy + (f":{cfg.shard_group_size}" if cfg.shard_group_size else "") + ("+offload" if cfg.cpu_offload else "")
    return dict(model=cfg.model, layout=layout, ac=cfg.ac, compile="on" if cfg.compile else "off", sdpa=sdpa,
                batch_size=cfg.batch_size, world_size=dist.world_size, device=device_name(dist.device),
                mixed_precision=fsdp_setup.resolve_mixed_precision(cfg.mixed_precision, dist.device),
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
    apply_sdpa_choice(sdpa)  # what train.py --sdpa does
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
        result = dict(status="oom", peak_mem_gib=metrics.peak_memory_gib(dist.device) if dist.device.type == "cuda" else None)
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
    apply_sdpa_choice(sdpa)  # what train.py --sdpa does
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
        if choice not in SDPA_CHOICES:
            raise ValueError(f"--sdpa must be one of {', '.join(SDPA_CHOICES)}, got {choice!r}")
    if args.interleave and len(args.sdpa) > 1:
        raise ValueError("--interleave takes one --sdpa choice (the switch is process-wide)")
    if args.steps < 1 or args.warmup < 1:
        raise ValueError(f"--steps and --warmup must be >= 1 (the first warm-up step compiles), got {args.steps}, {args.warmup}")
    dist = fsdp_setup.init_distributed(cpu_collectives=args.cpu_offload)
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


# ---------------------------------------------------------------------------------------------
# phases: where a step's time goes, per layout and AdamW implementation
# ---------------------------------------------------------------------------------------------


def cmd_phases(args) -> list[dict]:
    """Time train_step's two halves apart: forward + backward (FSDP2's all-gather/reduce-scatter hooks
    run here) and the gradient norm + AdamW step (the optimizer on DTensors), for each layout and AdamW
    implementation, interleaved (one step of each in turn) so that outside load hits all alike. At a
    small batch the compute is small, so the differences are the per-step overheads of the layouts."""
    if args.steps < 1 or args.warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {args.steps}, {args.warmup}")
    for implementation in args.optimizers:
        if implementation not in train.ADAMW_IMPLEMENTATIONS:
            raise ValueError(f"--optimizers: {implementation!r} is not one of {', '.join(train.ADAMW_IMPLEMENTATIONS)}")
    dist = fsdp_setup.init_distributed()
    try:
        decoder = default_decoder(dist.device.type == "cuda")
        runs = []
        for spec, implementation in itertools.product(args.strategies, args.optimizers):
            strategy, group = parse_strategy(spec)
            cfg = train.TrainConfig(model=args.model, img_size=args.img_size, data="synthetic", steps=10**9, warmup_steps=1,
                                    lr=1e-4, batch_size=args.batch_size, strategy=strategy, shard_group_size=group,
                                    mixed_precision=args.mixed_precision, **decoder)
            train.validate(cfg, dist.world_size, dist.device)
            model = train.build_model(cfg, dist)
            mae = fsdp_setup.unwrap(model)
            imgs = torch.randn(cfg.batch_size, mae.cfg.in_chans, mae.cfg.img_size, mae.cfg.img_size, device=dist.device)
            runs.append(dict(layout=spec, adamw=implementation, model=model, imgs=imgs,
                             optimizer=train.build_optimizer(model, cfg.weight_decay, implementation),
                             forward_backward=[], norm_step=[]))
        for round_ in range(args.warmup + args.steps):
            for run in runs:
                model, optimizer = run["model"], run["optimizer"]
                synchronize(dist.device)
                start = time.perf_counter()
                model(run["imgs"], mask_ratio=0.75)[0].backward()
                synchronize(dist.device)
                middle = time.perf_counter()
                fsdp_setup.clip_grad_norm_(model, float("inf"))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                synchronize(dist.device)
                if round_ >= args.warmup:
                    run["forward_backward"].append(middle - start)
                    run["norm_step"].append(time.perf_counter() - middle)
        rows = [dict(model=args.model, layout=r["layout"], adamw=r["adamw"], batch_size=args.batch_size,
                     device=device_name(dist.device), world_size=dist.world_size, torch=torch.__version__,
                     forward_backward_ms=1e3 * statistics.median(r["forward_backward"]),
                     norm_step_ms=1e3 * statistics.median(r["norm_step"])) for r in runs]
        if dist.is_main:
            print(f"\n{device_name(dist.device)} x {dist.world_size}, torch {torch.__version__}, {args.model} batch "
                  f"{args.batch_size}: medians of {args.steps} interleaved steps after {args.warmup} warm-up\n")
            print("| layout | AdamW | forward + backward ms | grad norm + step ms | step ms |\n|---|---|---|---|---|")
            for r in rows:
                print(f"| {r['layout']} | {r['adamw']} | {r['forward_backward_ms']:.2f} | {r['norm_step_ms']:.2f} | "
                      f"{r['forward_backward_ms'] + r['norm_step_ms']:.2f} |")
            if args.out:
                write_json(os.path.join(args.out, "phases.json"), rows)
        return rows
    finally:
        fsdp_setup.cleanup()


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
        name = " ".join(part for part in (label, "×".join(map(str, shape))) if part)
        print(f"| {name} | {cells} | {fastest} |", flush=True)
    if args.out:
        write_json(os.path.join(args.out, "sdpa.json"), rows)
    return rows


# ---------------------------------------------------------------------------------------------
# data: the loader against bare decoding, and a window against the whole scene
# ---------------------------------------------------------------------------------------------


def median_seconds(fn, repeats: int, clock=time.perf_counter) -> float:
    """Median wall time of `repeats` calls of fn (`clock`: injectable, so tests can fix the times)."""
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def bare_decode(path):
    """The least a loader must do per file: decode it, in one thread, and nothing else."""
    if geotiff.sniff(path) == "tiff":
        return tifffile.imread(path, maxworkers=1)
    with Image.open(path) as img:
        return np.asarray(img)


def write_bench_scene(path: str, size: int) -> None:
    """A size x size uint16 scene in 256x256 DEFLATE tiles, as large satellite scenes are stored."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:256, 0:256]

    def tiles():  # generated tile by tile, so the scene is never in memory
        for top in range(0, size, 256):
            for left in range(0, size, 256):
                field = 3000 + 1000 * np.sin((y + top) / 300) * np.cos((x + left) / 450)
                yield (field + rng.normal(0, 30, field.shape)).astype(np.uint16)
    tifffile.imwrite(path, tiles(), shape=(size, size), dtype=np.uint16, tile=(256, 256),
                     compression="zlib", predictor=True, maxworkers=2)


def cmd_data(args) -> dict:
    """Chips/s of data.read_image and of PretrainDataset against tifffile's bare decode of the same
    files, optionally through a DataLoader, and (without a folder) how much faster a 512x512 window of
    a tiled DEFLATE scene is than the whole scene. Medians over --repeats. Returns the timings."""
    if args.repeats < 1 or args.workers < 0 or args.chip_size < 1:
        raise ValueError(f"--repeats and --chip-size must be >= 1 and --workers >= 0, got {args.repeats}, "
                         f"{args.chip_size}, {args.workers}")
    scene_size = args.scene_size if args.scene_size is not None else (0 if args.folder else 10000)
    if 0 < scene_size <= 512:
        raise ValueError(f"--scene-size must be above the 512 px window (or 0: no scene), got {scene_size}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a DataLoader worker uses one thread; measure the same
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return measure_data(args.folder, args.workers, args.repeats, scene_size, args.chip_size, tmp)
    finally:
        torch.set_num_threads(threads)


def measure_data(folder, workers: int, repeats: int, scene_size: int, chip_size: int, tmp: str) -> dict:
    stats = os.path.join(folder, "stats.json") if folder else None
    if folder is None:
        folder = os.path.join(tmp, "chips")
        stats = data.make_demo_chips(folder, n=64, size=chip_size, bands=4)
    elif not os.path.isfile(stats):
        stats = os.path.join(tmp, "stats.json")
        with open(stats, "w") as f:
            json.dump(data.compute_stats(folder, max_files=100), f)
    paths = data.list_images(folder)
    dataset = data.PretrainDataset(paths, data.PretrainDataConfig(stats=stats))
    # Each result is dropped at once, as a worker's are after collation: keeping them all
    # would time the allocator's fresh pages instead of the decoding.
    passes = {
        "bare": lambda: [bare_decode(p) is None for p in paths],
        "reader": lambda: [data.read_image(p) is None for p in paths],
        "loader": lambda: [dataset[i] is None for i in range(len(dataset))],
    }
    # Interleaved passes, so a neighbour's load on a shared machine hits all three alike.
    times = {name: [] for name in passes}
    for _ in range(repeats):
        for name, one_pass in passes.items():
            times[name].append(median_seconds(one_pass, 1))
    bare, reader, loader = (statistics.median(times[name]) for name in passes)
    result = dict(files=len(paths), bare_s=bare, reader_s=reader, loader_s=loader)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())  # others' work on a shared machine skews timings
    print(f"{len(paths)} files from {folder}; one thread, medians of {repeats} passes; load average {load}")
    print(f"  bare decode (tifffile or Pillow) {len(paths) / bare:7.1f} chips/s")
    print(f"  read_image, whole file           {len(paths) / reader:7.1f} chips/s  {reader / bare:.2f}x bare time")
    print(f"  PretrainDataset, {dataset.cfg.img_size}px crops      {len(paths) / loader:7.1f} chips/s  "
          f"{loader / bare:.2f}x bare time (target <= 1.25x)")
    if workers > 0:
        sampler = data.ResumableDistributedSampler(len(dataset), 0, 1, drop_last=False)
        data_loader = data.make_loader(dataset, 16, sampler, workers=workers, pin_memory=False, drop_last=False)
        epochs = iter(range(repeats + 1))

        def one_epoch():
            sampler.set_epoch(next(epochs))
            for _ in data_loader:
                pass
        one_epoch()  # starts the workers
        result["data_loader_s"] = seconds = median_seconds(one_epoch, repeats)
        print(f"  DataLoader, {workers} workers           {len(paths) / seconds:7.1f} chips/s  "
              f"({len(paths) / seconds / workers:.1f} per worker)")
    if scene_size:
        scene = os.path.join(tmp, "scene.tif")
        print(f"writing a {scene_size}x{scene_size} uint16 scene, 256x256 DEFLATE tiles ...", flush=True)
        write_bench_scene(scene, scene_size)
        whole = median_seconds(lambda: geotiff.read_geotiff(scene), 3)
        bare_whole = median_seconds(lambda: tifffile.imread(scene, maxworkers=1), 3)
        corners = iter(np.random.default_rng(0).integers(0, scene_size - 512, (10 * repeats, 2)).tolist())
        window = median_seconds(lambda: geotiff.read_geotiff(scene, window=(*next(corners), 512, 512)), 10 * repeats)
        result.update(scene_s=whole, bare_scene_s=bare_whole, window_s=window)
        print(f"  whole scene: read_geotiff {whole:.2f} s, tifffile.imread {bare_whole:.2f} s")
        print(f"  512x512 window: {window * 1000:.1f} ms, "
              f"{whole / window:.0f}x faster than the whole scene (target >= 50x)")
        scene_stats = os.path.join(tmp, "scene_stats.json")
        with open(scene_stats, "w") as f:
            json.dump(data.compute_stats([scene], progress=False), f)
        crops = data.PretrainDataset([scene], data.PretrainDataConfig(stats=scene_stats, chips_per_scene=16))
        result["scene_crop_s"] = crop = median_seconds(lambda: [crops[i] is None for i in range(16)], repeats) / 16
        print(f"  PretrainDataset, 16 crops per scene (512 px windows -> {crops.cfg.img_size} px) "
              f"{1 / crop:7.1f} chips/s  {crop * 1000:.1f} ms each")
    return result


# ---------------------------------------------------------------------------------------------
# gdal: geotiff.py against GDAL (through rasterio) on the same files and windows
# ---------------------------------------------------------------------------------------------

# The layouts scenes come in, written by GDAL itself (rasterio creation options): name ->
# (bands, dtype, options). Each is read as a data loader reads: open, read one window, close.
GDAL_CASES = {
    "COG, 256² DEFLATE tiles": (4, "uint16", dict(driver="COG", blocksize=256, compress="deflate", predictor=2)),
    "256² LZW tiles": (4, "uint16", dict(tiled=True, blockxsize=256, blockysize=256, compress="lzw", predictor=2)),
    "band-interleaved DEFLATE strips": (4, "uint16", dict(interleave="band", compress="deflate", predictor=2)),
    "uncompressed single strip": (4, "uint16", dict(interleave="pixel", compress="none", blockysize=None)),
    "256² JPEG tiles, YCbCr": (3, "uint8", dict(tiled=True, blockxsize=256, blockysize=256, compress="jpeg",
                                                photometric="ycbcr", jpeg_quality=90)),
}
# The rasterio wheel's GDAL decodes JPEG with IJG libjpeg 9, imagecodecs with libjpeg-turbo: they
# upsample YCbCr chroma differently (geotiff.JPEG_CHROMA_UPSAMPLING = "libjpeg9" follows libjpeg 9),
# so a pixel may differ by a few levels on this smooth test image, the mean by much less. Anything
# beyond these is a different picture. Lossless layouts must match exactly.
GDAL_JPEG_TOLERANCE = dict(max=8, mean=0.5)


def gdal_case_pixels(size: int, bands: int, dtype: str) -> np.ndarray:
    """A smooth field with sensor-like noise per band: compresses like a real scene, unlike pure noise."""
    rng = np.random.default_rng(0)
    y, x = np.ogrid[0:size, 0:size]
    out = np.empty((bands, size, size), dtype)
    for band in range(bands):
        field = np.sin(y / 300 + band) * np.cos(x / 450 - band)
        if dtype == "uint8":
            out[band] = np.clip(128 + 90 * field + rng.normal(0, 6, (size, size)), 0, 255)
        else:
            out[band] = 3000 + 1000 * field + rng.normal(0, 30, (size, size))
    return out


def write_gdal_cases(folder: str, size: int) -> dict[str, str]:
    """Each of GDAL_CASES as a size x size GeoTIFF written by GDAL (rasterio); name -> path."""
    import rasterio
    from rasterio.transform import from_origin

    paths = {}
    for number, (name, (bands, dtype, options)) in enumerate(GDAL_CASES.items()):
        options = dict(options)
        if options.get("blockysize", 0) is None:
            options["blockysize"] = size  # one strip for the whole image
        options.setdefault("driver", "GTiff")
        paths[name] = path = os.path.join(folder, f"case{number}.tif")
        with rasterio.open(path, "w", width=size, height=size, count=bands, dtype=dtype, crs="EPSG:32633",
                           transform=from_origin(500000, 5000000, 10, 10), **options) as dataset:
            dataset.write(gdal_case_pixels(size, bands, dtype))
    return paths


def gdal_reads(size: int, bands: int, windows: int, fulls: int) -> list[tuple[str, list, list | None]]:
    """(label, windows, bands) per row of a case: random 256² and 512² windows (the same for both
    readers), a 512² band subset, and whole-image reads."""
    rng = np.random.default_rng(1)

    def random_windows(side):
        corners = rng.integers(0, size - side + 1, (windows, 2))
        return [(int(r), int(c), side, side) for r, c in corners]
    subset = [bands - 1, 1]  # out of order, as in --bands 3 1 (band interleave: 2 planes of 4)
    return [("256² window", random_windows(256), None), ("512² window", random_windows(512), None),
            (f"512² window, bands {subset}", random_windows(512), subset), ("full read", [None] * fulls, None)]


def read_with_gdal(path: str, window, bands: list[int] | None) -> np.ndarray:
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(path) as dataset:
        indexes = [b + 1 for b in bands] if bands is not None else list(range(1, dataset.count + 1))
        return dataset.read(indexes, window=None if window is None else Window(window[1], window[0], window[3], window[2]))


def cmd_gdal(args) -> list[dict]:
    """geotiff.py's time / GDAL's for the same reads of GDAL-written files, per layout and read: the
    median of per-read times, open-read-close each (as a loader reads), both readers timed in turn in
    one run, so that load from other processes slows both alike. Pixels must agree (JPEG: within
    GDAL_JPEG_TOLERANCE, the largest difference and the largest per-read mean); a disagreement is a
    failed row and a non-zero exit. Returns the rows."""
    try:
        import rasterio
    except ImportError:
        raise ValueError("`bench.py gdal` compares with GDAL through rasterio: `pip install rasterio` "
                         "(or `pip install -e .[bench]`)") from None
    if args.repeats < 1 or args.size < 1024:
        raise ValueError(f"--repeats must be >= 1 and --size >= 1024 (512² windows), got {args.repeats}, {args.size}")
    fulls = max(3, args.repeats // 10)
    import imagecodecs
    print(f"geotiff.py (tifffile {tifffile.__version__}, imagecodecs {imagecodecs.__version__}) against GDAL "
          f"{rasterio.__gdal_version__} (rasterio {rasterio.__version__}); {args.size}² images, {args.repeats} "
          f"windows and {fulls} full reads per row, one thread each; {os.cpu_count()} CPUs, load average "
          f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}", flush=True)
    rows, failures = [], []
    print("| layout | read | geofm ms | GDAL ms | geofm / GDAL |\n|---|---|---|---|---|")
    # One GDAL environment for the whole run, so that rasterio sets GDAL up once, not per open.
    with tempfile.TemporaryDirectory() as tmp, rasterio.Env(GDAL_NUM_THREADS=1):
        paths = write_gdal_cases(tmp, args.size)
        for name, path in paths.items():
            bands, dtype, _ = GDAL_CASES[name]
            for label, windows, band_subset in gdal_reads(args.size, bands, args.repeats, fulls):
                times = {"geofm": [], "gdal": []}
                worst, mean = 0, 0.0
                for turn, window in enumerate(windows):
                    readers = [("geofm", lambda: geotiff.read_geotiff(path, window, band_subset)),
                               ("gdal", lambda: read_with_gdal(path, window, band_subset))]
                    pixels = {}
                    for reader, read in readers[::-1] if turn % 2 else readers:  # who goes first alternates
                        start = time.perf_counter()
                        pixels[reader] = read()
                        times[reader].append(time.perf_counter() - start)
                    a, b = pixels["geofm"], pixels["gdal"]
                    difference = np.abs(a.astype(np.float64) - b) if a.shape == b.shape else np.array([np.inf])
                    worst, mean = max(worst, float(difference.max())), max(mean, float(difference.mean()))
                geofm_s, gdal_s = statistics.median(times["geofm"]), statistics.median(times["gdal"])
                tolerance = GDAL_JPEG_TOLERANCE if "JPEG" in name else dict(max=0, mean=0)
                ok = worst <= tolerance["max"] and mean <= tolerance["mean"]
                row = dict(layout=name, read=label, geofm_ms=geofm_s * 1000, gdal_ms=gdal_s * 1000,
                           ratio=geofm_s / gdal_s if ok else None, max_pixel_difference=worst,
                           mean_pixel_difference=mean)
                rows.append(row)
                if not ok:
                    failures.append(f"{name}, {label}")
                verdict = f"{row['ratio']:.2f}x" if ok else "FAILED: pixels differ"
                if worst:
                    verdict += f" (pixels differ by up to {worst:g}, {mean:.2f} on average)"
                print(f"| {name} | {label} | {row['geofm_ms']:.2f} | {row['gdal_ms']:.2f} | {verdict} |", flush=True)
    if failures:
        raise SystemExit(f"error: geotiff.py and GDAL read different pixels in: {'; '.join(failures)}")
    return rows


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["sweep"] + argv  # `python bench.py [--sweep flags]` = the sweep; --help lists the commands
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
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
                   "flash | efficient | cudnn (that one, math as fallback) | math, e.g. the fastest of `tools/bench.py sdpa`")
    p.add_argument("--mem-cap-gib", type=float, default=None, help="let the allocator use at most this much GPU memory")
    p.add_argument("--cpu-offload", action="store_true", help="FSDP2 CPU offload (train.py --cpu-offload) in every configuration")
    p.add_argument("--profile", action="store_true", help="profile 3 more steps per configuration into --out")
    p.add_argument("--interleave", action="store_true", help="build all configurations, time their steps in "
                   "turn: fair ratios on a shared machine (small models; no memory or energy)")
    p.add_argument("--out", default=None, help="folder for bench.json, bench.jsonl (row by row) and bench.md")
    p = sub.add_parser("phases", help="forward+backward vs grad norm+AdamW step, per layout and AdamW implementation")
    p.add_argument("--model", default="vit_tiny")
    p.add_argument("--img-size", type=int, default=None, help="default: the model's (vit_tiny: 32)")
    p.add_argument("--batch-size", type=int, default=1, help="small: the overheads, not the compute")
    p.add_argument("--strategies", nargs="*", default=["ddp", "no_shard", "full_shard"])
    p.add_argument("--optimizers", nargs="*", default=list(train.ADAMW_IMPLEMENTATIONS))
    p.add_argument("--mixed-precision", default="auto")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default=None, help="folder for phases.json")
    p = sub.add_parser("sdpa", help="time each SDPA backend at MAE's attention shapes")
    p.add_argument("--shapes", nargs="*", default=None, help="BxHxNxd, e.g. 256x16x50x64 (default: MAE's shapes)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=None, help="folder for sdpa.json")
    p = sub.add_parser("data", help="data.py's loader vs bare decode; a 512x512 window vs the whole scene")
    p.add_argument("folder", nargs="?", help="chips to read (default: 64 generated ones and a 10000x10000 scene)")
    p.add_argument("--workers", type=int, default=0, help="also time a DataLoader with this many workers")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chip-size", type=int, default=256, help="side of the generated chips (without a folder)")
    p.add_argument("--scene-size", type=int, default=None,
                   help="side of the generated scene (default: 10000 without a folder, else 0 = none)")
    p = sub.add_parser("gdal", help="geotiff.py against GDAL (rasterio) on GDAL-written files: time ratio per layout and read")
    p.add_argument("--repeats", type=int, default=30, help="random windows per row (full reads: a tenth, at least 3)")
    p.add_argument("--size", type=int, default=4096, help="side of the generated images")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    command = {"sdpa": cmd_sdpa, "sweep": cmd_sweep, "phases": cmd_phases, "data": cmd_data, "gdal": cmd_gdal}[args.command]
    return command(args)


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:  # a bad flag or layout: the message, not a traceback
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
