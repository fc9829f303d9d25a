"""Damaged and hostile checkpoint folders: real checkpoints of a tiny MAE (steps 1 and 2, one
process), the newest damaged in one way per test. What must hold: a resume falls back to step-1
with a message naming the problem, or refuses naming it; no damaged folder is deleted; no code in a
crafted file runs; corrupted weights are never loaded. The reference for "loaded the right weights"
is the model as it was when step-1 was saved.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import _StorageInfo

import checkpoint
import fsdp_setup
from mae import MaskedAutoencoder
from vit import ViTConfig
from weights import export_encoder

CFG = ViTConfig(img_size=16, patch_size=8, in_chans=2, embed_dim=32, depth=1, num_heads=2, mlp_dim=128)


def build(seed: int):
    with torch.device("meta"):
        model = MaskedAutoencoder(CFG, 32, 1, 2, False)
    model = fsdp_setup.parallelize(model, "full_shard", None, "fp32", seed=seed)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def state_of(step: int, world_size: int = 1) -> dict:
    """train_state.json as train.py writes it (the keys a resume reads)."""
    return {"step": step, "epoch": 0, "epoch_index": 0, "world_size": world_size, "config": {},
            "vit_config": dataclasses.asdict(CFG)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A run folder with step-1 and step-2 (and the weights of each), in one process group kept for the module."""
    out = tmp_path_factory.mktemp("run")
    dist = fsdp_setup.init_distributed()
    model, optimizer = build(seed=0)
    states = {}
    for step in (1, 2):
        loss = sum((p * p).sum() for p in model.parameters())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        train_state = state_of(step)
        checkpoint.save_checkpoint(out, model, optimizer, train_state, dist, torch.Generator(), keep=3, log=print)
        states[step] = weights(model)
    yield out, states, dist
    fsdp_setup.cleanup()


@pytest.fixture
def run(saved, tmp_path):
    """A fresh copy of the saved run folder: (folder, weights by step, dist)."""
    template, states, dist = saved
    out = tmp_path / "run"
    shutil.copytree(template, out)
    return out, states, dist


def load_selected(out, dist, logs):
    """What a resume does: choose, then load into a model built from another seed."""
    folder = checkpoint.select_checkpoint(out, log=logs.append)
    model, optimizer = build(seed=123)
    state = checkpoint.load_checkpoint(folder, model, optimizer, dist, torch.Generator(), verified=True)
    return folder, state, weights(model)


def listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def largest_model_tensor(folder: Path) -> _StorageInfo:
    metadata = checkpoint.read_metadata_file(folder / ".metadata")
    infos = [info for index, info in metadata.storage_data.items() if index.fqn.startswith("model.")]
    return max(infos, key=lambda info: info.length)


def forge_checksums(folder: Path) -> None:
    """What a hostile writer does: checksums.json made to match whatever is in the folder now."""
    files = {p.name: checkpoint.file_checksum(p) for p in folder.iterdir() if p.name != checkpoint.CHECKSUMS}
    (folder / checkpoint.CHECKSUMS).write_text(json.dumps({"files": files}))


class RunsShell:
    """Unpickling this calls os.system: the classic payload of a crafted pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ---------------------------------------------------------------------------------------------
# The saved checkpoints themselves


def test_saved_checkpoints_verify_and_load_exactly(run):
    out, states, dist = run
    assert checkpoint.verify_checkpoint(out / "step-2") == [] and checkpoint.verify_checkpoint(out / "step-1") == []
    listed = json.loads((out / "step-2" / "checksums.json").read_text())["files"]
    assert sorted(listed) == [".metadata", "__0_0.distcp", "rank-00000.json", "train_state.json"]
    logs = []
    folder, state, loaded = load_selected(out, dist, logs)
    assert folder == out / "step-2" and state["step"] == 2 and same(loaded, states[2]) and logs == []
    assert not same(states[1], states[2])  # the fallback tests can tell the two apart


def test_no_step_folders_is_a_fresh_start(tmp_path):
    assert checkpoint.select_checkpoint(tmp_path, log=pytest.fail) is None


# ---------------------------------------------------------------------------------------------
# Damage to the newest checkpoint: fall back to step-1, name the problem, delete nothing


def zero_4k_inside_weights(folder: Path) -> None:
    info = largest_model_tensor(folder)
    with open(folder / info.relative_path, "r+b") as f:
        f.seek(info.offset + info.length // 2 - 2048)
        f.write(bytes(4096))


def garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 16):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "missing shard": (lambda f: (f / "__0_0.distcp").unlink(), "lacks __0_0.distcp"),
    "truncated shard": (lambda f: os.truncate(f / "__0_0.distcp", 1000), "__0_0.distcp has 1000 bytes"),
    "garbled shard": (lambda f: garble(f / "__0_0.distcp"), "__0_0.distcp differs from what was saved"),
    "zeroed 4 KiB of weights": (zero_4k_inside_weights, "__0_0.distcp differs from what was saved"),
    "missing .metadata": (lambda f: (f / ".metadata").unlink(), "lacks .metadata"),
    "garbled .metadata": (lambda f: garble(f / ".metadata"), ".metadata differs from what was saved"),
    "garbled rank file": (lambda f: garble(f / "rank-00000.json"), "rank-00000.json differs from what was saved"),
    "missing rank file": (lambda f: (f / "rank-00000.json").unlink(), "lacks rank-00000.json"),
    "garbled train_state": (lambda f: (f / "train_state.json").write_text('{"step": 2, "wor'),
                            "train_state.json is not JSON"),
    "missing checksums": (lambda f: (f / "checksums.json").unlink(), "lacks checksums.json"),
    "garbled checksums": (lambda f: (f / "checksums.json").write_text("[1, 2"), "checksums.json is not JSON"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_newest_falls_back_to_the_previous_checkpoint(run, damage):
    out, states, dist = run
    apply, reason = DAMAGE[damage]
    apply(out / "step-2")
    before = listing(out / "step-2")
    logs = []
    folder, state, loaded = load_selected(out, dist, logs)
    assert folder == out / "step-1" and state["step"] == 1 and same(loaded, states[1])
    assert len(logs) == 1 and logs[0].startswith(f"skipping {out / 'step-2'}: ") and reason in logs[0], logs
    assert listing(out / "step-2") == before  # left as it was, for inspection
    # Named directly (as a resume or `export --ckpt run/step-2` would), it is refused, naming the problem.
    model, optimizer = build(seed=5)
    with pytest.raises(ValueError, match=f"step-2 .*{reason}.*: the save was interrupted or files were damaged"):
        checkpoint.load_checkpoint(out / "step-2", model, optimizer, dist, torch.Generator())
    with pytest.raises(ValueError, match=f"--ckpt .*step-2: .*{reason}"):
        export_encoder(str(out / "step-2"))


def test_zeroed_weights_would_load_silently_without_checksums(run):
    """Why the checksums: DCP itself reads the zeroed block as weights, without a word."""
    out, states, _ = run
    zero_4k_inside_weights(out / "step-2")
    model, _ = build(seed=5)
    state = {"model": model.state_dict()}
    dcp.load(state, storage_reader=dcp.FileSystemReader(out / "step-2"))
    model.load_state_dict(state["model"])
    loaded = weights(model)
    differing = [k for k in loaded if not torch.equal(loaded[k], states[2][k])]
    assert len(differing) == 1 and (loaded[differing[0]] == 0).sum() >= 1000


def test_a_save_after_the_fallback_keeps_the_damaged_folder(run, capsys):
    """Resumed from step-1 because step-2 is damaged, the run saves step-2 again: the damaged
    folder is in the way, and is renamed, not deleted; the new step-2 verifies."""
    out, states, dist = run
    garble(out / "step-2" / "__0_0.distcp")
    damaged = listing(out / "step-2")
    logs = []
    folder = checkpoint.select_checkpoint(out, log=logs.append)
    model, optimizer = build(seed=123)
    checkpoint.load_checkpoint(folder, model, optimizer, dist, torch.Generator(), verified=True)
    train_state = state_of(2)
    checkpoint.save_checkpoint(out, model, optimizer, train_state, dist, torch.Generator(), keep=3, log=logs.append)
    assert listing(out / "damaged-step-2") == damaged
    assert "kept" in logs[-1] and "damaged-step-2" in logs[-1] and "__0_0.distcp differs" in logs[-1]
    assert checkpoint.verify_checkpoint(out / "step-2") == [] and (out / "latest").read_text() == "step-2\n"
    assert sorted(p.name for p in out.iterdir()) == ["damaged-step-2", "latest", "step-1", "step-2"]


def test_a_save_below_an_unloadable_newer_folder_keeps_it(run):
    """The old bug: every step folder damaged, the run started from scratch and its first save
    pruned them all. Now the resume refuses (test below); and should a save of an earlier step
    happen anyway, a newer folder that does not verify is renamed, never deleted."""
    out, states, dist = run
    (out / "step-2" / "rank-00000.json").unlink()
    damaged = listing(out / "step-2")
    model, optimizer = build(seed=0)
    train_state = state_of(1)
    checkpoint.save_checkpoint(out, model, optimizer, train_state, dist, torch.Generator(), keep=1, log=lambda m: None)
    assert listing(out / "damaged-step-2") == damaged
    assert sorted(p.name for p in out.iterdir()) == ["damaged-step-2", "latest", "step-1"]


def test_no_loadable_checkpoint_refuses_and_deletes_nothing(run):
    out, _, _ = run
    (out / "step-2" / "__0_0.distcp").unlink()
    os.truncate(out / "step-1" / "__0_0.distcp", 10)
    before = {name: listing(out / name) for name in ("step-1", "step-2")}
    logs = []
    with pytest.raises(ValueError, match=r"none can be loaded \(nothing was deleted\): "
                                         r"step-2: lacks __0_0.distcp \| step-1: __0_0.distcp has 10 bytes"):
        checkpoint.select_checkpoint(out, log=logs.append)
    assert len(logs) == 2 and {name: listing(out / name) for name in before} == before
    assert checkpoint.cli(["export", "--ckpt", str(out), "--out", str(out / "enc.pt")]) == 2
    assert not (out / "enc.pt").exists()


# ---------------------------------------------------------------------------------------------
# The `latest` pointer


@pytest.mark.parametrize("pointer", ["../other/step-9", "{other}/step-9", "step-2/..", "step-9", "step-1\nstep-2"])
def test_latest_naming_anything_but_a_step_folder_of_this_run_is_ignored(run, pointer):
    out, states, dist = run
    other = out.parent / "other" / "step-9"  # a loadable checkpoint of another run
    shutil.copytree(out / "step-1", other)
    (other / "train_state.json").write_text(json.dumps({**json.loads((other / "train_state.json").read_text()), "step": 9}))
    forge_checksums(other)
    assert checkpoint.verify_checkpoint(other) == []
    other = other.parent
    (out / "latest").write_text(pointer.format(other=other) + "\n")
    logs = []
    folder, state, loaded = load_selected(out, dist, logs)
    assert folder == out / "step-2" and same(loaded, states[2])
    assert logs == [f"ignoring {out / 'latest'}: {pointer.format(other=other).strip()!r} is not a step-N folder of {out}"]


def test_latest_naming_an_older_step_folder_is_followed(run):
    out, states, dist = run
    (out / "latest").write_text("step-1\n")
    logs = []
    folder, _, loaded = load_selected(out, dist, logs)
    assert folder == out / "step-1" and same(loaded, states[1]) and logs == []


# ---------------------------------------------------------------------------------------------
# Crafted pickles: never run


def craft_metadata(folder: Path, marker: Path, forge: bool) -> None:
    (folder / ".metadata").write_bytes(pickle.dumps(RunsShell(marker)))
    if forge:
        forge_checksums(folder)


@pytest.mark.parametrize("forge", [False, True], ids=["stale checksums", "forged checksums"])
def test_crafted_metadata_never_runs(run, tmp_path, forge, capsys):
    out, states, dist = run
    marker = tmp_path / "marker"
    craft_metadata(out / "step-2", marker, forge)
    reason = (".metadata is refused, not a DCP index: it names posix.system" if forge
              else ".metadata has")
    # resume: falls back, naming the file
    logs = []
    folder, _, loaded = load_selected(out, dist, logs)
    assert folder == out / "step-1" and same(loaded, states[1]) and reason in logs[0], logs
    # export of the step folder: one line naming the file
    assert checkpoint.cli(["export", "--ckpt", str(out / "step-2"), "--out", str(tmp_path / "enc.pt")]) == 2
    assert reason in capsys.readouterr().err
    # any DCP read through checkpoint.py's reader
    with pytest.raises(ValueError, match="step-2 could not be loaded: .*it names posix.system"):
        checkpoint.dcp_load({"model": build(seed=1)[0].state_dict()}, out / "step-2")
    # eval's --encoder with the run folder: step-1's encoder
    import weights

    encoder_cfg, state, _ = weights.load_encoder(str(out))
    assert torch.equal(state["blocks.0.attn.qkv.weight"], states[1]["blocks.0.attn.qkv.weight"])
    assert not marker.exists()


def test_crafted_optimizer_value_never_runs(run, tmp_path):
    """DCP stores non-tensor optimizer values (lr, betas) as pickles and loads them with
    torch.load(weights_only=False); a hostile folder with consistent .metadata and checksums points
    one of them at a crafted pickle."""
    out, _, dist = run
    folder, marker = out / "step-2", tmp_path / "marker"
    torch.save(RunsShell(marker), folder / "__0_1.distcp")
    metadata = checkpoint.read_metadata_file(folder / ".metadata")
    index = next(i for i in metadata.storage_data if i.fqn == "optim.param_groups.0.lr")
    metadata.storage_data[index] = _StorageInfo("__0_1.distcp", 0, (folder / "__0_1.distcp").stat().st_size)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    forge_checksums(folder)
    assert checkpoint.verify_checkpoint(folder) == []  # consistent: only the load itself can refuse
    model, optimizer = build(seed=1)
    with pytest.raises(ValueError, match="step-2 could not be loaded: .*unsupported GLOBAL posix.system"):
        checkpoint.load_checkpoint(folder, model, optimizer, dist, torch.Generator())
    assert not marker.exists()


def test_metadata_pointing_outside_the_folder_is_refused(run, tmp_path):
    out, states, dist = run
    folder = out / "step-2"
    metadata = checkpoint.read_metadata_file(folder / ".metadata")
    index = next(iter(metadata.storage_data))
    old = metadata.storage_data[index]
    metadata.storage_data[index] = _StorageInfo("../step-1/__0_0.distcp", old.offset, old.length)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    forge_checksums(folder)
    assert checkpoint.verify_checkpoint(folder) == [
        ".metadata points to ../step-1/__0_0.distcp, not files of this checkpoint"]


def test_train_state_of_another_step_is_refused(run):
    """A step folder renamed (or copied) under another step's name would resume at the wrong step."""
    out, _, _ = run
    shutil.rmtree(out / "step-1")
    os.replace(out / "step-2", out / "step-1")
    assert checkpoint.verify_checkpoint(out / "step-1") == [
        "train_state.json has step 2, not the N of its folder's name"]


# ---------------------------------------------------------------------------------------------
# Two ranks: the checksums are split between them, and both reach the same decision


def _two_rank_fallback(rank: int, out: str) -> None:
    out = Path(out)
    dist = fsdp_setup.init_distributed()
    try:
        model, optimizer = build(seed=0)
        for step in (1, 2):
            train_state = state_of(step, world_size=2)
            checkpoint.save_checkpoint(out, model, optimizer, train_state, dist, torch.Generator(), keep=3)
        checkpoint.barrier(dist)
        if rank == 0:  # rank 1's shard of step-2 garbled: found by whichever rank checks that file
            garble(out / "step-2" / "__1_0.distcp")
        checkpoint.barrier(dist)
        logs = []
        folder = checkpoint.select_checkpoint(out, log=logs.append, dist=dist)
        (out / f"chose-{rank}.json").write_text(json.dumps({"folder": folder.name, "logs": logs}))
        if rank == 0:
            os.truncate(out / "step-1" / "__0_0.distcp", 10)
        checkpoint.barrier(dist)
        try:
            checkpoint.select_checkpoint(out, log=logs.append, dist=dist)
        except fsdp_setup.AllRanksError as err:
            (out / f"refused-{rank}.txt").write_text(str(err))
    finally:
        fsdp_setup.cleanup()


def test_two_ranks_choose_the_same_checkpoint(tmp_path):
    from _dist_util import run_ranks

    run_ranks(_two_rank_fallback, world_size=2, args=(str(tmp_path),))
    listed = json.loads((tmp_path / "step-2" / "checksums.json").read_text())["files"]
    assert sorted(listed) == [".metadata", "__0_0.distcp", "__1_0.distcp", "rank-00000.json",
                              "rank-00001.json", "train_state.json"]
    chose = [json.loads((tmp_path / f"chose-{r}.json").read_text()) for r in range(2)]
    assert chose[0]["folder"] == chose[1]["folder"] == "step-1"
    assert len(chose[0]["logs"]) == 1 and "__1_0.distcp differs from what was saved" in chose[0]["logs"][0]
    assert chose[1]["logs"] == []  # only rank 0 logs
    refused = [(tmp_path / f"refused-{r}.txt").read_text() for r in range(2)]
    assert refused[0] == refused[1] and "step-2: __1_0.distcp differs" in refused[0]
    assert "step-1: __0_0.distcp has 10 bytes" in refused[0]
