"""fsdp_setup: every layout trains exactly like one process; init, AC, precision, validation, launch env.

The multi-rank checks share ONE 2-rank gloo launch (process-group start-up is the slow part):
`_worker` runs every scenario and saves what it saw; the tests below compare that against
independent single-process references computed here.
"""

from __future__ import annotations

import ast
import math
import os
import subprocess
import sys

import torch
import torch.distributed as dist
import pytest
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.overrides import TorchFunctionMode

import fsdp_setup
from _dist_util import run_ranks
from fsdp_setup import LaunchEnv, checkpoint_every, first_host, resolve_launch, validate_layout
from mae import MaskedAutoencoder
from vit import get_config

WORLD = 2
DECODER = dict(decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4)  # 2 + 2 Blocks
GLOBAL_BATCH, STEPS, LR, MAX_NORM = 8, 5, 1e-3, 0.3
LAYOUTS = {  # name -> (strategy, shard_group_size)
    "full_shard": ("full_shard", None),
    "shard_grad_op": ("shard_grad_op", None),
    "hybrid_1": ("hybrid_shard", 1),
    "hybrid_2": ("hybrid_shard", 2),
    "no_shard": ("no_shard", None),
    "ddp": ("ddp", None),
}
OFFLOAD_LAYOUTS = ("full_shard", "hybrid_1", "no_shard")  # cpu_offload=True on these
BF16_RUNS = {  # name -> (strategy, shard_group_size, mixed_precision)
    "full_shard bf16": ("full_shard", None, "bf16"),
    "full_shard bf16-reduce": ("full_shard", None, "bf16-reduce"),
    "hybrid_1 bf16": ("hybrid_shard", 1, "bf16"),
    "ddp bf16": ("ddp", None, "bf16"),
    "ddp bf16-reduce": ("ddp", None, "bf16-reduce"),
}
# bf16 rounds every matmul input to 8 significant bits. Measured |bf16 - fp32| of the loss (~1.2)
# over the 5 steps: 6.5e-4 here (FSDP2 bf16 / bf16-reduce), 3e-4 (DDP autocast); ViT-B on an H100,
# 3 steps: 3.4e-4. The bound is ~8x the worst of these.
BF16_LOSS_TOL = 5e-3
BAD_LAYOUTS = [
    dict(strategy="hybrid_shard", shard_group_size=3),  # world 2 not divisible by 3
    dict(strategy="hybrid_shard", shard_group_size=None),  # hybrid needs a group size
    dict(strategy="hybrid_shard", shard_group_size=0),
    dict(strategy="full_shard", shard_group_size=2),  # group size with a strategy that ignores it
    dict(strategy="zero3"),
    dict(strategy="full_shard", mixed_precision="fp16"),
    dict(strategy="full_shard", activation_checkpointing="some"),
    dict(strategy="ddp", activation_checkpointing=0),
    dict(strategy="ddp", cpu_offload=True),  # DDP has nothing to offload
]


def build(drop_path: float = 0.0, meta: bool = True) -> MaskedAutoencoder:
    cfg = get_config("vit_tiny", drop_path=drop_path)  # 32 px, patch 8: L = 16 patches
    if not meta:
        return MaskedAutoencoder(cfg, **DECODER)  # initialised with seed 0
    with torch.device("meta"):
        return MaskedAutoencoder(cfg, **DECODER)


def make_batch():
    """Fixed images and masking noise. The noise is a permutation / L: exact in bf16 and tie-free,
    so every precision and every rank masks the same patches."""
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g)
    noise = torch.stack([torch.randperm(16, generator=g) for _ in range(GLOBAL_BATCH)]).float() / 16
    return imgs, noise


def rank_slice(rank: int, world: int = WORLD) -> slice:
    per_rank = GLOBAL_BATCH // world
    return slice(rank * per_rank, (rank + 1) * per_rank)


def train(model, imgs, noise, steps: int = STEPS, distributed: bool = False):
    """AdamW + clipping; returns per-step losses of the whole global batch and gradient norms.

    Every sample masks the same number of patches, so the global loss is the mean of the rank
    losses, and FSDP/DDP's averaged gradient is the gradient of that global loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.05)
    losses, norms = [], []
    for _ in range(steps):
        loss = model(imgs, 0.75, noise)[0]
        loss.backward()
        norms.append(fsdp_setup.clip_grad_norm_(model, MAX_NORM).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.detach().clone()
        if distributed:
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
        losses.append(loss.item())
    return losses, norms


class InPlaceCalls(TorchFunctionMode):
    """Records the in-place torch functions called (`mul_`, `_foreach_mul_`, ...). At the
    torch-function level, so DTensor gradients count too (their version counters do not move)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):
            self.names.append(name)
        return func(*args, **(kwargs or {}))


def norm_only(model) -> dict:
    """clip_grad_norm_ with no limit (train.py without --clip-grad): the norm, and what it wrote."""
    with InPlaceCalls() as calls:
        norm = fsdp_setup.clip_grad_norm_(model, math.inf)
    return dict(norm=norm, plain=type(norm) is torch.Tensor, in_place=calls.names)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t.detach().clone()


def full_state(model) -> dict[str, torch.Tensor]:
    return {k: full(v) for k, v in fsdp_setup.unwrap(model).state_dict().items()}


def full_grads(model) -> dict[str, torch.Tensor]:
    return {k: full(p.grad) for k, p in fsdp_setup.unwrap(model).named_parameters()}


def layout_of(model) -> dict:
    """Each parameter's layout through the public DTensor API, None for a plain tensor:
    (placements, mesh shape, mesh dim names, local shape, global shape)."""
    return {name: (p.placements, tuple(p.device_mesh.shape), p.device_mesh.mesh_dim_names,
                   tuple(p.to_local().shape), tuple(p.shape)) if isinstance(p, DTensor) else None
            for name, p in fsdp_setup.unwrap(model).named_parameters()}


def sharded_per_block(model) -> list[bool]:
    """Per Block: are its registered parameters the sharded DTensors? While a unit is gathered, FSDP2
    registers the full plain tensors on the module instead, and puts the shards back when it reshards."""
    from vit import Block

    return [all(isinstance(p, DTensor) for p in b.parameters()) for b in model.modules() if isinstance(b, Block)]


def blocks_run_per_step(model, imgs, noise) -> list[int]:
    """How often each Block's forward ran in one forward + backward: 2 for a recomputed (checkpointed) Block."""
    from vit import Block

    blocks = [b for b in model.modules() if isinstance(b, Block)]
    runs = [0] * len(blocks)

    def counter(i):
        def count(module, args):
            runs[i] += 1
        return count

    hooks = [b.norm1.register_forward_pre_hook(counter(i)) for i, b in enumerate(blocks)]  # norm1: a Block's first op
    model(imgs, 0.75, noise)[0].backward()
    for hook in hooks:
        hook.remove()
    return runs


def _worker(rank: int, out_dir: str) -> None:
    """Every multi-rank scenario, in one process group. Runs on each rank."""
    from vit import Block

    fsdp_setup.init_distributed()
    imgs, noise = make_batch()
    imgs, noise = imgs[rank_slice(rank)], noise[rank_slice(rank)]
    seen: dict = {}

    # Impossible layouts: a ValueError on this rank, and no rank left waiting in a collective.
    errors = []
    for kwargs in BAD_LAYOUTS:
        try:
            fsdp_setup.parallelize(build(), **kwargs)
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    dist.barrier()
    seen["errors"] = errors

    # Meta build, sharded, materialised per shard; each parameter's DTensor layout; then which Blocks
    # are sharded again right after forward (resharded) and after backward.
    seen["meta"], seen["layout"], seen["reshard"] = {}, {}, {}
    for name, (strategy, k) in LAYOUTS.items():
        model = fsdp_setup.parallelize(build(), strategy, k, mixed_precision="fp32")
        seen["meta"][name] = full_state(model)
        seen["layout"][name] = layout_of(model)
        if strategy != "ddp":
            loss = model(imgs, 0.75, noise)[0]
            after_forward = sharded_per_block(model)
            loss.backward()
            seen["reshard"][name] = dict(after_forward=after_forward, after_backward=sharded_per_block(model))
    # seed is honoured on the meta path; a model with real weights keeps them (seed ignored).
    seen["meta_seed_1"] = full_state(fsdp_setup.parallelize(build(), "full_shard", mixed_precision="fp32", seed=1))
    seen["normal_build_kept"] = full_state(fsdp_setup.parallelize(build(meta=False), "hybrid_shard", 2, mixed_precision="fp32", seed=1))

    # Every layout, 5 steps in fp32.
    seen["train"] = {}
    for name, (strategy, k) in LAYOUTS.items():
        model = fsdp_setup.parallelize(build(), strategy, k, mixed_precision="fp32")
        losses, norms = train(model, imgs, noise, distributed=True)
        seen["train"][name] = dict(losses=losses, norms=norms, state=full_state(model))

    # CPU offload. On this CPU-only machine the shards already live in host memory, so this checks
    # the code path (policy on every unit, per-shard init into host memory, the same training);
    # tools/gpu_check.py checks the real host <-> GPU traffic.
    seen["offload"] = {}
    real_fully_shard = fsdp_setup.fully_shard
    for name in OFFLOAD_LAYOUTS:
        strategy, k = LAYOUTS[name]
        init = full_state(fsdp_setup.parallelize(build(), strategy, k, mixed_precision="fp32", cpu_offload=True))
        policies = []  # the offload policy handed to each fully_shard call (one per FSDP unit)

        def recording_fully_shard(module, **kwargs):
            policies.append(type(kwargs["offload_policy"]).__name__)
            return real_fully_shard(module, **kwargs)

        fsdp_setup.fully_shard = recording_fully_shard
        try:
            model = fsdp_setup.parallelize(build(), strategy, k, mixed_precision="fp32", cpu_offload=True)
        finally:
            fsdp_setup.fully_shard = real_fully_shard
        shard_devices = {p.to_local().device.type for p in model.parameters()}
        losses, norms = train(model, imgs, noise, distributed=True)
        seen["offload"][name] = dict(init=init, losses=losses, norms=norms, state=full_state(model), policies=policies,
                                     shard_devices=shard_devices)

    seen["bf16"] = {}
    for name, (strategy, k, precision) in BF16_RUNS.items():
        model = fsdp_setup.parallelize(build(), strategy, k, mixed_precision=precision)
        seen["bf16"][name] = train(model, imgs, noise, distributed=True)[0]

    # Activation checkpointing with drop path on (its RNG must replay identically on recompute).
    seen["ac"] = {}
    for ac in ("none", "full", 2):
        model = fsdp_setup.parallelize(build(drop_path=0.5), "full_shard", mixed_precision="fp32", activation_checkpointing=ac)
        model.train()
        torch.manual_seed(1234)
        loss = model(imgs, 0.75, noise)[0]
        loss.backward()
        grads = full_grads(model)
        model.zero_grad(set_to_none=True)
        seen["ac"][ac] = dict(loss=loss.item(), grads=grads, keys=list(model.state_dict()),
                              block_runs=blocks_run_per_step(model, imgs, noise))
    torch.manual_seed(4321)  # control: a different drop-path draw must change the loss
    seen["ac_other_seed_loss"] = model(imgs, 0.75, noise)[0].item()

    # Gradient accumulation: sync off for the first micro-batch = one backward on both halves.
    seen["accum"] = {}
    for name in ("full_shard", "hybrid_1", "ddp"):
        strategy, k = LAYOUTS[name]
        model = fsdp_setup.parallelize(build(), strategy, k, mixed_precision="fp32")
        model(imgs, 0.75, noise)[0].backward()
        whole = full_grads(model)
        model.zero_grad(set_to_none=True)
        for i, micro in enumerate((slice(0, 2), slice(2, 4))):
            fsdp_setup.set_grad_sync(model, enabled=i == 1)
            (model(imgs[micro], 0.75, noise[micro])[0] / 2).backward()
            if i == 0:  # what the first micro-step left: local, unreduced gradients only
                after_first = {k: None if p.grad is None else full(p.grad) for k, p in fsdp_setup.unwrap(model).named_parameters()}
        seen["accum"][name] = (whole, full_grads(model))
        seen.setdefault("accum_first", {})[name] = after_first

    # No clipping (max_norm inf): the global norm, no gradient written.
    seen["norm_only"] = {}
    for name in ("full_shard", "hybrid_2", "ddp"):
        strategy, k = LAYOUTS[name]
        model = fsdp_setup.parallelize(build(), strategy, k, mixed_precision="fp32")
        model(imgs, 0.75, noise)[0].backward()
        seen["norm_only"][name] = norm_only(model)
        if name == "ddp":  # gradient_as_bucket_view: the grads are views into a few DDP buckets (the planner counts no copy)
            grads = [p.grad for p in model.parameters()]
            seen["ddp_grad_storages"] = (len(grads), len({g.untyped_storage().data_ptr() for g in grads}))

    # compile=True with AC and a 2-D mesh. aot_eager instead of inductor: it traces the blocks
    # through dynamo and AOT autograd like inductor does, in seconds instead of ~50 s of C++ codegen
    # on this CPU (inductor itself is exercised by the GPU benchmark).
    eager = fsdp_setup.parallelize(build(), "hybrid_shard", 2, mixed_precision="fp32", activation_checkpointing="full")
    original_compile = torch.nn.Module.compile
    compiled_modules = []

    def compile_aot_eager(self, *args, **kwargs):
        compiled_modules.append(self)
        return original_compile(self, backend="aot_eager")

    torch.nn.Module.compile = compile_aot_eager
    try:
        compiled = fsdp_setup.parallelize(build(), "hybrid_shard", 2, mixed_precision="fp32", activation_checkpointing="full", compile=True)
    finally:
        torch.nn.Module.compile = original_compile
    seen["compile"] = dict(
        eager=train(eager, imgs, noise, steps=2, distributed=True)[0],
        compiled=train(compiled, imgs, noise, steps=2, distributed=True)[0],
        compiled_blocks=sum(any(m is b for m in compiled_modules) for b in compiled.modules() if isinstance(b, Block)),
        keys=list(compiled.state_dict()),
    )

    torch.save(seen, f"{out_dir}/rank{rank}.pt")
    fsdp_setup.cleanup()


def _worker_2x2(rank: int, out_dir: str) -> None:
    """HSDP on a real 2-D mesh (2 replicas x 2 shards): replica all-reduce and shard-only norm together."""
    fsdp_setup.init_distributed()
    imgs, noise = make_batch()
    imgs, noise = imgs[rank_slice(rank, 4)], noise[rank_slice(rank, 4)]
    model = fsdp_setup.parallelize(build(), "hybrid_shard", 2, mixed_precision="fp32")
    losses, norms = train(model, imgs, noise, distributed=True)
    torch.save(dict(losses=losses, norms=norms, state=full_state(model)), f"{out_dir}/rank{rank}.pt")
    fsdp_setup.cleanup()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fsdp")
    run_ranks(_worker, WORLD, args=(str(out_dir),), timeout_s=240)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def reference():
    """One process, whole global batch, no process group."""
    imgs, noise = make_batch()
    model = build(meta=False)
    losses, norms = train(model, imgs, noise)
    return dict(losses=losses, norms=norms, state=model.state_dict())


# ---- multi-rank -------------------------------------------------------------------------------


def assert_same_weights(actual: torch.Tensor, expected: torch.Tensor, key: str, msg: str) -> None:
    """Equal to well within one AdamW step (LR), except the attention key bias.

    The key bias has exactly zero gradient in exact arithmetic (softmax ignores a constant added
    to all of a query's scores), so its gradient is rounding noise that depends on summation
    order, and Adam normalises that noise to steps of up to LR. It only gets a loose check.
    """
    if key.endswith("attn.qkv.bias"):
        D = expected.shape[0] // 3
        torch.testing.assert_close(actual[D : 2 * D], expected[D : 2 * D], rtol=0, atol=LR / 10, msg=msg)
        actual, expected = torch.cat([actual[:D], actual[2 * D :]]), torch.cat([expected[:D], expected[2 * D :]])
    torch.testing.assert_close(actual, expected, rtol=0, atol=5e-6, msg=msg)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_trains_like_one_process(ranks, reference, layout):
    assert min(reference["norms"]) > MAX_NORM  # clipping is active in every step, so it is tested too
    for seen in ranks:
        run = seen["train"][layout]
        assert max(abs(a - b) for a, b in zip(run["losses"], reference["losses"])) < 1e-5, (run["losses"], reference["losses"])
        torch.testing.assert_close(torch.tensor(run["norms"]), torch.tensor(reference["norms"]), rtol=1e-5, atol=0)
        for key, value in reference["state"].items():
            assert_same_weights(run["state"][key], value, key, msg=f"{layout}: {key}")
    # Replicas hold bit-identical weights (the all-reduce across replicas happened).
    for key, value in ranks[0]["train"][layout]["state"].items():
        assert torch.equal(value, ranks[1]["train"][layout]["state"][key]), f"{layout}: ranks differ in {key}"


def test_hybrid_2x2_mesh_on_4_ranks_trains_like_one_process(reference, tmp_path):
    run_ranks(_worker_2x2, 4, args=(str(tmp_path),), timeout_s=180)
    runs = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(4)]
    for run in runs:
        assert max(abs(a - b) for a, b in zip(run["losses"], reference["losses"])) < 1e-5
        torch.testing.assert_close(torch.tensor(run["norms"]), torch.tensor(reference["norms"]), rtol=1e-5, atol=0)
        for key, value in reference["state"].items():
            assert_same_weights(run["state"][key], value, key, msg=f"2x2: {key}")
            assert torch.equal(run["state"][key], runs[0]["state"][key]), f"2x2: ranks differ in {key}"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_meta_build_sharded_equals_normal_build(ranks, layout):
    normal = build(meta=False).state_dict()
    for seen in ranks:
        state = seen["meta"][layout]
        assert state.keys() == normal.keys()
        for key, value in normal.items():
            assert torch.equal(state[key], value), f"{layout}: {key}"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_parameters_are_dtensors_on_the_layouts_mesh(ranks, layout):
    """Placements and mesh per layout, and each rank's shard: halves on a shard dimension of 2, whole on 1."""
    strategy, k = LAYOUTS[layout]
    names = list(build(meta=False).state_dict())
    for seen in ranks:
        params = seen["layout"][layout]
        assert set(params) <= set(names) and "blocks.0.attn.qkv.weight" in params
        if strategy == "ddp":
            assert all(p is None for p in params.values())
            continue
        expected = {  # (placements, mesh shape, mesh dim names) on 2 ranks
            "full_shard": ((Shard(0),), (2,), ("shard",)),
            "shard_grad_op": ((Shard(0),), (2,), ("shard",)),
            "hybrid_1": ((Replicate(), Shard(0)), (2, 1), ("replicate", "shard")),
            "hybrid_2": ((Replicate(), Shard(0)), (1, 2), ("replicate", "shard")),
            "no_shard": ((Replicate(), Shard(0)), (2, 1), ("replicate", "shard")),
        }[layout]
        for name, param in params.items():
            assert param is not None and param[:3] == expected, (layout, name, param)
    shard_size = 2 if layout in ("full_shard", "shard_grad_op", "hybrid_2") else 1
    if strategy != "ddp":
        for name, (*_, local0, global_shape) in ranks[0]["layout"][layout].items():
            local1 = ranks[1]["layout"][layout][name][3]
            if shard_size == 1:
                assert local0 == local1 == global_shape, (layout, name)
            else:  # dim 0 split in two (the first rank takes the larger half), the rest whole
                assert local0[0] == -(-global_shape[0] // 2) and local0[0] + local1[0] == global_shape[0], (layout, name)
                assert local0[1:] == local1[1:] == global_shape[1:], (layout, name)


def test_every_block_but_the_last_reshards_after_forward_when_the_layout_does(ranks):
    for seen in ranks:
        blocks = 4  # 2 encoder + 2 decoder Blocks
        for name in ("full_shard", "hybrid_1", "hybrid_2"):
            assert seen["reshard"][name]["after_forward"] == [True] * (blocks - 1) + [False], name
        for name in ("shard_grad_op", "no_shard"):
            assert seen["reshard"][name]["after_forward"] == [False] * blocks, name
        for name, reshard in seen["reshard"].items():  # every layout reshards after backward
            assert reshard["after_backward"] == [True] * blocks, name


def test_seed_and_existing_weights(ranks):
    normal = build(meta=False)
    for seen in ranks:
        for key, value in normal.state_dict().items():
            assert torch.equal(seen["normal_build_kept"][key], value), key
        normal_seed_1 = build(meta=False)
        normal_seed_1.init_weights(seed=1)
        for key, value in normal_seed_1.state_dict().items():
            assert torch.equal(seen["meta_seed_1"][key], value), key
        assert not torch.equal(seen["meta_seed_1"]["blocks.0.attn.qkv.weight"], normal.state_dict()["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("layout", OFFLOAD_LAYOUTS)
def test_cpu_offload_trains_like_one_process(ranks, reference, layout):
    normal = build(meta=False).state_dict()
    for seen in ranks:
        run = seen["offload"][layout]
        # on every FSDP unit: 4 Blocks, patch_embed, the root
        assert run["policies"] == ["CPUOffloadPolicy"] * 6, run["policies"]
        assert run["shard_devices"] == {"cpu"}
        for key, value in normal.items():
            assert torch.equal(run["init"][key], value), f"{layout} offload init: {key}"
        assert max(abs(a - b) for a, b in zip(run["losses"], reference["losses"])) < 1e-5, (run["losses"], reference["losses"])
        torch.testing.assert_close(torch.tensor(run["norms"]), torch.tensor(reference["norms"]), rtol=1e-5, atol=0)
        for key, value in reference["state"].items():
            assert_same_weights(run["state"][key], value, key, msg=f"{layout} offload: {key}")


def test_bf16_close_to_fp32(ranks, reference):
    for seen in ranks:
        for name, losses in seen["bf16"].items():
            worst = max(abs(a - b) for a, b in zip(losses, reference["losses"]))
            assert worst < BF16_LOSS_TOL, f"{name}: |bf16 - fp32 loss| = {worst:.2e}"
            assert worst > 0, f"{name}: identical to fp32, so bf16 was not applied"


def test_activation_checkpointing_gives_same_gradients(ranks):
    for seen in ranks:
        ac = seen["ac"]
        # forward runs per Block (encoder 0, 1, decoder 2, 3) in one step: checkpointed ones run again in backward
        assert [ac[k]["block_runs"] for k in ("none", "full", 2)] == [[1, 1, 1, 1], [2, 2, 2, 2], [1, 2, 1, 2]]
        assert seen["ac_other_seed_loss"] != ac["none"]["loss"]  # drop path is really random here
        for mode in ("full", 2):
            assert ac[mode]["keys"] == ac["none"]["keys"]
            assert ac[mode]["loss"] == ac["none"]["loss"]
            for key, grad in ac["none"]["grads"].items():
                torch.testing.assert_close(ac[mode]["grads"][key], grad, rtol=0, atol=1e-7, msg=f"AC {mode}: {key}")


def test_state_dict_keys_stay_official(ranks):
    official = list(build(meta=False).state_dict())
    assert "blocks.0.attn.qkv.weight" in official
    for seen in ranks:
        assert seen["ac"]["full"]["keys"] == official
        assert seen["compile"]["keys"] == official


def test_grad_sync_off_accumulates_like_one_backward(ranks):
    for seen in ranks:
        for name, (whole, accumulated) in seen["accum"].items():
            for key, grad in whole.items():
                torch.testing.assert_close(accumulated[key], grad, rtol=1e-5, atol=1e-7, msg=f"{name}: {key}")


def test_grad_sync_off_really_skips_the_reduction(ranks):
    """The test above cannot tell a skipped reduction from one done twice (the sums agree); this one
    can: after a micro-step with sync off, FSDP2 has reduced nothing into the sharded .grad, and
    DDP's gradients are each rank's own, so the ranks differ."""
    for name in ("full_shard", "hybrid_1"):
        for seen in ranks:
            assert all(grad is None for grad in seen["accum_first"][name].values()), name
    ddp = [seen["accum_first"]["ddp"]["blocks.0.attn.qkv.weight"] for seen in ranks]
    assert not torch.allclose(ddp[0], ddp[1]), "ddp: gradients were all-reduced on a no-sync micro-step"


def test_no_clipping_only_measures_the_norm(ranks, reference):
    """max_norm=inf: the norm of the first step's gradients, as a plain tensor; no multiply by 1."""
    imgs, noise = make_batch()
    model = build(meta=False)
    model(imgs, 0.75, noise)[0].backward()
    runs = {"one process": norm_only(model), **{f"{name} rank {r}": run for r, seen in enumerate(ranks)
                                                for name, run in seen["norm_only"].items()}}
    for name, run in runs.items():
        assert run["plain"] and run["in_place"] == [], (name, run)
        torch.testing.assert_close(run["norm"], torch.tensor(reference["norms"][0]), rtol=1e-5, atol=0, msg=name)


def test_compile_applied_and_matches_eager(ranks):
    for seen in ranks:
        assert seen["compile"]["compiled_blocks"] == 4
        torch.testing.assert_close(torch.tensor(seen["compile"]["compiled"]), torch.tensor(seen["compile"]["eager"]), rtol=0, atol=1e-5)


def test_ddp_grads_are_bucket_views(ranks):
    """Separate gradient tensors would have one storage each; views into DDP's buckets share a few."""
    for seen in ranks:
        num_grads, num_storages = seen["ddp_grad_storages"]
        assert num_storages < num_grads / 4, seen["ddp_grad_storages"]


def test_impossible_layouts_raise_on_every_rank(ranks):
    for seen in ranks:
        assert all(error is not None for error in seen["errors"]), seen["errors"]
    first = ranks[0]["errors"]
    assert "not divisible by shard_group_size 3" in first[0] and "[1, 2]" in first[0]
    assert "needs shard_group_size" in first[1]
    assert "only applies to strategy hybrid_shard" in first[3]
    assert "unknown strategy (--strategy) 'zero3'" in first[4]
    assert "--cpu-offload needs an FSDP layout" in first[8]


# ---- single process: pure functions -------------------------------------------------------------


@pytest.mark.parametrize(
    "nodelist, host",
    [
        ("frontier[00123-00125,00200]", "frontier00123"),
        ("frontier00042", "frontier00042"),
        ("nid[001-004],login1", "nid001"),
        ("gpu-a100-[07,09-10]", "gpu-a100-07"),
        ("rack[2-3]-node[08-09]", "rack2-node08"),
        ("node1,node2", "node1"),
    ],
)
def test_first_host_of_slurm_nodelist(nodelist, host):
    assert first_host(nodelist) == host


def test_first_host_rejects_garbage():
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        first_host("frontier[001")


def test_resolve_launch():
    torchrun = dict(RANK="3", LOCAL_RANK="1", WORLD_SIZE="8", MASTER_ADDR="h", MASTER_PORT="1")
    assert resolve_launch(torchrun) == LaunchEnv("torchrun", 3, 1, 8)
    slurm = dict(SLURM_PROCID="9", SLURM_LOCALID="1", SLURM_NTASKS="16", SLURM_JOB_NODELIST="frontier[00007-00008]")
    assert resolve_launch(slurm) == LaunchEnv("slurm", 9, 1, 16, "frontier00007", 29500)
    assert resolve_launch({**slurm, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}).master_addr == "10.0.0.1"
    # srun ... torchrun: torchrun's per-process variables win over the per-node SLURM task.
    assert resolve_launch({**slurm, **torchrun}).launcher == "torchrun"
    # a one-task SLURM allocation, or no launcher: one process, nobody to wait for
    assert resolve_launch({**slurm, "SLURM_NTASKS": "1"}).launcher == "single"
    assert resolve_launch({}) == LaunchEnv("single", 0, 0, 1)


def test_validate_layout_accepts_the_paper_layouts():
    for k in (1, 2, 4, 8, 16):
        validate_layout("hybrid_shard", k, 16)
    for strategy in ("full_shard", "shard_grad_op", "no_shard", "ddp"):
        validate_layout(strategy, None, 16, "fp32", "full")
    assert [checkpoint_every(v) for v in ("none", "full", 3, "2")] == [0, 1, 3, 2]


def test_bf16_on_a_device_without_bf16_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    with pytest.raises(ValueError, match="V100 does not support; use --mixed-precision fp32"):
        validate_layout("full_shard", None, 8, "bf16", device=torch.device("cuda", 0))
    validate_layout("full_shard", None, 8, "fp32", device=torch.device("cuda", 0))


def test_cpu_offload_on_gpus_needs_cpu_collectives(monkeypatch):
    """Offloaded gradients are CPU tensors: clipping all-reduces their norm, which nccl alone cannot."""
    monkeypatch.setattr(fsdp_setup.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(fsdp_setup.dist, "get_backend_config", lambda *a: "cuda:nccl")
    cuda = torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"cpu_collectives=True"):
        validate_layout("full_shard", None, 8, "fp32", device=cuda, cpu_offload=True)
    monkeypatch.setattr(fsdp_setup.dist, "get_backend_config", lambda *a: "cuda:nccl,cpu:gloo")
    validate_layout("full_shard", None, 8, "fp32", device=cuda, cpu_offload=True)


def test_buffers_on_moves_and_brings_back_what_was_written():
    model = build(meta=False)
    homes = {name: buffer.device for name, buffer in model.named_buffers()}
    with fsdp_setup.buffers_on(model, torch.device("meta")):  # the only other device a CPU machine has
        assert all(b.is_meta for b in model.buffers())
        for name in homes:  # as a state-dict load writes them (meta tensors cannot travel back)
            setattr(model, name, torch.full(getattr(model, name).shape, 7.0))
    assert {name: b.device for name, b in model.named_buffers()} == homes
    assert all(torch.equal(b, torch.full(b.shape, 7.0)) for b in model.buffers())
    assert set(homes) <= set(model.state_dict())  # still registered (persistent) buffers


def test_parallelize_without_process_group_is_a_clear_error():
    if dist.is_initialized():
        pytest.skip("another test left a process group")
    with pytest.raises(ValueError, match="init_distributed"):
        fsdp_setup.parallelize(build(), "full_shard")


SINGLE_PROCESS_SCRIPT = """
import torch
torch.set_num_threads(1)
import fsdp_setup, test_fsdp as t
info = fsdp_setup.init_distributed()
assert (info.rank, info.world_size, info.is_main) == (0, 1, True), info
model = fsdp_setup.parallelize(t.build(), "full_shard", mixed_precision="fp32")
imgs, noise = t.make_batch()
print("LOSSES", t.train(model, imgs, noise, steps=2)[0])
fsdp_setup.cleanup()
"""


def test_no_launcher_runs_the_fsdp_path_in_one_process(reference, tmp_path):
    """No torchrun/SLURM variables: a world-size-1 group on an in-memory store, same results."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK") and not k.startswith("SLURM_")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, "tests")])
    done = subprocess.run([sys.executable, "-c", SINGLE_PROCESS_SCRIPT], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[fsdp] launcher single: world size 1" in done.stdout
    losses = ast.literal_eval(done.stdout.split("LOSSES")[1].strip())
    assert max(abs(a - b) for a, b in zip(losses, reference["losses"])) < 1e-5
