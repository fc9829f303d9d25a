"""metrics.py — what train.py measures and logs: the Meter and the device peak table.

train.py makes one Meter per run and feeds it every step; at each log point the Meter turns the
steps since the last one into a record (loss, lr, gradient norm, img/s, TFLOP/s per GPU, MFU,
peak memory, the fraction of time spent waiting for data), appended to metrics.jsonl and printed
as one line. tools/bench.py uses `peak_tflops` and `peak_memory_gib` for its own tables.

TFLOP/s count 3x the forward FLOPs of mae.mae_forward_flops (backward = 2x forward); MFU divides
them by the dense bf16 peak of the device (PEAK_TFLOPS, or --peak-tflops). CPUs have no peak:
their MFU is null.
"""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path

import torch

import fsdp_setup

# Dense bf16 TFLOP/s per device (datasheets), matched against the device name, most specific first.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "A100": 312.0,
               "MI250X": 191.5,  # per GCD: each of a card's two dies is its own device, as on Frontier
               "MI300X": 1307.0}


def peak_tflops(device: torch.device, override: float | None = None) -> tuple[str, float | None]:
    """(device name, peak TFLOP/s or None). CPUs and unknown devices have no peak: MFU is then null."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return name, override or next((t for key, t in PEAK_TFLOPS.items() if key in name), None)


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated device memory; on CPU the process's peak resident set (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Meter:
    """The steps since the last log line: losses (still on the device), data wait, wall time; and the
    FLOP count and device peak that turn them into TFLOP/s and MFU. `cfg` is train.py's resolved
    TrainConfig; the constructor logs the model, the peak and the data once."""

    def __init__(self, cfg, dist, model, num_images: int, step: int):
        mae = fsdp_setup.unwrap(model)
        self.cfg, self.dist = cfg, dist
        self.global_batch = cfg.batch_size * dist.world_size
        self.flops_per_image = 3 * mae.forward_flops_per_image(cfg.mask_ratio)  # forward + backward (2x forward)
        self.device_name, self.peak = peak_tflops(dist.device, cfg.peak_tflops)
        num_params = sum(p.numel() for p in model.parameters())
        self.say(f"model {cfg.model} ({mae.cfg.img_size} px, patch {mae.cfg.patch_size}, {mae.cfg.in_chans} bands): "
                 f"{num_params / 1e6:.2f}M parameters with the decoder, {self.flops_per_image / 3e9:.2f} GFLOP "
                 "forward per image")
        self.say(f"peak for MFU: {self.device_name} = " + (
            f"{self.peak:g} TFLOP/s" + (" (--peak-tflops)" if cfg.peak_tflops else "") if self.peak
            else "unknown (MFU null; pass --peak-tflops)"))
        accum = f" in {cfg.accum_steps} micro-batches" if cfg.accum_steps > 1 else ""
        self.say(f"data {cfg.data}: {num_images} images, global batch {self.global_batch} ({dist.world_size} x "
                 f"{cfg.batch_size}{accum}); {cfg.steps} steps, warmup {cfg.warmup_steps}, peak lr {cfg.lr:.3g}"
                 + (f"; attention: SDPA {cfg.sdpa}" if cfg.sdpa != "auto" else ""))
        self.restart(step)

    def say(self, message: str) -> None:
        if self.dist.is_main:
            print(message, flush=True)

    def restart(self, step: int) -> None:
        self.first_step, self.start, self.data_wait, self.pending = step, time.perf_counter(), 0.0, []

    def timed_data(self, batches):
        t0 = time.perf_counter()
        micro_batches = next(batches)
        self.data_wait += time.perf_counter() - t0
        return micro_batches

    def add(self, step: int, lr: float, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.pending.append((step, lr, loss, grad_norm))

    def close(self, progress, samples_per_epoch: int) -> dict:
        """One host sync for all the pending losses: the metrics record, plus the first step whose
        loss was not finite (or None)."""
        losses = torch.stack([loss for _, _, loss, _ in self.pending]).tolist()
        elapsed = time.perf_counter() - self.start
        img_per_s = (progress.step - self.first_step) * self.global_batch / elapsed
        tflops_per_gpu = img_per_s * self.flops_per_image / self.dist.world_size / 1e12
        _, lr, _, grad_norm = self.pending[-1]
        return {
            "step": progress.step, "epoch": round(progress.epoch + progress.epoch_index / samples_per_epoch, 4),
            "loss": sum(losses) / len(losses),  # mean over the steps since the last record
            "lr": lr, "grad_norm": grad_norm.item(), "img_per_s": round(img_per_s, 2),
            "tflops_per_gpu": round(tflops_per_gpu, 4),
            "mfu": round(tflops_per_gpu / self.peak, 4) if self.peak else None,
            "peak_mem_gib": round(peak_memory_gib(self.dist.device), 3),
            "data_wait_frac": round(self.data_wait / elapsed, 4),
            "first_bad_step": next((s for (s, *_), x in zip(self.pending, losses) if not math.isfinite(x)), None),
        }

    def log(self, r: dict, out: Path) -> None:
        if not self.dist.is_main:
            return
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(r) + "\n")
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(f"step {r['step']:>6}/{self.cfg.steps} | epoch {r['epoch']:7.2f} | loss {r['loss']:.4f} | "
              f"lr {r['lr']:.2e} | grad {r['grad_norm']:.3f} | {r['img_per_s']:8.1f} img/s | "
              f"{r['tflops_per_gpu']:7.2f} TFLOP/s/gpu | MFU {mfu} | mem {r['peak_mem_gib']:.2f} GiB | "
              f"data {r['data_wait_frac']:.0%}", flush=True)
