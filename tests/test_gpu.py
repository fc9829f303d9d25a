"""GPU smoke checks: fsdp_setup and train.py on one CUDA GPU against a plain model, CPU offload through
train.py, and the stop flag's no-wait property. Every test skips without CUDA; the CPU paths are tested
in test_fsdp.py and test_train.py. tools/gpu_check.py runs this file on the GPU machine:

    python -m pytest tests/test_gpu.py -q
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fsdp_setup
import train
from mae import MaskedAutoencoder
from vit import get_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROOT = Path(__file__).resolve().parents[1]
LR = 1e-3  # AdamW's first step moves every weight by about lr
CFG = train.TrainConfig(model="vit_tiny", decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4,
                        steps=10, warmup_steps=0, lr=LR, batch_size=8)


@pytest.fixture(scope="module")
def dist():
    # Exact fp32 references: TF32 would round the patch-embedding convolution and the matmuls.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    info = fsdp_setup.init_distributed(cpu_collectives=True)  # gloo beside nccl: the offload cases need it
    yield info
    fsdp_setup.cleanup()


def full_params(model) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().clone()
            for n, p in fsdp_setup.unwrap(model).named_parameters()}


def one_step(model, imgs) -> tuple[float, dict[str, torch.Tensor]]:
    """One training step with fixed masking noise: the loss and the parameters after it."""
    noise_gen = torch.Generator(imgs.device).manual_seed(2)
    loss, _ = train.train_step(model, train.build_optimizer(model, CFG.weight_decay), [imgs], lr=LR,
                               mask_ratio=CFG.mask_ratio, mask_generator=noise_gen)
    return loss.item(), full_params(model)


@pytest.fixture(scope="module")
def reference(dist):
    """A plain MAE built on the GPU with the same seed, and its first step on a fixed batch."""
    imgs = torch.randn(8, 3, 32, 32, device=dist.device, generator=torch.Generator(dist.device).manual_seed(1))
    with torch.device(dist.device):
        model = MaskedAutoencoder(get_config("vit_tiny"), 64, 2, 4)
    init = full_params(model)
    loss, after = one_step(model, imgs)
    return dict(imgs=imgs, init=init, loss=loss, after=after)


# (strategy, shard group, precision, activation checkpointing, CPU offload)
CASES = [("full_shard", None, "fp32", "none", False), ("full_shard", None, "fp32", "full", False),
         ("shard_grad_op", None, "fp32", "none", False), ("no_shard", None, "fp32", "2", False),
         ("hybrid_shard", 1, "fp32", "none", False), ("ddp", None, "fp32", "none", False),
         ("full_shard", None, "bf16", "none", False), ("no_shard", None, "bf16", "full", False),
         ("ddp", None, "bf16", "none", False),
         ("full_shard", None, "fp32", "none", True), ("no_shard", None, "bf16", "full", True)]


@pytest.mark.parametrize("strategy, group, precision, ac, offload", CASES,
                         ids=[f"{s}{g or ''}-{p}-ac{a}{'-offload' if o else ''}" for s, g, p, a, o in CASES])
def test_matches_plain_model(dist, reference, strategy, group, precision, ac, offload):
    cfg = dataclasses.replace(CFG, strategy=strategy, shard_group_size=group, mixed_precision=precision, ac=ac,
                              cpu_offload=offload)
    model = train.build_model(cfg, dist)
    # With offload the shards must really live in host memory (and nowhere else when idle).
    assert all(p.device.type == ("cpu" if offload else "cuda") for p in model.parameters())
    init = full_params(model)
    assert max((init[n] - t).abs().max().item() for n, t in reference["init"].items()) == 0
    loss, after = one_step(model, reference["imgs"])
    diffs = torch.cat([(after[n] - t).abs().flatten() for n, t in reference["after"].items()])
    # AdamW's first step moves every weight by ~lr times the sign of its gradient: a near-zero gradient
    # may flip sign under rounding. fp32: the loss to 1e-5 and all but 1e-4 of the weights equal the plain
    # model's to 1e-5; bf16: the loss within 2%. Either way no weight is further off than two steps.
    assert loss == pytest.approx(reference["loss"], rel=1e-5 if precision == "fp32" else 2e-2)
    assert diffs.max().item() <= 2.5 * LR
    if precision == "fp32":
        assert (diffs > 1e-5).float().mean().item() <= 1e-4


def test_init_with_cpu_offload(dist, tmp_path):
    # --init through CPU offload: the full-state-dict broadcast wants the model on one device, while the
    # offloaded shards live on the CPU and the buffers on the GPU (weights.load_init_weights handles it).
    with torch.device(dist.device):
        source = MaskedAutoencoder(get_config("vit_tiny"), 64, 2, 4)
    source.init_weights(seed=5)  # other weights than the seed-0 build, so the load shows
    torch.save(source.state_dict(), tmp_path / "init.pth")
    cfg = dataclasses.replace(CFG, strategy="full_shard", mixed_precision="fp32", cpu_offload=True,
                              init=str(tmp_path / "init.pth"))
    loaded = full_params(train.build_model(cfg, dist))
    assert max((loaded[n] - p.detach().float()).abs().max().item() for n, p in source.named_parameters()) == 0


def test_cpu_offload_resume_equals_an_uninterrupted_run(tmp_path):
    # Through train.py: clipping, a checkpoint mid-run, and --resume give the uninterrupted run's
    # (step, loss, grad norm) exactly.
    def run(out, *extra):
        subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", "synthetic", "--model", "vit_tiny",
                        "--decoder-embed-dim", "64", "--decoder-depth", "2", "--decoder-num-heads", "4",
                        "--batch-size", "8", "--steps", "4", "--warmup-steps", "1", "--lr", "1e-3", "--workers", "0",
                        "--log-every", "1", "--cpu-offload", "--clip-grad", "0.5", "--ckpt-every", "2",
                        "--recon-every", "0", "--out", str(out), *extra], cwd=ROOT, check=True)
        return [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, open(out / "metrics.jsonl"))]

    whole = run(tmp_path / "whole")
    run(tmp_path / "split", "--max-steps-per-run", "2")
    resumed = run(tmp_path / "split", "--resume")
    assert len(whole) == 4 and resumed == whole


def test_stop_flag_agrees_without_waiting_for_the_step(dist):
    # train.py's stop flag, multi-rank path on this one rank (Dist says two ranks; the all-reduce runs on the real
    # group of one): the stop is agreed one step late, and agreed() returns while this step's kernels are
    # still queued (a host sync on the flag would have drained the queue).
    stop = fsdp_setup.StopRequest(fsdp_setup.Dist(0, 0, 2, dist.device))
    a = torch.randn(4096, 4096, device=dist.device)
    agreed, still_busy = [], []
    try:
        for i in range(5):
            for _ in range(60):  # a "step": a long run of GPU kernels, queued without waiting
                a.copy_(torch.tanh(a @ a / 64))
            if i == 2:
                stop.handler(signal.SIGTERM, None)
            agreed.append(stop.agreed())
            still_busy.append(not torch.cuda.current_stream(dist.device).query())
    finally:
        stop.restore()
    assert agreed == [False, False, False, True, True]
    assert all(still_busy)
