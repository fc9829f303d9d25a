"""checkpoint.py — training checkpoints: save, find, resume, and export of the encoder.

    python train.py export --ckpt runs/vit3b --out vit3b_encoder.pt          # the encoder, for eval.py
    python checkpoint.py export --ckpt runs/vit3b/step-4000 --out enc.pt     # the same, from here

train.py saves through `save_checkpoint` and resumes through `find_checkpoint` + `load_checkpoint`;
eval.py reads a run folder through `export_encoder`. Model and optimizer state go through
torch.distributed.checkpoint (DCP), everything else is JSON: no pickled Python objects.

A run folder (train.py's `--out`) holds, besides config.json and metrics.jsonl:

    out/step-N/          one checkpoint, after N optimizer steps
        .metadata        DCP's index of every shard, written last by rank 0
        __R_0.distcp     DCP shards of model and optimizer: each rank writes its own, and DCP reshards
                         on load, to another layout or world size
        train_state.json rank 0: step, epoch, sampler position, world size, loss, ViT config, run config
        rank-R.json      rank R's RNG states (masking generator, torch CPU, CUDA), R zero-padded to 5 digits
    out/latest           one line: the name of the newest complete checkpoint, e.g. `step-4000`
    out/.tmp-step-N/     a save in progress (or one a kill interrupted; the next save removes it)

A save (`save_checkpoint`, every rank, then `publish_checkpoint` on rank 0) goes in this order:
every rank writes its rank-R.json and its DCP shards into `.tmp-step-N/` (DCP ends with rank 0
writing `.metadata` once all ranks are done); rank 0 writes train_state.json, renames the folder to
`step-N/`, only then rewrites `latest` to name it, and finally prunes: checkpoints beyond `keep`,
step folders newer than N (saved by a killed run but never named by `latest`), and leftover
`.tmp-step-*`. Every file is written under a temporary name, fsynced and renamed (`write_atomic`),
and the folder holding each rename is fsynced after it (`fsync_dir`), so a power loss keeps it too.
A kill at any moment therefore leaves `latest` on a complete checkpoint: until the rename the new
one is a `.tmp-step-N/` that nothing reads, and until `latest` is rewritten it names the previous
one. `find_checkpoint` trusts `latest` only if it names a complete folder (`.metadata`, a readable
train_state.json and the rank-R.json of every rank that saved it: `missing_files`), else takes the
newest complete `step-N/`; so a folder that lost a rank's file is passed over and `--resume`
continues from the checkpoint before it. Before each save train.py
checks `params_finite`, so a checkpoint never holds NaN weights either.

Export: `export_encoder` reads only the encoder's tensors, in one process without a process group
(DCP reads every rank's shards), into an official-layout state dict that loads with
torch.load(weights_only=True) into vit.VisionTransformer(ViTConfig(**exported["vit_config"])).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import fsdp_setup
from vit import ViTConfig, VisionTransformer


# ---------------------------------------------------------------------------------------------
# The run folder: which step-N/ are complete, atomic writes

STEP_DIR = re.compile(r"^step-(\d+)$")


def missing_files(folder: Path) -> list[str]:
    """What `folder` lacks of a complete checkpoint: `.metadata`, a readable train_state.json, and
    rank-R.json for every rank that saved it (a save writes them all before its rename, so one
    missing means files were removed, or the folder was not written by `save_checkpoint`).
    One directory listing, not a file check per rank: every rank calls this, at 1,000 ranks too."""
    try:
        names = set(os.listdir(folder))
    except OSError:
        return ["everything (not a readable folder)"]
    missing = [name for name in (".metadata", "train_state.json") if name not in names]
    if "train_state.json" in names:
        try:
            world_size = int(json.loads((folder / "train_state.json").read_text())["world_size"])
        except (OSError, ValueError, KeyError, TypeError):
            return [*missing, "a readable train_state.json"]
        missing += [name for name in (f"rank-{r:05d}.json" for r in range(world_size)) if name not in names]
    return missing


def is_complete(folder: Path) -> bool:
    return not missing_files(folder)


def find_checkpoint(out: Path) -> Path | None:
    """`latest` if it names a complete checkpoint, else the newest complete step-N, else None."""
    latest = out / "latest"
    if latest.is_file():
        candidate = out / latest.read_text().strip()
        if is_complete(candidate):
            return candidate
    steps = sorted((int(m.group(1)), p) for p in out.glob("step-*") if (m := STEP_DIR.match(p.name)) and is_complete(p))
    return steps[-1][1] if steps else None


def fsync_dir(folder: Path) -> None:
    """Make renames into `folder` durable. A rename is an entry of the directory, not of the file:
    fsyncing the file alone lets a node crash or power loss undo it (and so move `latest` back, or
    lose a step-N/). Where directories cannot be opened (Windows), there is nothing to do."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary name, fsync, rename over `path`, fsync the folder: readers see the old
    or the new file, never half, and after a crash the new one is there once this returns."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


# ---------------------------------------------------------------------------------------------
# Save and load (every rank takes part)


def barrier(dist) -> None:
    """Wait for every rank (nothing to wait for in one process). train.py uses it too."""
    if dist.world_size > 1:
        tdist.barrier()


def generator_state(generator: torch.Generator) -> list[int]:
    return generator.get_state().tolist()


def set_generator_state(generator: torch.Generator, state: list[int]) -> None:
    generator.set_state(torch.tensor(state, dtype=torch.uint8))


def rank_rng_state(dist: fsdp_setup.Dist, mask_generator: torch.Generator) -> dict:
    state = {"mask_generator": generator_state(mask_generator), "torch_cpu": torch.get_rng_state().tolist()}
    if dist.device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state(dist.device).tolist()
    return state


def publish_checkpoint(out: Path, tmp: Path, final: Path, keep: int) -> None:
    """Rank 0, after every rank has written: rename, then point `latest` at it, then prune.

    `latest` changes only after the folder is complete under its final name, so a crash at any
    point leaves `latest` on the previous complete checkpoint.
    """
    if final.exists():  # an earlier save of this step that `latest` never named (killed right after its rename)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(out)  # the rename on disk before `latest` names it: never a `latest` without its folder
    write_atomic(out / "latest", final.name + "\n")
    step = int(STEP_DIR.match(final.name).group(1))
    steps = sorted((int(m.group(1)), p) for p in out.glob("step-*") if (m := STEP_DIR.match(p.name)))
    newer = [p for n, p in steps if n > step]  # the same kind: saved, never named by `latest`, not resumed from
    older = [p for n, p in steps if n <= step]
    for old in [*newer, *older[:-keep], *out.glob(".tmp-step-*")]:  # .tmp-step-*: left by killed saves
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(out: Path, model, optimizer, train_state: dict, dist, mask_generator, keep: int) -> Path:
    step = train_state["step"]
    tmp, final = out / f".tmp-step-{step}", out / f"step-{step}"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(dist)
    write_atomic(tmp / f"rank-{dist.rank:05d}.json", json.dumps(rank_rng_state(dist, mask_generator)))
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))  # ends with a gather on rank 0
    if dist.is_main:
        write_atomic(tmp / "train_state.json", json.dumps(train_state, indent=1))
        publish_checkpoint(out, tmp, final, keep)
    barrier(dist)
    return final


def read_checkpoint_files(folder: Path, dist) -> tuple[dict, dict | None]:
    """(train_state.json, this rank's rank-R.json or None for another world size), or a ValueError
    naming the folder and what it lacks. Each rank parses only its own rank file."""
    fix = "the save was interrupted or files were removed; resume from an earlier step-N or delete this folder"
    missing = missing_files(folder)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ValueError(f"{folder} lacks {shown}: {fix}")
    train_state = json.loads((folder / "train_state.json").read_text())
    if train_state["world_size"] != dist.world_size:
        return train_state, None
    rank_file = folder / f"rank-{dist.rank:05d}.json"
    try:
        return train_state, json.loads(rank_file.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{rank_file} is unreadable ({err}): {fix}") from None


def load_checkpoint(folder: Path, model, optimizer, dist, mask_generator) -> dict:
    """Restore model and optimizer (resharded by DCP to this layout) and, for the same world size,
    this rank's RNG states. Returns the checkpoint's train_state.json.

    The JSON files are read first, on every rank, and a missing or broken one stops every rank
    with the same ValueError: read after dcp.load, it failed on one rank only, and the others hung
    in their next collective."""
    train_state, rng = fsdp_setup.on_every_rank(lambda: read_checkpoint_files(folder, dist), dist)
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    if rng is not None:
        set_generator_state(mask_generator, rng["mask_generator"])
        torch.set_rng_state(torch.tensor(rng["torch_cpu"], dtype=torch.uint8))
        if "torch_cuda" in rng and dist.device.type == "cuda":
            torch.cuda.set_rng_state(torch.tensor(rng["torch_cuda"], dtype=torch.uint8), dist.device)
    return train_state


def params_finite(model, dist) -> bool:
    """All parameters finite on every rank: the last check before a save, so a checkpoint never
    holds NaN weights (an inf gradient poisons them one step before the loss shows it)."""
    ok = torch.ones((), device=dist.device)
    for param in model.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        ok *= torch.isfinite(local).all()
    if dist.world_size > 1:
        tdist.all_reduce(ok, op=tdist.ReduceOp.MIN)
    return bool(ok.item())


# ---------------------------------------------------------------------------------------------
# Export: the encoder alone, in one process


def resolve_step_folder(path: str) -> Path:
    folder = Path(path)
    if is_complete(folder):
        return folder
    found = find_checkpoint(folder) if folder.is_dir() else None
    if found is None:
        raise ValueError(f"--ckpt {path}: neither a complete step-N checkpoint folder nor a run folder holding one")
    return found


def export_encoder(ckpt_path: str) -> dict:
    """The encoder of a checkpoint as one official-layout state dict, in a single process (no process
    group: DCP reads every shard). Returns {"model", "vit_config", "step"}; save it with torch.save,
    it loads with torch.load(weights_only=True) into vit.VisionTransformer(ViTConfig(**vit_config))."""
    folder = resolve_step_folder(ckpt_path)
    train_state = json.loads((folder / "train_state.json").read_text())
    vit_cfg = ViTConfig(**train_state["vit_config"])
    with torch.device("meta"):
        encoder = VisionTransformer(vit_cfg)
    encoder.to_empty(device="cpu")  # no init: every tensor is read from the checkpoint
    state = {"model": encoder.state_dict()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(folder), no_dist=True)  # reads only the encoder's keys
    return {"model": state["model"], "vit_config": dataclasses.asdict(vit_cfg), "step": train_state["step"]}



# ---------------------------------------------------------------------------------------------
# Command line: `python checkpoint.py export ...`, and `python train.py export ...` through train.cli


def export_main(argv: list[str], prog: str = "checkpoint.py export") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="write a checkpoint's encoder as one file")
    parser.add_argument("--ckpt", required=True, help="run folder (its latest checkpoint) or a step-N folder")
    parser.add_argument("--out", required=True, help="output .pt file")
    args = parser.parse_args(argv)
    exported = export_encoder(args.ckpt)
    torch.save(exported, args.out)
    print(f"wrote {args.out}: encoder of step {exported['step']} ({len(exported['model'])} tensors, "
          f"{exported['vit_config']['img_size']} px, {exported['vit_config']['in_chans']} bands)")
    return 0


def cli(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["export"]:
        print("usage: python checkpoint.py export --ckpt RUN_OR_STEP_FOLDER --out ENCODER.pt", file=sys.stderr)
        return 2
    try:
        return export_main(argv[1:])
    except ValueError as err:  # no checkpoint there: the message, no traceback (as train.py's cli)
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
