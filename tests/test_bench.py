"""bench.py: the sweep end to end on CPU (one rank and two), the SDPA micro-benchmark.
The planner it prints beside each measured peak is tested in test_plan.py."""

from __future__ import annotations

import json
import os

import pytest
import torch

import bench
from _dist_util import run_ranks
from mae import MaskedAutoencoder
from vit import get_config


# ---- the sweep: train.py's code path end to end on CPU (a test, not a timing) ----


def test_sweep_end_to_end_on_cpu(tmp_path, monkeypatch):
    # Same code path, not a copy: every step goes through train.train_step.
    calls = []
    real_step = bench.train.train_step
    monkeypatch.setattr(bench.train, "train_step", lambda *a, **k: calls.append(1) or real_step(*a, **k))
    out = tmp_path / "bench"
    rows = bench.main(["sweep", "--models", "vit_tiny", "--strategies", "no_shard", "hybrid_shard:3",
                       "--ac", "none", "full", "--batch-sizes", "4", "--steps", "2", "--warmup", "1",
                       "--profile", "--out", str(out)])
    assert [(r["layout"], r["ac"]) for r in rows] == [("no_shard", "none"), ("no_shard", "full"),
                                                      ("hybrid_shard:3", "none"), ("hybrid_shard:3", "full")]
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 2
    flops = 3 * MaskedAutoencoder(get_config("vit_tiny"), 64, 2, 4).forward_flops_per_image()
    for r in ok:
        assert r["img_per_s"] == pytest.approx(4 / r["step_s_median"])
        assert r["tflops_per_gpu"] == pytest.approx(r["img_per_s"] * flops / 1e12)
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
    with pytest.raises(ValueError, match="--optimizers"):
        bench.main(["phases", "--optimizers", "sgd"])


def test_sweep_reports_out_of_memory_as_a_row(monkeypatch):
    def build_model_oom(cfg, dist):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB")

    monkeypatch.setattr(bench.train, "build_model", build_model_oom)
    rows = bench.main(["sweep", "--models", "vit_tiny", "--batch-sizes", "4", "--ac", "none",
                       "--steps", "1", "--warmup", "1"])
    assert [r["status"] for r in rows] == ["oom"]


def test_sdpa_cli_on_cpu(tmp_path):
    rows = bench.main(["sdpa", "--shapes", "2x2x5x8", "--iters", "2", "--out", str(tmp_path)])
    assert rows[0]["shape"] == [2, 2, 5, 8] and rows[0]["ms"]["math"] > 0
    assert rows[0]["fastest"] in ("flash", "efficient", "cudnn", "math")
    assert json.loads((tmp_path / "sdpa.json").read_text())[0]["shape"] == [2, 2, 5, 8]


def test_sweep_interleaved_on_cpu():
    rows = bench.main(["sweep", "--models", "vit_tiny", "--batch-sizes", "2", "--ac", "none", "full",
                       "--strategies", "no_shard", "ddp", "--steps", "2", "--warmup", "1", "--interleave"])
    assert [(r["layout"], r["ac"], r["status"]) for r in rows] == [
        ("no_shard", "none", "ok"), ("no_shard", "full", "ok"), ("ddp", "none", "ok"), ("ddp", "full", "ok")]
    assert all(r["peak_mem_gib"] is None and r["img_per_s"] > 0 for r in rows)


@pytest.mark.parametrize("argv", [["--sdpa", "fastest"], ["--steps", "0"], ["--strategies", "hybrid_shard:x"],
                                  ["--interleave", "--sdpa", "auto", "cudnn"]])
def test_sweep_rejects_bad_settings(argv):
    with pytest.raises((ValueError, SystemExit)):
        bench.main(["sweep", "--models", "vit_tiny"] + argv)


def _sweep_worker(rank: int, out_dir: str) -> None:
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
        assert r["world_size"] == 2 and r["img_per_s"] == pytest.approx(2 * 2 / r["step_s_median"])
    assert len((tmp_path / "bench.jsonl").read_text().splitlines()) == 3  # rank 0 only


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and all(command in out for command in ("plan", "sweep", "phases", "sdpa"))
