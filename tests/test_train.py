"""train.py: the demo runs; resume is bit-exact (1 and 2 ranks); signals, NaNs and crashes during
a save leave a resumable run folder; export loads into a plain VisionTransformer.

References are independent of the code under test: an uninterrupted run for every resumed one,
torch's own DCP-to-file converter for export and resharding, hand-computed schedules.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict import get_state_dict

import checkpoint
import data
import fsdp_setup
import metrics
import train
import weights
from _dist_util import exit_code_of_rank, free_port, run_ranks
from vit import ViTConfig, VisionTransformer, apply_sdpa_choice, get_config

# A tiny model on 32 px chips: a step takes milliseconds, a run a second or two.
TINY = ["--model", "vit_tiny", "--decoder-embed-dim", "32", "--decoder-depth", "1", "--decoder-num-heads", "4",
        "--batch-size", "8", "--lr", "1e-3", "--warmup-steps", "2", "--workers", "0", "--log-every", "1",
        "--mixed-precision", "fp32", "--strategy", "full_shard"]
STEPS = 10  # 64 chips / batch 8 = 8 steps per epoch on one rank: resume and the run cross an epoch boundary


@pytest.fixture(scope="module")
def chips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chips")
    data.make_demo_chips(str(folder), n=64, size=48, bands=4)  # stats.json inside: found by train.py
    return str(folder)


def args(chips, out, *extra, steps=STEPS):
    return [*TINY, "--data", chips, "--out", str(out), "--steps", str(steps), *extra]


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, f)]


def latest(out):
    with open(os.path.join(out, "latest")) as f:
        return f.read().strip()


def whole(tensor):
    """A DTensor (FSDP2 shard) gathered; a plain tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def on_call(n, step_fn, action):
    """train_step that runs `action` at the start of its n-th call (counted in this process), then steps."""
    calls = []

    def step(*a, **kw):
        calls.append(1)
        if len(calls) == n:
            action()
        return step_fn(*a, **kw)

    return step


def full_checkpoint(folder, tmp_path):
    """Every tensor of a DCP checkpoint, read by torch's own converter (not by checkpoint.py's code)."""
    target = tmp_path / f"full-{os.path.basename(folder)}.pt"
    dcp_to_torch_save(str(folder), str(target))
    return torch.load(target, weights_only=True)


@pytest.fixture(scope="module")
def reference(chips, tmp_path_factory):
    """An uninterrupted STEPS-step run on one rank: what every interrupted run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    assert train.main(args(chips, out)) == 0
    return out


# ---- pure pieces ----


def test_lr_schedule_warmup_then_half_cosine():
    assert train.lr_at(0, 1.0, 110, 10) == 0.0
    assert train.lr_at(5, 1.0, 110, 10) == 0.5
    assert train.lr_at(10, 1.0, 110, 10) == 1.0
    assert train.lr_at(60, 1.0, 110, 10) == pytest.approx(0.5)  # halfway through the cosine
    assert train.lr_at(110, 1.0, 110, 10) == pytest.approx(0.0)
    assert train.lr_at(60, 1.0, 110, 10, min_lr=0.2) == pytest.approx(0.6)  # cosine from 1.0 down to 0.2
    assert train.lr_at(500, 1.0, 110, 10, min_lr=0.2) == pytest.approx(0.2)


def test_schedule_from_epochs_honours_zero_warmup():
    """--warmup-epochs 0 means no warmup, not the recipe's 40 epochs; --epochs/--blr as the recipe says."""
    cfg = train.TrainConfig(epochs=3, warmup_epochs=0.0, blr=1e-3)
    resolved = train.resolve_schedule(cfg, num_images=1000, steps_per_epoch=10, global_batch=512)
    assert (resolved.steps, resolved.warmup_steps, resolved.lr) == (30, 0, 1e-3 * 512 / 256)
    assert train.lr_at(0, resolved.lr, 30, 0) == resolved.lr  # full lr from the first step
    recipe = train.resolve_schedule(train.TrainConfig(), 1000, 10, 512)
    assert (recipe.steps, recipe.warmup_steps, recipe.lr) == (8000, 400, 1.5e-4 * 2)


def test_parse_args_demo_defaults_and_alternatives():
    demo = train.parse_args([])
    assert demo == train.demo_config() and (demo.model, demo.data, demo.steps) == ("vit_tiny", "demo", 800)
    real = train.parse_args(["--data", "synthetic", "--model", "vit_large"])
    assert (real.model, real.steps, real.lr, real.decoder_embed_dim) == ("vit_large", None, None, 512)
    assert train.parse_args(["--epochs", "3"]).steps is None  # --epochs replaces the demo's --steps
    assert train.parse_args(["--blr", "1e-3"]).lr is None
    assert train.parse_args(["--no-norm-pix-loss", "--resume"]).norm_pix_loss is False
    with pytest.raises(SystemExit):
        train.parse_args(["--steps", "5", "--epochs", "1"])


def test_optimizer_groups_follow_the_mae_recipe():
    from mae import MaskedAutoencoder

    model = MaskedAutoencoder(get_config("vit_tiny"), 32, 1, 4)
    optimizer = train.build_optimizer(model, weight_decay=0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in optimizer.param_groups)
    assert optimizer.param_groups[0]["weight_decay"] == 0.05 and optimizer.param_groups[1]["weight_decay"] == 0.0
    assert {"cls_token", "mask_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "norm.bias"} <= no_decay
    assert {"blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "decoder_pred.weight"} <= decay
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    assert len(decay) + len(no_decay) == len(names)


def test_adamw_implementations_take_the_same_steps():
    """fused (train.py's), foreach and for-loop: the same AdamW, so the same weights after a few steps."""
    from mae import MaskedAutoencoder

    imgs, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 16)
    weights = {}
    for implementation in train.ADAMW_IMPLEMENTATIONS:
        model = MaskedAutoencoder(get_config("vit_tiny"), 32, 1, 4)
        optimizer = train.build_optimizer(model, 0.05, implementation)
        for group in optimizer.param_groups:
            group["lr"] = 1e-3
        for _ in range(3):
            model(imgs, 0.75, noise)[0].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        weights[implementation] = model.state_dict()
    moved = (weights["fused"]["blocks.0.attn.qkv.weight"] - MaskedAutoencoder(get_config("vit_tiny"), 32, 1, 4)
             .state_dict()["blocks.0.attn.qkv.weight"]).abs().max()
    assert moved > 1e-3  # three steps of lr 1e-3 moved the weights: the comparison below is not vacuous
    for implementation in ("foreach", "for-loop"):
        for key, value in weights["fused"].items():
            actual = weights[implementation][key]
            if key.endswith("attn.qkv.bias"):
                # The key bias's gradient is zero in exact arithmetic (softmax ignores a constant per
                # query), i.e. rounding noise that Adam scales up to steps of lr: only a loose check.
                D = value.shape[0] // 3
                torch.testing.assert_close(actual[D:2 * D], value[D:2 * D], rtol=0, atol=3e-3)
                actual, value = torch.cat([actual[:D], actual[2 * D:]]), torch.cat([value[:D], value[2 * D:]])
            torch.testing.assert_close(actual, value, rtol=0, atol=1e-6, msg=f"{implementation}: {key}")


def test_sdpa_choice_sets_the_process_wide_switches():
    backends = torch.backends.cuda
    try:
        apply_sdpa_choice("cudnn")
        assert (backends.cudnn_sdp_enabled(), backends.flash_sdp_enabled(), backends.mem_efficient_sdp_enabled()) == (True, False, False)
        apply_sdpa_choice("math")
        assert not any((backends.cudnn_sdp_enabled(), backends.flash_sdp_enabled(), backends.mem_efficient_sdp_enabled()))
    finally:
        apply_sdpa_choice("auto")
    assert backends.cudnn_sdp_enabled() and backends.flash_sdp_enabled() and backends.mem_efficient_sdp_enabled()


def test_peak_tflops(monkeypatch):
    assert metrics.peak_tflops(torch.device("cpu")) == ("cpu", None)
    assert metrics.peak_tflops(torch.device("cpu"), 100.0) == ("cpu", 100.0)
    for name, expected in [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
                           ("NVIDIA A100-SXM4-80GB", 312.0), ("AMD Instinct MI250X", 191.5),
                           ("AMD Instinct MI300X", 1307.0), ("Tesla V100", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, n=name: n)
        assert metrics.peak_tflops(torch.device("cuda", 0)) == (name, expected)


def test_stop_flag_is_read_from_a_host_copy(monkeypatch):
    """Ranks agree on a stop one step late, reading last step's all-reduced flag. Reading it with
    .item() on the reduced (device) tensor would wait for the whole step queued behind it on the
    GPU: a host sync every step. The flag must be read from its host copy instead."""
    from torch.overrides import TorchFunctionMode

    reduced = []
    monkeypatch.setattr(fsdp_setup.dist, "all_reduce", lambda tensor, op=None, **kw: reduced.append(tensor))

    class Reads(TorchFunctionMode):
        names = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("item", "__bool__", "tolist") and any(args[0] is t for t in reduced):
                self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    stop = fsdp_setup.StopRequest(fsdp_setup.Dist(0, 0, 2, torch.device("cpu")))  # two ranks, as far as it knows
    try:
        with Reads() as reads:
            agreed = [stop.agreed(), stop.agreed()]
            stop.handler(signal.SIGTERM, None)
            agreed += [stop.agreed(), stop.agreed()]
    finally:
        stop.restore()
    assert agreed == [False, False, False, True]  # one step late
    assert reads.names == []


# ---- whole runs ----


def test_demo_smoke(tmp_path, capsys):
    """`python train.py` with a few steps: sample chips, metrics, config, checkpoint, picture."""
    from PIL import Image

    assert train.main(["--out", str(tmp_path), "--steps", "4", "--warmup-steps", "1", "--log-every", "2"]) == 0
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == [2, 4]
    assert set(records[0]) == {"step", "epoch", "loss", "lr", "grad_norm", "img_per_s", "tflops_per_gpu", "mfu",
                               "peak_mem_gib", "data_wait_frac"}
    assert records[0]["mfu"] is None and records[0]["img_per_s"] > 0 and math.isfinite(records[-1]["loss"])
    config = json.load(open(tmp_path / "config.json"))
    assert config["model"] == "vit_tiny" and config["in_chans"] == 4 and config["mixed_precision"] == "fp32"
    assert latest(tmp_path) == "step-4" and (tmp_path / "step-4" / ".metadata").is_file()
    picture = Image.open(tmp_path / "recon-step-4.png")
    # 5 panels across and 4 images down, 64 px, 2 px gaps, upscaled 2x; a 3-line legend below.
    assert picture.size == (2 * (5 * 64 + 4 * 2), 2 * (4 * 64 + 3 * 2) + 40) and picture.mode == "RGB"
    printed = capsys.readouterr().out
    assert "recon-step-4.png" in printed and "peak for MFU: cpu = unknown" in printed
    # Running the demo again starts over instead of refusing, and says so.
    capsys.readouterr()
    assert train.main(["--out", str(tmp_path), "--steps", "2", "--warmup-steps", "1", "--log-every", "2"]) == 0
    assert latest(tmp_path) == "step-2" and not (tmp_path / "step-4").exists()
    printed = capsys.readouterr().out  # names this run's picture, not the first run's recon-step-4.png
    assert f"demo: starting over in {tmp_path}" in printed
    assert "reconstruction " + str(tmp_path / "recon-step-2.png") in printed and "recon-step-4.png" not in printed


def test_every_checkpoint_gets_a_picture(chips, tmp_path):
    """--recon-every's default is "with each checkpoint": a stop at --max-steps-per-run saves one, so a picture too."""
    assert train.main(args(chips, tmp_path, "--ckpt-every", "100", "--max-steps-per-run", "3")) == 0
    assert latest(tmp_path) == "step-3" and (tmp_path / "recon-step-3.png").is_file()


@pytest.mark.parametrize("layout", [[], ["--strategy", "ddp"], ["--strategy", "hybrid_shard", "--shard-group-size", "1"],
                                    ["--cpu-offload"]],
                         ids=["full_shard", "ddp", "hybrid_shard", "cpu_offload"])
def test_resume_is_bit_exact_on_one_rank(chips, reference, tmp_path, layout):
    if layout:  # its own uninterrupted reference: DCP keys and meshes differ per layout
        reference = tmp_path / "reference"
        assert train.main(args(chips, reference, *layout)) == 0
    run = tmp_path / "run"
    assert train.main(args(chips, run, *layout, "--max-steps-per-run", "5")) == 0  # stops mid-epoch
    assert latest(run) == "step-5" and len(losses(run)) == 5
    assert train.main(args(chips, run, *layout, "--resume")) == 0
    assert losses(run) == losses(reference)  # loss and grad norm of every step, bit for bit
    exported, expected = weights.export_encoder(str(run)), weights.export_encoder(str(reference))
    assert all(torch.equal(exported["model"][k], expected["model"][k]) for k in expected["model"])


def test_resume_with_loader_workers_across_an_epoch(chips, reference, tmp_path):
    """Persistent loader workers (their own copy of the dataset, the epoch passed through shared
    memory) give the same batches as none, interrupted or not, across the epoch boundary at step 8."""
    assert train.main(args(chips, tmp_path, "--workers", "1", "--max-steps-per-run", "5")) == 0
    assert train.main(args(chips, tmp_path, "--workers", "1", "--resume")) == 0
    assert losses(tmp_path) == losses(reference)


def test_sigterm_saves_exits_zero_and_resumes(chips, reference, tmp_path, monkeypatch):
    # During the 4th step, as SLURM would, at any moment.
    monkeypatch.setattr(train, "train_step", on_call(4, train.train_step, lambda: os.kill(os.getpid(), signal.SIGTERM)))
    assert train.main(args(chips, tmp_path, "--ckpt-every", "100")) == 0
    assert latest(tmp_path) == "step-4" and len(losses(tmp_path)) == 4
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    monkeypatch.undo()
    assert train.main(args(chips, tmp_path, "--resume")) == 0
    assert losses(tmp_path) == losses(reference)


def test_sigterm_to_the_process_group_with_loader_workers(chips, tmp_path):
    """As SLURM preempts: the signal reaches the main process and its DataLoader workers alike."""
    argv = [sys.executable, train.__file__, *args(chips, tmp_path, "--workers", "1", "--log-every", "2", steps=10**6)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "metrics.jsonl").is_file() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, output
    assert "received SIGTERM" in output and latest(tmp_path).startswith("step-")


def test_nan_loss_stops_without_a_new_checkpoint(chips, tmp_path, monkeypatch, capsys):
    real_step, calls = train.train_step, []

    def nan_at_step_6(*a, **kw):
        calls.append(1)
        loss, grad_norm = real_step(*a, **kw)
        return loss * (math.nan if len(calls) == 6 else 1), grad_norm

    monkeypatch.setattr(train, "train_step", nan_at_step_6)
    code = train.cli(args(chips, tmp_path, "--ckpt-every", "2"))
    assert code == 1
    message = capsys.readouterr().err
    assert "not finite at step 6" in message and "step-4" in message and "Traceback" not in message
    assert latest(tmp_path) == "step-4"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("step-", ".tmp-step-"))) == ["step-2", "step-4"]


def test_nan_weights_are_never_saved(chips, tmp_path, monkeypatch):
    """An inf gradient poisons the weights one step before the loss shows it: the save checks them."""
    real_step, calls = train.train_step, []

    def poison(model, *a, **kw):
        calls.append(1)
        result = real_step(model, *a, **kw)
        if len(calls) == 4:  # the 4th step, whose end is a checkpoint
            with torch.no_grad():
                next(model.parameters()).to_local().fill_(math.inf)
        return result

    monkeypatch.setattr(train, "train_step", poison)
    with pytest.raises(train.TrainingDiverged, match="step 4.*step-2"):
        train.main(args(chips, tmp_path, "--ckpt-every", "2"))
    assert latest(tmp_path) == "step-2" and not (tmp_path / "step-4").exists()


def test_crash_during_save_keeps_the_previous_checkpoint(chips, reference, tmp_path, monkeypatch):
    real_replace = os.replace

    def killed_while_renaming(src, dst):
        if os.path.basename(src) == ".tmp-step-6":  # every rank's shards and .metadata are written
            raise KeyboardInterrupt("killed during save")
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", killed_while_renaming)
    with pytest.raises(KeyboardInterrupt):
        train.main(args(chips, tmp_path, "--ckpt-every", "3"))
    assert latest(tmp_path) == "step-3" and (tmp_path / ".tmp-step-6" / ".metadata").is_file()
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    assert train.main(args(chips, tmp_path, "--resume", "--ckpt-every", "3")) == 0
    assert losses(tmp_path) == losses(reference)  # metrics of the lost steps 4-6 were replaced
    assert not (tmp_path / ".tmp-step-6").exists() and latest(tmp_path) == f"step-{STEPS}"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("step-", ".tmp-step-"))) == ["step-10", "step-6", "step-9"]  # --keep 3


def test_resume_skips_a_checkpoint_missing_a_rank_file(chips, reference, tmp_path, capsys):
    """A step folder without one of its rank-R.json is incomplete: --resume takes the previous
    checkpoint, and load_checkpoint itself refuses it on every rank with a ValueError."""
    assert train.main(args(chips, tmp_path, "--ckpt-every", "3")) == 0
    (tmp_path / f"step-{STEPS}" / "rank-00000.json").unlink()
    capsys.readouterr()
    assert train.main(args(chips, tmp_path, "--resume", "--ckpt-every", "3")) == 0
    printed = capsys.readouterr().out
    assert "resume: " + str(tmp_path / "step-9") in printed and f"skipping {tmp_path / f'step-{STEPS}'}" in printed
    assert losses(tmp_path) == losses(reference)
    (tmp_path / f"step-{STEPS}" / "rank-00000.json").unlink()
    cfg = train.dataclasses.replace(train.parse_args(args(chips, tmp_path)), in_chans=4)
    dist = fsdp_setup.init_distributed()
    try:
        model = train.build_model(cfg, dist)
        optimizer = train.build_optimizer(model, cfg.weight_decay)
        with pytest.raises(ValueError, match=f"step-{STEPS} lacks rank-00000.json: the save was interrupted"):
            checkpoint.load_checkpoint(tmp_path / f"step-{STEPS}", model, optimizer, dist, torch.Generator())
    finally:
        fsdp_setup.cleanup()


def test_resume_through_damaged_checkpoints(chips, reference, tmp_path, capsys):
    """End to end through train.py: a garbled shard in the newest checkpoint falls back to the one
    before (and the run still equals the uninterrupted one); when no step folder verifies, --resume
    refuses with one line listing them, and deletes nothing, metrics.jsonl included."""
    assert train.main(args(chips, tmp_path, "--ckpt-every", "3")) == 0
    newest = tmp_path / f"step-{STEPS}"
    shard = next(newest.glob("*.distcp"))
    with open(shard, "r+b") as f:  # 4 KiB of zeros inside the weight data
        f.seek(shard.stat().st_size // 2)
        f.write(bytes(4096))
    capsys.readouterr()
    assert train.main(args(chips, tmp_path, "--resume", "--ckpt-every", "3")) == 0
    printed = capsys.readouterr().out
    assert f"skipping {newest}" in printed and "resume: " + str(tmp_path / "step-9") in printed
    assert losses(tmp_path) == losses(reference)

    for folder in tmp_path.glob("step-*"):  # now every checkpoint loses a rank file
        (folder / "rank-00000.json").unlink()
    before = sorted(p.name for p in tmp_path.iterdir())
    metrics = (tmp_path / "metrics.jsonl").read_text()
    assert train.cli(args(chips, tmp_path, "--resume", "--ckpt-every", "3")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1 and "none can be loaded" in err
    assert all(name in err for name in before if name.startswith("step-"))
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "metrics.jsonl").read_text() == metrics


def test_export_loads_into_a_vision_transformer(reference, tmp_path):
    target = tmp_path / "encoder.pt"
    assert checkpoint.cli(["export", "--ckpt", str(reference), "--out", str(target)]) == 0
    exported = torch.load(target, weights_only=True)
    assert exported["step"] == STEPS
    encoder = VisionTransformer(ViTConfig(**exported["vit_config"]))
    encoder.load_state_dict(exported["model"], strict=True)  # official layout: every key, nothing else
    full = full_checkpoint(reference / f"step-{STEPS}", tmp_path)["model"]
    for key, value in exported["model"].items():
        assert torch.equal(value, full[key]), key
    encoder(torch.randn(2, 4, 32, 32))


def test_init_loads_official_weights(chips, tmp_path):
    """--init: an ImageNet-MAE-style file (encoder only, under "model") sets the encoder; the decoder stays fresh."""
    from mae import MaskedAutoencoder

    source = MaskedAutoencoder(get_config("vit_tiny", in_chans=4), 32, 1, 4)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    torch.save({"model": source.encoder_state_dict()}, tmp_path / "mae.pth")
    cfg = train.parse_args(args(chips, tmp_path / "run", "--init", str(tmp_path / "mae.pth")))
    cfg = train.dataclasses.replace(cfg, in_chans=4)
    dist = fsdp_setup.init_distributed()
    try:
        model = train.build_model(cfg, dist)
        fresh = train.build_model(train.dataclasses.replace(cfg, init=None), dist)
        weights = {k: whole(v) for k, v in model.state_dict().items()}
        for key, value in source.encoder_state_dict().items():
            assert torch.equal(weights[key], value), key
        fresh_weights = {k: whole(v) for k, v in fresh.state_dict().items()}
        assert torch.equal(weights["decoder_pred.weight"], fresh_weights["decoder_pred.weight"])
        # The same through CPU offload (its buffers-on-CPU detour; the GPU case is in tools/gpu_check.py's smoke).
        offloaded = train.build_model(train.dataclasses.replace(cfg, cpu_offload=True), dist)
        for key, value in offloaded.state_dict().items():
            assert torch.equal(whole(value), weights[key]), key
        bad = train.dataclasses.replace(cfg, model="vit_small")  # another width (size and bands are adapted)
        with pytest.raises(ValueError, match="mae.pth does not fit this model"):
            train.build_model(bad, dist)
    finally:
        fsdp_setup.cleanup()


@pytest.mark.parametrize("extra, message", [
    (["--model", "vit_nano"], "unknown model"),
    (["--batch-size", "6", "--accum-steps", "4"], "multiple of --accum-steps"),
    (["--img-size", "36"], "not divisible by patch_size"),
    (["--strategy", "hybrid_shard"], "--shard-group-size"),
    (["--data", "/nonexistent/folder"], "no such folder"),
    (["--steps", "4", "--warmup-steps", "4"], "warmup"),
    (["--decoder-num-heads", "5"], "decoder_num_heads 5"),
    (["--rgb-bands", "3,2,4"], "the data has 4 bands"),
    (["--warmup-steps", "-1"], "--warmup-steps must be >= 0"),
    (["--clip-grad", "-1"], "--clip-grad must be positive"),  # a negative limit would flip the gradients
    (["--ac", "some"], "--ac"),
    (["--strategy", "hybrid_shard", "--shard-group-size", "0"], "--shard-group-size"),
    (["--mixed-precision", "fp16"], "--mixed-precision"),
    (["--strategy", "ddp", "--cpu-offload"], "--cpu-offload needs an FSDP layout"),
    (["--sdpa", "fast"], "--sdpa must be one of auto, flash, efficient, cudnn, math"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--lr", "0"], "--lr must be positive"),
    (["--lr", "nan"], "--lr must be positive"),
    (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
    (["--peak-tflops", "-5"], "--peak-tflops must be positive"),
    (["--mask-ratio", "0"], "--mask-ratio must be in (0, 1), got 0.0"),
    (["--mask-ratio", "nan"], "--mask-ratio must be in (0, 1), got nan"),
    (["--mask-ratio", "0.99"], "--mask-ratio 0.99 must remove some and keep some"),
    (["--img-size", "0"], "--img-size must be positive"),
    (["--img-size", "-64"], "--img-size must be positive"),
    (["--decoder-embed-dim", "0"], "--decoder-embed-dim must be positive"),
    (["--threads", "-1"], "--threads must be >= 0"),
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--rgb-bands", "-1"], "--rgb-bands -1: band indices are 0-based and not negative"),
    (["--rgb-bands", "0,1"], "--rgb-bands 0,1: give three bands (red,green,blue) or one (grey)"),
    (["--init-rgb-bands", "0,1,2"], "--init-rgb-bands says where --init's red, green and blue go; it needs --init"),
])
def test_user_errors_are_one_clear_line(chips, tmp_path, capsys, extra, message):
    assert train.cli([*args(chips, tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.startswith("error:")


def test_sdpa_cudnn_is_refused_on_rocm(chips, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.2.0")
    assert train.cli([*args(chips, tmp_path), "--sdpa", "cudnn"]) == 2
    assert "--sdpa cudnn does not exist on ROCm" in capsys.readouterr().err


def test_refuses_to_overwrite_a_run_without_resume(chips, reference, tmp_path, capsys):
    assert train.cli(args(chips, reference)) == 2
    assert "pass --resume" in capsys.readouterr().err
    # An earlier run that logged but never saved a checkpoint is a run too.
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "config.json").write_text("{}")
    (earlier / "metrics.jsonl").write_text('{"step": 1}\n')
    assert train.cli(args(chips, earlier)) == 2
    assert "holds an earlier run (config.json, metrics.jsonl)" in capsys.readouterr().err
    assert (earlier / "metrics.jsonl").read_text() == '{"step": 1}\n'
    (tmp_path / "a-file").write_text("x")
    assert train.cli(args(chips, tmp_path / "a-file")) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_the_demo_never_clears_another_runs_folder(chips, reference, capsys):
    """`python train.py --out <a real run>` (--data forgotten) is the demo; it must refuse, not delete."""
    before = sorted(p.name for p in reference.iterdir())
    assert train.cli(["--out", str(reference), "--steps", "2"]) == 2
    assert "holds an earlier run" in capsys.readouterr().err
    assert sorted(p.name for p in reference.iterdir()) == before


def test_resume_survives_a_half_written_metrics_line(chips, reference, tmp_path):
    """A crash during an append leaves a partial last line: --resume drops it instead of failing."""
    assert train.main(args(chips, tmp_path, "--max-steps-per-run", "5")) == 0
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')
    assert train.main(args(chips, tmp_path, "--resume")) == 0
    assert losses(tmp_path) == losses(reference)


def test_picture_stats_follow_the_band_selection(chips, tmp_path):
    """The picture undoes exactly the normalisation applied: with --bands 3,2,1,0 the display mean and
    std are the stats file's, reordered (the stats hold all 4 bands of the files)."""
    stats = json.load(open(os.path.join(chips, "stats.json")))
    cfg = train.parse_args(args(chips, tmp_path, "--bands", "3,2,1,0"))
    cfg = train.dataclasses.replace(cfg, img_size=32)
    _, (mean, std), in_chans = train.build_data(cfg, fsdp_setup.Dist(0, 0, 1, torch.device("cpu")), tmp_path)
    assert in_chans == 4
    assert mean.tolist() == pytest.approx([stats["mean"][b] for b in (3, 2, 1, 0)])
    assert std.tolist() == pytest.approx([stats["std"][b] for b in (3, 2, 1, 0)])


def test_pictures_follow_keep(chips, tmp_path):
    assert train.main(args(chips, tmp_path, "--ckpt-every", "2", "--keep", "2")) == 0
    assert sorted(p.name for p in tmp_path.glob("recon-step-*.png")) == ["recon-step-10.png", "recon-step-8.png"]
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-10", "step-8"]


def test_a_bad_image_in_a_loader_worker_ends_the_run_with_one_line(chips, tmp_path):
    """Single rank, one loader worker: the error names the file and the process exits (workers
    ignore SIGTERM, so Python's exit alone would wait for them forever)."""
    import shutil

    data_dir = tmp_path / "data"
    shutil.copytree(chips, data_dir)
    (data_dir / "zz_not_an_image.tif").write_text("not a tiff")
    argv = [sys.executable, train.__file__, *args(str(data_dir), tmp_path / "run", "--workers", "1")]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {data_dir / 'zz_not_an_image.tif'}: not an image (starts with b'not a ti'); expected GeoTIFF, JPEG or PNG"]


# ---- two ranks (gloo) ----


def _two_rank_runs(rank, chips, root, ports):
    """Reference, interrupted and resumed runs with accumulation, a SIGTERM on one rank, then a bad flag on rank 1 only.
    One spawn for all four (torch imports once); each run rendezvous on a port of its own."""
    extra = ["--accum-steps", "2"]
    runs = [args(chips, os.path.join(root, "reference"), *extra),
            args(chips, os.path.join(root, "resumed"), *extra, "--max-steps-per-run", "5"),
            args(chips, os.path.join(root, "resumed"), *extra, "--resume")]
    for port, argv in zip(ports, runs):
        os.environ["MASTER_PORT"] = str(port)
        assert train.main(argv) == 0
    # SIGTERM on rank 0 alone, during the 4th step: the ranks agree one step later, both save step-5.
    real_step = train.train_step
    if rank == 0:
        train.train_step = on_call(4, real_step, lambda: os.kill(os.getpid(), signal.SIGTERM))
    os.environ["MASTER_PORT"] = str(ports[3])
    assert train.main(args(chips, os.path.join(root, "signalled"), *extra)) == 0
    train.train_step = real_step
    os.environ["MASTER_PORT"] = str(ports[4])
    assert train.main(args(chips, os.path.join(root, "signalled"), *extra, "--resume")) == 0
    # A flag that only one rank gets wrong must stop both, with no rank waiting in a collective.
    os.environ["MASTER_PORT"] = str(ports[-1])
    data_path = chips if rank == 0 else "/nonexistent/folder"
    assert train.cli([*args(chips, os.path.join(root, "bad")), "--data", data_path]) == 2


def test_two_ranks_resume_bit_exact_and_reshard_to_one(chips, tmp_path, capsys):
    ports = [free_port() for _ in range(6)]
    run_ranks(_two_rank_runs, world_size=2, args=(chips, str(tmp_path), ports), timeout_s=240)
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert len(losses(reference)) == STEPS
    assert losses(resumed) == losses(reference)
    assert losses(tmp_path / "signalled") == losses(reference)
    assert json.load(open(tmp_path / "signalled" / "step-5" / "train_state.json"))["step"] == 5
    assert json.load(open(resumed / "config.json"))["world_size"] == 2

    # The 2-rank checkpoint at step 5 (in the resumed run's folder no more: take the reference's
    # final one) resharded onto one rank: model and optimizer equal torch's own full reading.
    step_folder = reference / f"step-{STEPS}"
    full = full_checkpoint(step_folder, tmp_path)
    cfg = train.parse_args(args(chips, tmp_path / "x", "--accum-steps", "2"))
    cfg = train.dataclasses.replace(cfg, in_chans=4)
    dist = fsdp_setup.init_distributed()
    try:
        model = train.build_model(cfg, dist)
        optimizer = train.build_optimizer(model, cfg.weight_decay)
        state = checkpoint.load_checkpoint(step_folder, model, optimizer, dist, torch.Generator())
        assert state["world_size"] == 2
        model_state, optim_state = get_state_dict(model, optimizer)
        for key, value in model_state.items():
            assert torch.equal(whole(value), full["model"][key]), key
        for key, value in optim_state["state"]["blocks.0.attn.qkv.weight"].items():
            expected = full["optim"]["state"]["blocks.0.attn.qkv.weight"][key]
            assert torch.equal(whole(value), expected), key
    finally:
        fsdp_setup.cleanup()

    # ... and a 1-rank run resumes from it, saying what it cannot keep.
    capsys.readouterr()
    assert train.main(args(chips, reference, "--accum-steps", "2", "--resume", "--steps", str(STEPS + 4))) == 0
    printed = capsys.readouterr().out
    assert "written by 2 ranks" in printed and "data order" in printed
    assert [s for s, _, _ in losses(reference)] == list(range(1, STEPS + 5))


def _rank_1_fails_at_step_4(rank, chips, root, failure):
    def broken_loader():  # as a broken file (a DataError) or a bug in rank 1's data loader would, mid-run
        if failure == "corrupt image":
            raise data.CorruptImageError("chip_0007.tif: truncated; copy or download it again")
        raise RuntimeError("rank 1's loader broke")

    if rank == 1:
        train.train_step = on_call(4, train.train_step, broken_loader)
    sys.exit(train.cli(args(chips, root)))


@pytest.mark.parametrize("failure", ["bug", "corrupt image"])
def test_a_rank_failing_mid_run_exits_at_once(chips, tmp_path, capfd, failure):
    """Rank 0 waits in a collective that rank 1 never joins; rank 1 must exit (non-zero, naming its
    rank) rather than linger in cleanup, so the launcher sees it and ends the job: a bug with its
    traceback and exit code 3, a bad file with the one line of a user error and exit code 2."""
    exit_code = exit_code_of_rank(_rank_1_fails_at_step_4, 1, args=(chips, str(tmp_path), failure))
    assert exit_code == (3 if failure == "bug" else 2)
    err = capfd.readouterr().err
    if failure == "bug":
        assert "[rank 1] failed" in err and "Traceback" in err and "RuntimeError: rank 1's loader broke" in err
    else:
        assert "error: [rank 1] chip_0007.tif: truncated; copy or download it again\n" in err
        assert "[rank 1] failed" not in err  # no traceback of its own (rank 0 may print one as gloo breaks)
