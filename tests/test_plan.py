"""tools/plan.py: the planner's arithmetic by hand, the planner against the paper and the H100, its command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys

import pytest

import plan
from mae import MaskedAutoencoder
from plan import ModelSizes, PlanConfig
from vit import get_config

GiB = 2**30
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_plan(**overrides) -> PlanConfig:
    # vit_tiny: 32 px, patch 8 -> L = 16 patches, K = 4 visible; D 64, M 128, 4 heads.
    # Decoder 32 wide, 1 Block, 2 heads (MLP 128).
    fields = dict(model="vit_tiny", gpus=4, gpus_per_node=2, batch_size=2, ac="none",
                  decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    fields.update(overrides)
    return PlanConfig(**fields)


def test_block_activation_bytes_by_hand():
    # 3 tokens, D 4, M 8, 2 heads, bf16: 2·(9·4 + 2·8) = 104, two LayerNorms' fp32 mean+rstd 16, logsumexp 2·4.
    assert plan.block_activation_bytes(3, 4, 8, 2, 2) == 3 * (104 + 16 + 8)


def test_activation_bytes_by_hand():
    # Encoder Block on 1 + 4 tokens: per token 2·(9·64 + 2·128) + 16 + 4·4 = 1696 -> 8480 per image.
    # Decoder Block on 1 + 16 tokens: 2·(9·32 + 2·128) + 16 + 2·4 = 1112 -> 18904.
    # Outside the Blocks: image fp32 + bf16 copy 6·3·32·32 = 18432, encoder norm + decoder_embed inputs
    # 2·2·5·64 = 1280, decoder norm + pred inputs 2·2·17·32 = 2176, loss 3·4·16·192 = 36864 -> 58752.
    outside = 18432 + 1280 + 2176 + 36864
    sizes = plan.model_sizes(tiny_plan())
    no_ac = 2 * 8480 + 18904 + outside + 18904  # every Block saved, + one Block of gradients
    assert plan.activation_bytes(tiny_plan(ac="none"), sizes) == 2 * no_ac
    # Checkpointed: each Block keeps only its input (2·5·64 = 640, 2·17·32 = 1088) and backward holds one
    # Block recomputed plus one Block of gradients.
    full = 2 * 640 + 1088 + outside + 2 * 18904
    assert plan.activation_bytes(tiny_plan(ac="full"), sizes) == 2 * full
    # Every 2nd Block: one of the two encoder Blocks and none of the one decoder Block checkpointed.
    every2 = 640 + 8480 + 18904 + outside + 2 * 18904
    assert plan.activation_bytes(tiny_plan(ac="2"), sizes) == 2 * every2


def test_model_sizes_match_the_real_model():
    config = tiny_plan()
    sizes = plan.model_sizes(config)
    model = MaskedAutoencoder(get_config("vit_tiny"), 32, 1, 2)
    assert sizes.params == sum(p.numel() for p in model.parameters())
    # qkv 3D² + 3D, proj D² + D, fc1 D·M + M, fc2 M·D + D, two LayerNorms 4D.
    block = lambda D, M: 4 * D * D + 2 * D * M + 9 * D + M  # noqa: E731
    assert sizes.encoder_block == block(64, 128) == 33472
    assert sizes.decoder_block == block(32, 128)
    assert (sizes.encoder_depth, sizes.decoder_depth) == (2, 1)


def test_layout_memory_and_communication_by_hand():
    # A made-up model: P = 10⁶ params, largest Block 10⁵. 4 GPUs, 2 per node, bf16 with fp32 reduce.
    config = tiny_plan()
    sizes = ModelSizes(params=10**6, encoder_block=10**5, decoder_block=5 * 10**4, encoder_depth=2, decoder_depth=1)
    act = plan.activation_bytes(config, sizes)
    assert act == 227040  # test_activation_bytes_by_hand, no checkpointing
    est = lambda strategy, s: plan.layout_estimate(config, strategy, s, sizes)  # noqa: E731
    overhead = plan.RUNTIME_OVERHEAD_GIB

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
    assert ddp["buffers_gib"] * GiB == pytest.approx(4 * 10**6)  # DDP's buckets, which hold the grads
    assert ddp["grads_gib"] == 0  # gradient_as_bucket_view: no second copy
    peak = 4 * 10**6 + 8 * 10**6 + (act + 2 * 10**6) + 4 * 10**6
    assert ddp["mem_gib"] == pytest.approx(peak / GiB + overhead)
    assert ddp["comm_gib_per_step"] * GiB == pytest.approx(2 * 3 / 4 * 4 * 10**6)

    # CPU offload: the fp32 shards (params, grads, AdamW) move to host memory; each of the two all-gathers
    # first copies the param shard up, the reduce-scatter copies the grad shard down.
    offload = plan.layout_estimate(tiny_plan(cpu_offload=True), "full_shard", 4, sizes)
    assert offload["host_gib"] * GiB == pytest.approx(10**6 + 10**6 + 2 * 10**6)
    assert offload["host_copy_gib_per_step"] * GiB == pytest.approx(3 * 10**6)
    assert offload["mem_gib"] == pytest.approx((act + 4 * 10**5 + 16 * 10**5) / GiB + overhead)
    tight = plan.layout_estimate(tiny_plan(cpu_offload=True, host_mem_gib=7e6 / GiB), "full_shard", 4, sizes)
    assert not tight["fits"]  # 2 GPUs per node x 4·10⁶ bytes each > 7·10⁶
    assert "ddp" not in {row["strategy"] for row in plan.plan_layouts(tiny_plan(cpu_offload=True))}  # nothing to offload

    bf16_reduce = plan.layout_estimate(tiny_plan(mixed_precision="bf16-reduce"), "full_shard", 4, sizes)
    assert bf16_reduce["comm_gib_per_step"] * GiB == pytest.approx(3 * 10**6 + 0.75 * 2 * 10**6)


def test_layouts_enumerated():
    assert plan.layouts(8) == [("ddp", 1), ("no_shard", 1), ("full_shard", 8), ("shard_grad_op", 8),
                                ("hybrid_shard", 1), ("hybrid_shard", 2), ("hybrid_shard", 4), ("hybrid_shard", 8)]
    assert [s for name, s in plan.layouts(12) if name == "hybrid_shard"] == [1, 2, 4]


def test_planner_within_25_percent_of_measured_peaks():
    # The paper's 13 FSDP1 measurements on MI250X, and the original MAE on one H100 (no checkpointing).
    rows = plan.measured_check()
    assert len(rows) == 18
    for row in rows:
        assert abs(row["error"]) <= 0.25, row


def test_paper_numbers_imply_activation_checkpointing():
    # Without checkpointing the model overshoots the paper's sharded runs by far: they used it.
    errors = [row["error"] for row in plan.measured_check("none") if row["source"] == plan.PAPER]
    assert max(errors) > 1.0


def test_recommendation_follows_the_paper():
    # "Largest model on one 64 GB GCD: 3B; 5B needs 2, 15B needs 4."
    for model, group in [("vit_3b", 1), ("vit_5b", 2), ("vit_15b", 4)]:
        config = PlanConfig(model=model, gpus=1024, gpus_per_node=8, gpu_mem_gib=64)
        best, _ = plan.recommend(plan.plan_layouts(config), config)
        assert (best["strategy"], best["shard_group_size"]) == ("hybrid_shard", group), model
    # Too big for a node's shard group: shard across everything, shard_grad_op if its unsharded bf16
    # params fit (27 GiB for 15B), else full_shard; too big even then: nothing.
    for gpus, strategy in [(64, "shard_grad_op"), (16, "full_shard")]:
        config = PlanConfig(model="vit_15b", gpus=gpus, gpus_per_node=2, gpu_mem_gib=40)
        assert plan.recommend(plan.plan_layouts(config), config)[0]["strategy"] == strategy
    config = PlanConfig(model="vit_15b", gpus=2, gpus_per_node=2, gpu_mem_gib=40)
    assert plan.recommend(plan.plan_layouts(config), config)[0] is None


def test_plan_cli_json(capsys):
    plan.main(["--model", "vit_15b", "--gpus", "1024", "--gpus-per-node", "8", "--gpu-mem-gib", "64",
               "--batch-size", "32", "--ac", "full", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 4 + 11  # ddp, no_shard, full_shard, shard_grad_op, hybrid 1..1024
    for row in rows:
        assert {"strategy", "shard_group_size", "mem_gib", "comm_gib_per_step"} <= set(row)
    assert sum(row["recommended"] for row in rows) == 1
    best = next(row for row in rows if row["recommended"])
    assert (best["strategy"], best["shard_group_size"]) == ("hybrid_shard", 4)  # the paper's choice for 15B


def test_plan_flags_take_their_defaults_from_plan_config():
    # The defaults live in PlanConfig only; the command line reads them from there.
    parser = argparse.ArgumentParser()
    plan.add_plan_arguments(parser)
    args = vars(parser.parse_args([]))
    fields = {field.name: field.default for field in dataclasses.fields(PlanConfig)}
    assert {name: args[name] for name in fields if name in args} == {
        name: default for name, default in fields.items() if not name.startswith("decoder_")}
    PlanConfig.__dataclass_fields__["gpus"].default, saved = 16, fields["gpus"]  # a changed default follows
    try:
        parser = argparse.ArgumentParser()
        plan.add_plan_arguments(parser)
        assert parser.parse_args([]).gpus == 16
    finally:
        PlanConfig.__dataclass_fields__["gpus"].default = saved


@pytest.mark.parametrize("argv, message", [(["--gpus", "12", "--gpus-per-node", "8"], "whole number of nodes"),
                                           (["--ac", "sometimes"], "ac"), (["--model", "vit_99b"], "vit_99b")])
def test_plan_rejects_bad_settings(argv, message):
    with pytest.raises(ValueError, match=message):
        plan.main(argv)


def test_plan_rejects_an_unknown_precision_as_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse's choices: exit 2 with the valid names
        plan.main(["--mixed-precision", "fp8"])
    assert exit_info.value.code == 2 and "bf16-reduce" in capsys.readouterr().err


def test_plan_runs_as_a_script_from_any_folder(tmp_path):
    # As a user would run it, from another working directory: tools/plan.py finds the project's modules.
    argv = ["--model", "vit_tiny", "--gpus", "4", "--gpus-per-node", "2", "--batch-size", "2", "--ac", "2", "--json"]
    script = os.path.join(ROOT, "tools", "plan.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, script, *argv], cwd=tmp_path, env=env, capture_output=True,
                         text=True, check=True).stdout
    assert [(row["strategy"], row["shard_group_size"]) for row in json.loads(out)] == [
        ("ddp", 1), ("no_shard", 1), ("full_shard", 4), ("shard_grad_op", 4),
        ("hybrid_shard", 1), ("hybrid_shard", 2), ("hybrid_shard", 4)]
    bad = subprocess.run([sys.executable, script, "--gpus", "12"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --gpus 12 is not a whole number of nodes")


def test_importing_plan_needs_no_torch():
    # It predicts, it does not run: torch is loaded only once a PlanConfig is built (for the model table).
    code = "import sys, plan; assert 'torch' not in sys.modules and 'bench' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=os.path.join(ROOT, "tools"), check=True)
