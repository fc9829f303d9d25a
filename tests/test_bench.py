"""tools/bench.py: the sweep end to end on CPU (one rank and two), phases, the SDPA micro-benchmark and
the data loader benchmark. Timings come from a fake clock where a number is checked, so the
arithmetic from step times to img/s is compared with hand-computed values, not with itself.
The planner it prints beside each measured peak is tested in test_plan.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import bench
import data
from _dist_util import run_ranks
from mae import MaskedAutoencoder
from vit import get_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeClock:
    """A perf_counter stand-in for one StepTimer: calls alternate start, stop; each stop comes
    `spans[i]` seconds after its start (the spans in turn), each start 100 s after the last stop."""

    def __init__(self, spans):
        self.spans, self.calls, self.now = list(spans), 0, 0.0

    def __call__(self) -> float:
        stopping = self.calls % 2 == 1
        self.now += self.spans[(self.calls // 2) % len(self.spans)] if stopping else 100.0
        self.calls += 1
        return self.now


def fake_step_times(monkeypatch, spans=(0.5, 0.3)):
    """Every StepTimer the sweep makes (one per configuration) reads its own FakeClock(spans)."""
    real_timer = bench.StepTimer
    monkeypatch.setattr(bench, "StepTimer", lambda device: real_timer(device, clock=FakeClock(spans)))


def test_fake_clock_spans():
    clock = FakeClock([0.5, 0.3])
    timer = bench.StepTimer(torch.device("cpu"), clock=clock)
    for _ in range(3):
        timer.start()
        timer.stop()
    assert timer.step_times_s() == pytest.approx([0.5, 0.3, 0.5])


# ---- the sweep: train.py's code path end to end on CPU (a test, not a timing) ----


def test_sweep_end_to_end_on_cpu(tmp_path, monkeypatch):
    # Same code path, not a copy: every step goes through train.train_step, called as train.py calls it.
    calls = []
    real_step = bench.train.train_step

    def counting_step(model, optimizer, micro_batches, *, lr, mask_ratio, **options):
        calls.append((lr, mask_ratio))
        return real_step(model, optimizer, micro_batches, lr=lr, mask_ratio=mask_ratio, **options)

    monkeypatch.setattr(bench.train, "train_step", counting_step)
    fake_step_times(monkeypatch)  # timed steps of 0.5 s and 0.3 s: median 0.4 s
    out = tmp_path / "bench"
    rows = bench.main(["sweep", "--models", "vit_tiny", "--strategies", "no_shard", "hybrid_shard:3",
                       "--ac", "none", "full", "--batch-sizes", "4", "--steps", "2", "--warmup", "1",
                       "--profile", "--out", str(out)])
    assert [(r["layout"], r["ac"]) for r in rows] == [("no_shard", "none"), ("no_shard", "full"),
                                                      ("hybrid_shard:3", "none"), ("hybrid_shard:3", "full")]
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 2
    # vit_tiny's MAE with the CPU's demo decoder (64 wide, 2 Blocks): FLOPs per image of one forward,
    # counted by vit.py's formula, which test_model.py checks against a FLOP counter.
    flops_per_image = MaskedAutoencoder(get_config("vit_tiny"), 64, 2, 4).forward_flops_per_image(0.75)
    for r in ok:
        assert r["step_s_median"] == pytest.approx(0.4) and r["step_s_min"] == pytest.approx(0.3)
        assert r["img_per_s"] == pytest.approx(10.0)  # 4 images / 0.4 s
        assert r["tflops_per_gpu"] == pytest.approx(10.0 * 3 * flops_per_image / 1e12)  # forward + 2x backward
        assert r["mfu"] is None and r["peak_mem_gib"] is None and r["energy_j_per_img"] is None  # CPU
        assert r["first_step_s"] > 0 and r["loss"] > 0
    # A shard group that does not divide the world is a row saying why, not a crash.
    bad = [r for r in rows if r["layout"] == "hybrid_shard:3"]
    assert all(r["status"].startswith("invalid") and "shard_group_size" in r["status"] for r in bad)
    assert json.loads((out / "bench.json").read_text()) == json.loads(json.dumps(rows))
    assert len((out / "bench.jsonl").read_text().splitlines()) == 4
    assert "| vit_tiny | no_shard | full |" in (out / "bench.md").read_text()
    assert len(list(out.glob("profile-*.txt"))) == 2
    assert len(calls) == 2 * (1 + 2 + 3)  # warm-up, timed, profiled steps of the two valid rows
    # train.py's schedule (warmup 1 step, then the peak lr 1e-4) at MAE's mask ratio.
    assert calls[:3] == [(0.0, 0.75), (pytest.approx(1e-4), 0.75), (pytest.approx(1e-4), 0.75)]


def test_sweep_with_cpu_offload_on_cpu():
    rows = bench.main(["sweep", "--models", "vit_tiny", "--strategies", "full_shard", "ddp", "--cpu-offload",
                       "--ac", "none", "--batch-sizes", "4", "--steps", "1", "--warmup", "1"])
    assert [(r["layout"], r["status"][:7]) for r in rows] == [("full_shard+offload", "ok"), ("ddp+offload", "invalid")]
    assert "--cpu-offload needs an FSDP layout" in rows[1]["status"]
    assert 0 < rows[0]["host_peak_gib"] < 64


def test_phases_on_cpu(tmp_path):
    rows = bench.main(["phases", "--strategies", "ddp", "full_shard", "--steps", "2", "--warmup", "1", "--out", str(tmp_path)])
    assert [(r["layout"], r["adamw"]) for r in rows] == [(s, a) for s in ("ddp", "full_shard") for a in ("fused", "foreach", "for-loop")]
    assert all(r["forward_backward_ms"] > 0 and r["norm_step_ms"] > 0 for r in rows)
    assert json.loads((tmp_path / "phases.json").read_text()) == json.loads(json.dumps(rows))
    with pytest.raises(ValueError, match="--optimizers: 'sgd' is not one of"):
        bench.main(["phases", "--optimizers", "sgd"])


def test_sweep_reports_out_of_memory_as_a_row(monkeypatch):
    def build_model_oom(cfg, dist):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")

    monkeypatch.setattr(bench.train, "build_model", build_model_oom)
    rows = bench.main(["sweep", "--models", "vit_tiny", "--batch-sizes", "4", "--ac", "none",
                       "--steps", "1", "--warmup", "1"])
    assert [r["status"] for r in rows] == ["oom"]


def test_sweep_interleaved_on_cpu(monkeypatch):
    fake_step_times(monkeypatch, spans=(0.2, 0.6, 0.4))  # median 0.4 s
    rows = bench.main(["sweep", "--models", "vit_tiny", "--batch-sizes", "2", "--ac", "none", "full",
                       "--strategies", "no_shard", "ddp", "--steps", "3", "--warmup", "1", "--interleave"])
    assert [(r["layout"], r["ac"], r["status"]) for r in rows] == [
        ("no_shard", "none", "ok"), ("no_shard", "full", "ok"), ("ddp", "none", "ok"), ("ddp", "full", "ok")]
    assert all(r["peak_mem_gib"] is None and r["img_per_s"] == pytest.approx(5.0) for r in rows)  # 2 / 0.4 s


@pytest.mark.parametrize("argv, message", [
    (["--sdpa", "fastest"], "--sdpa must be one of"),
    (["--steps", "0"], "--steps and --warmup must be >= 1"),
    (["--strategies", "hybrid_shard:x"], "write hybrid_shard:K"),
    (["--interleave", "--sdpa", "auto", "cudnn"], "--interleave takes one --sdpa"),
])
def test_sweep_rejects_bad_settings(argv, message):
    with pytest.raises(ValueError, match=message):
        bench.main(["sweep", "--models", "vit_tiny"] + argv)


def _sweep_worker(rank: int, out_dir: str) -> None:
    real_timer = bench.StepTimer
    bench.StepTimer = lambda device: real_timer(device, clock=FakeClock([0.5, 0.3]))  # this process only
    rows = bench.main(["sweep", "--models", "vit_tiny", "--strategies", "full_shard", "hybrid_shard:3", "ddp",
                       "--batch-sizes", "2", "--ac", "none", "--steps", "2", "--warmup", "1", "--out", out_dir])
    with open(os.path.join(out_dir, f"rows-{rank}.json"), "w") as f:
        json.dump(rows, f)


def test_sweep_on_two_ranks(tmp_path):
    # torchrun-style: every rank runs every configuration (collectives match), rank 0 writes the report;
    # a layout impossible at this world size is a row on both ranks, not a hang.
    run_ranks(_sweep_worker, 2, args=(str(tmp_path),), timeout_s=180)
    rows = json.loads((tmp_path / "rows-0.json").read_text())
    assert [(r["layout"], r["status"][:7]) for r in rows] == [("full_shard", "ok"), ("hybrid_shard:3", "invalid"),
                                                              ("ddp", "ok")]
    for r in (rows[0], rows[2]):
        assert r["world_size"] == 2 and r["img_per_s"] == pytest.approx(10.0)  # 2 ranks x 2 images / 0.4 s
    assert len((tmp_path / "bench.jsonl").read_text().splitlines()) == 3  # rank 0 only


# ---- sdpa: the fastest backend is the one that took least time ----


@pytest.mark.parametrize("slow", ["math", "flash"])
def test_sdpa_names_the_faster_backend(tmp_path, monkeypatch, slow):
    # Both run on a CPU; the one made slow by a second per call must lose to the other.
    from torch.nn.attention import SDPBackend

    slow_backend = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION}[slow]
    real_time = bench.time_attention

    def time_attention(shape, backend, device, dtype, iters):
        ms = real_time(shape, backend, device, dtype, iters)
        return ms + 1000.0 if backend == slow_backend and ms is not None else ms

    monkeypatch.setattr(bench, "time_attention", time_attention)
    rows = bench.main(["sdpa", "--shapes", "2x2x5x8", "--iters", "2", "--out", str(tmp_path)])
    assert rows[0]["shape"] == [2, 2, 5, 8] and rows[0]["ms"][slow] > 1000
    assert rows[0]["ms"]["efficient"] is None and rows[0]["ms"]["cudnn"] is None  # CUDA-only kernels
    assert rows[0]["fastest"] == {"math": "flash", "flash": "math"}[slow]
    assert json.loads((tmp_path / "sdpa.json").read_text())[0]["fastest"] == rows[0]["fastest"]


def test_sdpa_rejects_bad_shapes():
    with pytest.raises(ValueError, match="--shapes takes BxHxNxd"):
        bench.main(["sdpa", "--shapes", "2x2x5"])


# ---- data: the loader against bare decoding, a window against the whole scene ----


def test_median_seconds_on_a_fake_clock():
    clock = FakeClock([0.5, 0.1, 0.3, 0.9])
    assert bench.median_seconds(lambda: None, 4, clock=clock) == pytest.approx(0.4)  # median of 0.1 0.3 0.5 0.9


def test_data_bench_runs_and_reports_ratios(tmp_path, capsys):
    folder = tmp_path / "chips"
    data.make_demo_chips(folder, n=6, size=64, bands=4)
    timings = bench.main(["data", str(folder), "--repeats", "1", "--scene-size", "600"])
    assert timings["files"] == 6
    assert all(timings[k] > 0 for k in ("bare_s", "reader_s", "loader_s", "scene_s", "bare_scene_s", "window_s"))
    out = capsys.readouterr().out
    assert "bare decode" in out and "x bare time" in out and "faster than the whole scene" in out


def test_write_bench_scene_writes_the_tiled_scene(tmp_path):
    path = str(tmp_path / "scene.tif")
    bench.write_bench_scene(path, 600)
    info = data.geotiff_info(path)
    assert (info.height, info.width, info.bands, np.dtype(info.dtype)) == (600, 600, 1, np.uint16)
    pixels = data.read_geotiff(path, window=(300, 300, 8, 8))
    assert 1500 < pixels.mean() < 4500  # the smooth field of about 3000 +- 1000, plus noise


@pytest.mark.parametrize("argv, message", [(["--repeats", "0"], "--repeats"), (["--scene-size", "256"], "--scene-size")])
def test_data_bench_rejects_bad_settings(argv, message):
    with pytest.raises(ValueError, match=message):
        bench.main(["data"] + argv)


# ---- the command line ----


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and all(command in out for command in ("sweep", "phases", "sdpa", "data"))
    with pytest.raises(SystemExit) as exit_info:  # the planner is tools/plan.py only
        bench.main(["plan"])
    assert exit_info.value.code == 2 and "invalid choice: 'plan'" in capsys.readouterr().err


def test_runs_as_a_script_from_any_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench.py"), "sdpa", "--shapes", "1x1x3x4",
                             "--iters", "1"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "| 1×1×3×4 |" in result.stdout
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench.py"), "sdpa", "--shapes", "1x1"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --shapes takes BxHxNxd")
