"""bench.py: the planner's arithmetic by hand, the planner against the paper, the sweep end to end on CPU."""

from __future__ import annotations

import json
import os

import pytest
import torch

import bench
from _dist_util import run_ranks
from bench import ModelSizes, PlanConfig
from mae import MaskedAutoencoder
from vit import get_config

GiB = 2**30


def tiny_plan(**overrides) -> PlanConfig:
    # vit_tiny: 32 px, patch 8 -> L = 16 patches, K = 4 visible; D 64, M 128, 4 heads.
    # Decoder 32 wide, 1 Block, 2 heads (MLP 128).
    fields = dict(model="vit_tiny", gpus=4, gpus_per_node=2, batch_size=2, ac="none",
                  decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    fields.update(overrides)
    return PlanConfig(**fields)


def test_block_activation_bytes_by_hand():
    # 3 tokens, D 4, M 8, 2 heads, bf16: 2·(9·4 + 2·8) = 104, two LayerNorms' fp32 mean+rstd 16, logsumexp 2·4.
    assert bench.block_activation_bytes(3, 4, 8, 2, 2) == 3 * (104 + 16 + 8)


def test_activation_bytes_by_hand():
    # Encoder Block on 1 + 4 tokens: per token 2·(9·64 + 2·128) + 16 + 4·4 = 1696 -> 8480 per image.
    # Decoder Block on 1 + 16 tokens: 2·(9·32 + 2·128) + 16 + 2·4 = 1112 -> 18904.
    # Outside the Blocks: image fp32 + bf16 copy 6·3·32·32 = 18432, encoder norm + decoder_embed inputs
    # 2·2·5·64 = 1280, decoder norm + pred inputs 2·2·17·32 = 2176, loss 3·4·16·192 = 36864 -> 58752.
    outside = 18432 + 1280 + 2176 + 36864
    sizes = bench.model_sizes(tiny_plan())
    no_ac = 2 * 8480 + 18904 + outside + 18904  # every Block saved, + one Block of gradients
    assert bench.activation_bytes(tiny_plan(ac="none"), sizes) == 2 * no_ac
    # Checkpointed: each Block keeps only its input (2·5·64 = 640, 2·17·32 = 1088) and backward holds one
    # Block recomputed plus one Block of gradients.
    full = 2 * 640 + 1088 + outside + 2 * 18904
    assert bench.activation_bytes(tiny_plan(ac="full"), sizes) == 2 * full
    # Every 2nd Block: one of the two encoder Blocks and none of the one decoder Block checkpointed.
    every2 = 640 + 8480 + 18904 + outside + 2 * 18904
    assert bench.activation_bytes(tiny_plan(ac="2"), sizes) == 2 * every2


def test_model_sizes_match_the_real_model():
    plan = tiny_plan()
    sizes = bench.model_sizes(plan)
    model = MaskedAutoencoder(get_config("vit_tiny"), 32, 1, 2)
    assert sizes.params == sum(p.numel() for p in model.parameters())
    # qkv 3D² + 3D, proj D² + D, fc1 D·M + M, fc2 M·D + D, two LayerNorms 4D.
    block = lambda D, M: 4 * D * D + 2 * D * M + 9 * D + M  # noqa: E731
    assert sizes.encoder_block == block(64, 128) == 33472
    assert sizes.decoder_block == block(32, 128)
    assert (sizes.encoder_depth, sizes.decoder_depth) == (2, 1)


def test_layout_memory_and_communication_by_hand():
    # A made-up model: P = 10⁶ params, largest Block 10⁵. 4 GPUs, 2 per node, bf16 with fp32 reduce.
    plan = tiny_plan()
    sizes = ModelSizes(params=10**6, encoder_block=10**5, decoder_block=5 * 10**4, encoder_depth=2, decoder_depth=1)
    act = bench.activation_bytes(plan, sizes)
    assert act == 227040  # test_activation_bytes_by_hand, no checkpointing
    est = lambda strategy, s: bench.layout_estimate(plan, strategy, s, sizes)  # noqa: E731
    overhead = bench.RUNTIME_OVERHEAD_GIB

    full = est("full_shard", 4)
    assert full["params_gib"] * GiB == pytest.approx(4 * 10**6 / 4)
    assert full["grads_gib"] * GiB == pytest.approx(4 * 10**6 / 4)
    assert full["optimizer_gib"] * GiB == pytest.approx(8 * 10**6 / 4)
    assert full["gathered_gib"] * GiB == pytest.approx(2 * 2 * 10**5)  # two bf16 Blocks
    # all-gather output 2, bf16 grads 2, their fp32 cast 4, two fp32 reduce-scatter inputs 8 bytes per Block param
    assert full["buffers_gib"] * GiB == pytest.approx(16 * 10**5)
    # grads (10⁶) outweigh activations (227040): backward's peak holds the grads, not both.
    peak = 10**6 + 2 * 10**6 + max(10**6, act) + 4 * 10**5 + 16 * 10**5
    assert full["mem_gib"] == pytest.approx(peak / GiB + overhead)
    # all-gather bf16 twice: 2·(3/4)·2·10⁶; reduce-scatter fp32 (3/4)·4·10⁶; one replica: no all-reduce.
    assert full["comm_gib_per_step"] * GiB == pytest.approx(3 * 10**6 + 3 * 10**6)
    assert full["internode_gib_per_step"] * GiB == pytest.approx(6 * 10**6)  # 4 GPUs on 2 nodes

    sgo = est("shard_grad_op", 4)
    # Every bf16 Block is kept from forward to backward and freed there with the activations.
    assert sgo["gathered_gib"] * GiB == pytest.approx(2 * 10**6)
    peak = 10**6 + 2 * 10**6 + max(10**6, act + 2 * 10**6) + 16 * 10**5
    assert sgo["mem_gib"] == pytest.approx(peak / GiB + overhead)
    assert sgo["comm_gib_per_step"] * GiB == pytest.approx(1.5 * 10**6 + 3 * 10**6)  # one all-gather only

    hybrid = est("hybrid_shard", 2)
    assert hybrid["params_gib"] * GiB == pytest.approx(4 * 10**6 / 2)
    # Within the pair: all-gather 2·(1/2)·2·10⁶, reduce-scatter (1/2)·4·10⁶; across the 2 replicas an
    # all-reduce of the half-size fp32 shard: 2·(1/2)·2·10⁶.
    assert hybrid["comm_gib_per_step"] * GiB == pytest.approx(2 * 10**6 + 2 * 10**6 + 2 * 10**6)
    assert hybrid["internode_gib_per_step"] * GiB == pytest.approx(2 * 10**6)  # only the replica all-reduce

    ddp = est("ddp", 1)
    assert ddp["params_gib"] * GiB == pytest.approx(4 * 10**6)
    assert ddp["buffers_gib"] * GiB == pytest.approx(4 * 10**6)  # DDP's buckets
    peak = 4 * 10**6 + 8 * 10**6 + max(4 * 10**6, act + 2 * 10**6) + 4 * 10**6
    assert ddp["mem_gib"] == pytest.approx(peak / GiB + overhead)
    assert ddp["comm_gib_per_step"] * GiB == pytest.approx(2 * 3 / 4 * 4 * 10**6)

    # CPU offload: the fp32 shards (params, grads, AdamW) move to host memory; each of the two all-gathers
    # first copies the param shard up, the reduce-scatter copies the grad shard down.
    offload = bench.layout_estimate(tiny_plan(cpu_offload=True), "full_shard", 4, sizes)
    assert offload["host_gib"] * GiB == pytest.approx(10**6 + 10**6 + 2 * 10**6)
    assert offload["host_copy_gib_per_step"] * GiB == pytest.approx(3 * 10**6)
    assert offload["mem_gib"] == pytest.approx((act + 4 * 10**5 + 16 * 10**5) / GiB + overhead)
    tight = bench.layout_estimate(tiny_plan(cpu_offload=True, host_mem_gib=7e6 / GiB), "full_shard", 4, sizes)
    assert not tight["fits"]  # 2 GPUs per node x 4·10⁶ bytes each > 7·10⁶

    bf16_reduce = bench.layout_estimate(tiny_plan(mixed_precision="bf16-reduce"), "full_shard", 4, sizes)
    assert bf16_reduce["comm_gib_per_step"] * GiB == pytest.approx(3 * 10**6 + 0.75 * 2 * 10**6)


def test_layouts_enumerated():
    assert bench.layouts(8) == [("ddp", 1), ("no_shard", 1), ("full_shard", 8), ("shard_grad_op", 8),
                                ("hybrid_shard", 1), ("hybrid_shard", 2), ("hybrid_shard", 4), ("hybrid_shard", 8)]
    assert [s for name, s in bench.layouts(12) if name == "hybrid_shard"] == [1, 2, 4]


def test_planner_within_25_percent_of_measured_peaks():
    # The paper's 13 FSDP1 measurements on MI250X, and the original MAE on one H100 (no checkpointing).
    rows = bench.measured_check()
    assert len(rows) == 18
    for row in rows:
        assert abs(row["error"]) <= 0.25, row


def test_paper_numbers_imply_activation_checkpointing():
    # Without checkpointing the model overshoots the paper's sharded runs by far: they used it.
    errors = [row["error"] for row in bench.measured_check("none") if row["source"] == bench.PAPER]
    assert max(errors) > 1.0


def test_recommendation_follows_the_paper():
    # "Largest model on one 64 GB GCD: 3B; 5B needs 2, 15B needs 4."
    for model, group in [("vit_3b", 1), ("vit_5b", 2), ("vit_15b", 4)]:
        plan = PlanConfig(model=model, gpus=1024, gpus_per_node=8, gpu_mem_gib=64)
        best, _ = bench.recommend(bench.plan_layouts(plan), plan)
        assert (best["strategy"], best["shard_group_size"]) == ("hybrid_shard", group), model
    # Too big for a node's shard group: shard across everything, shard_grad_op if its unsharded bf16
    # params fit (27 GiB for 15B), else full_shard; too big even then: nothing.
    for gpus, strategy in [(64, "shard_grad_op"), (16, "full_shard")]:
        plan = PlanConfig(model="vit_15b", gpus=gpus, gpus_per_node=2, gpu_mem_gib=40)
        assert bench.recommend(bench.plan_layouts(plan), plan)[0]["strategy"] == strategy
    plan = PlanConfig(model="vit_15b", gpus=2, gpus_per_node=2, gpu_mem_gib=40)
    assert bench.recommend(bench.plan_layouts(plan), plan)[0] is None


def test_plan_cli_json(capsys):
    bench.main(["plan", "--model", "vit_15b", "--gpus", "1024", "--gpus-per-node", "8", "--gpu-mem-gib", "64",
                "--batch-size", "32", "--ac", "full", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 4 + 11  # ddp, no_shard, full_shard, shard_grad_op, hybrid 1..1024
    for row in rows:
        assert {"strategy", "shard_group_size", "mem_gib", "comm_gib_per_step"} <= set(row)
    assert sum(row["recommended"] for row in rows) == 1


@pytest.mark.parametrize("argv", [["--gpus", "12", "--gpus-per-node", "8"], ["--ac", "sometimes"],
                                  ["--model", "vit_99b"], ["--mixed-precision", "fp8"]])
def test_plan_rejects_bad_settings(argv):
    with pytest.raises((ValueError, SystemExit)):
        bench.main(["plan"] + argv)


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
