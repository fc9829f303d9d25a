"""checkpoint.py — the run folder: checkpoints, and what a resume needs.

train.py prepares its `--out` with `prepare_run_folder` (a fresh start, or the newest checkpoint that verifies),
saves with `save_checkpoint` and resumes with `load_checkpoint`. Model and optimizer go through
torch.distributed.checkpoint (DCP: each rank writes its shards, resharded on load to any layout or world size);
the rest is JSON. A step-N/ folder holds DCP's files, train_state.json, rank-R.json (RNG states) and
checksums.json (size and CRC-32 of the others, written last); `latest` names the newest. Every file is written
atomically and `latest` moves last, so a kill leaves it on a complete checkpoint. Nothing is unpickled or
loaded before the folder verifies, DCP's pickled index only under an allow-list, and a folder that does not
verify is never deleted unless a newer one does. Format, rules and costs: docs/checkpoints.md.
`python checkpoint.py export --ckpt RUN_OR_STEP_FOLDER --out ENCODER.pt` writes an encoder (weights.py).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import re
import shutil
import sys
import zlib
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import fsdp_setup
from vit import ViTConfig

STEP_DIR = re.compile(r"step-([0-9]+)")  # always with fullmatch: `$` would accept "step-5\n"
CHECKSUMS = "checksums.json"
TRAIN_STATE_KEYS = ("step", "epoch", "epoch_index", "world_size", "vit_config", "config")  # what a resume reads
RANK_STATE_KEYS = ("mask_generator", "torch_cpu")
FIX = ("the save was interrupted or files were damaged or removed; "
       "resume from an earlier step-N or move this folder away")


# --- Atomic writes --------------------------------------------------------------------------------


def fsync_dir(folder: Path) -> None:
    """Make renames into `folder` durable. A rename is an entry of the directory, not of the file:
    fsyncing the file alone lets a node crash undo it (and so move `latest` back, or lose a step-N/)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # directories cannot be opened on Windows: nothing to do
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Temporary name, fsync, rename, fsync the folder: readers see the old or the new file, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def file_checksum(path: Path) -> dict:
    """{"bytes", "crc32"} of a file. CRC-32 guards against damage; nothing in the folder could guard against forgery."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            crc, size = zlib.crc32(chunk, crc), size + len(chunk)
    return {"bytes": size, "crc32": crc}


# --- Reading DCP's .metadata without running code from it -----------------------------------------

# DCP pickles its index, and a crafted pickle calls whatever it names (os.system...): the unpickler resolves only
# the classes a real index holds (logged from saves of every layout): DCP's dataclasses, sizes, dtypes, paths.
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                 "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a dictionary lookup of torch.strided & co. by name
    *((module, name) for module in ("pathlib", "pathlib._local")  # StorageMeta.checkpoint_id; 3.13 moved them
      for name in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _METADATA_CLASSES or is_dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which is not part of DCP's index format")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it holds a persistent reference, which DCP's index never does")


def _unpickle_index(path: Path) -> dcp_metadata.Metadata:
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except OSError as err:
        raise ValueError(f"is unreadable ({err.strerror or err})") from None
    except Exception as err:  # UnpicklingError, EOFError, and whatever a malformed stream raises
        raise ValueError(f"is refused, not a DCP index: {err}") from None
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(metadata, dcp_metadata.Metadata) or not isinstance(storage, dict) or not all(
        isinstance(info, _StorageInfo) and isinstance(info.relative_path, str) for info in storage.values()
    ):
        raise ValueError(f"is refused, not a DCP index: it unpickles to {type(metadata).__name__}")
    return metadata


def read_metadata_file(path: Path) -> dcp_metadata.Metadata:
    """DCP's index of a checkpoint, unpickled under the allow-list; a ValueError naming the file if it is not one."""
    try:
        return _unpickle_index(path)
    except ValueError as err:
        raise ValueError(f"{path} {err}") from None


class SafeMetadataReader(FileSystemReader):
    """DCP's file reader with `.metadata` read by `read_metadata_file` instead of pickle.load."""

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        metadata = read_metadata_file(Path(self.path) / ".metadata")
        if metadata.storage_meta is None:  # as FileSystemReader: older saves have none
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, except that non-tensor values (the optimizer's lr, betas, flags) are read with
    torch.load(weights_only=True): the default unpickles them with weights_only=False."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:  # torch's message is a page: keep the line naming the global
            named = re.search(r"(Trying to load unsupported GLOBAL|Unsupported global)[^\n]*", str(err))
            raise ValueError(f"{read_item.dest_index.fqn} is refused: {named.group(0) if named else err}") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def dcp_load(state: dict, folder: Path, **kwargs) -> None:
    """dcp.load through the safe reader and planner: every DCP read goes through here. A refusal inside DCP
    (only a folder with forged checksums gets there) becomes one line, e.g. the global a crafted pickle names."""
    try:
        dcp.load(state, storage_reader=SafeMetadataReader(folder), planner=SafeLoadPlanner(), **kwargs)
    except CheckpointException as err:
        error = next(iter(err.failures.values()))[0]  # DCP wraps each rank's failure as (exception, traceback)
        reason = [line for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        # DCP reports a failure on every rank alike: every rank stops with this one line (exit 2).
        raise fsdp_setup.AllRanksError(f"{folder} could not be loaded: {reason[-1].strip()}") from err


# --- Verifying a checkpoint folder, choosing one --------------------------------------------------


def _read_json(path: Path):
    try:
        return json.loads(path.read_bytes())
    except OSError as err:
        raise ValueError(f"is unreadable ({err.strerror or err})") from None
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, absurd nesting
        raise ValueError(f"is not JSON ({type(err).__name__})") from None


def _read_manifest(folder: Path) -> dict[str, dict]:
    files = _read_json(folder / CHECKSUMS)
    if not isinstance(files, dict) or not isinstance(files.get("files"), dict):
        raise ValueError("has no 'files' table")
    for name, entry in files["files"].items():
        # Plain names only: a listed "../x" would make verification read outside the folder.
        if name in ("", ".", "..") or "/" in name or "\\" in name or name == CHECKSUMS:
            raise ValueError(f"lists {name!r}, not a file name of this folder")
        if not (isinstance(entry, dict) and all(type(entry.get(k)) is int for k in ("bytes", "crc32"))):
            raise ValueError(f"entry of {name} lacks integer 'bytes' and 'crc32'")
    return files["files"]


def _check_train_state(folder: Path) -> dict:
    state = _read_json(folder / "train_state.json")
    if not isinstance(state, dict) or any(k not in state for k in TRAIN_STATE_KEYS):
        raise ValueError(f"lacks one of the keys {', '.join(TRAIN_STATE_KEYS)}")
    if type(state["world_size"]) is not int or state["world_size"] < 1:
        raise ValueError(f"has world_size {state['world_size']!r}, not a positive integer")
    step = STEP_DIR.fullmatch(folder.name)
    if type(state["step"]) is not int or (step and int(step.group(1)) != state["step"]):
        raise ValueError(f"has step {state['step']!r}, not the N of its folder's name")
    try:
        ViTConfig(**state["vit_config"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"has a vit_config that is not a ViTConfig ({err})") from None
    return state


def _check_file(folder: Path, name: str, expected: dict, listed: dict) -> str | None:
    """Why the listed file `name` is not what was saved, or None."""
    path = folder / name
    try:
        size = path.stat().st_size
    except OSError:
        return f"lacks {name}"
    if size != expected["bytes"]:
        return f"{name} has {size} bytes, {expected['bytes']} were saved (truncated or overwritten)"
    if file_checksum(path)["crc32"] != expected["crc32"]:
        return f"{name} differs from what was saved (CRC-32 mismatch: damaged)"
    try:  # contents, now that the bytes are the saved ones (matters only for a forged checksums.json)
        if name == ".metadata":
            metadata = _unpickle_index(path)
            outside = sorted({i.relative_path for i in metadata.storage_data.values()} - set(listed))
            if outside:
                return f".metadata points to {', '.join(outside[:3])}, not files of this checkpoint"
        elif name.startswith("rank-") and name.endswith(".json"):
            state = _read_json(path)
            if not isinstance(state, dict) or any(not isinstance(state.get(k), list) for k in RANK_STATE_KEYS):
                return f"{name} lacks the RNG states {', '.join(RANK_STATE_KEYS)}"
    except ValueError as err:
        return f"{name} {err}"
    return None


def verify_checkpoint(folder: Path, rank: int = 0, world_size: int = 1) -> list[str]:
    """Why `folder` cannot be loaded, [] if it can; never raises. With world_size > 1 it checks the bytes of
    every world_size-th file only (`verify_on_every_rank` gathers the shares); every rank parses the JSON."""
    try:
        names = set(os.listdir(folder))
    except OSError as err:
        return [f"is not a readable folder ({err.strerror or err})"]
    if CHECKSUMS not in names:
        return [f"lacks {CHECKSUMS} (an interrupted save, or one written before checksums were recorded)"]
    try:
        listed = _read_manifest(folder)
    except ValueError as err:
        return [f"{CHECKSUMS} {err}"]
    problems = [f"lacks {name}" for name in (".metadata", "train_state.json") if name not in listed]
    try:
        state = _check_train_state(folder)
        ranks = [f"rank-{r:05d}.json" for r in range(state["world_size"])]
        problems += [f"lacks {name}" for name in ranks if name not in listed]
    except ValueError as err:
        problems.append(f"train_state.json {err}")
    try:
        for name in sorted(listed)[rank::world_size]:
            problem = _check_file(folder, name, listed[name], listed)
            if problem:
                problems.append(problem)
    except Exception as err:  # an unexpected OS error must not leave this rank out of the gather
        problems.append(f"could not be checked ({type(err).__name__}: {err})")
    return problems


def verify_on_every_rank(folder: Path, dist=None) -> list[str]:
    """verify_checkpoint split over the ranks, every rank getting the same union of problems."""
    if dist is None or dist.world_size == 1:
        return verify_checkpoint(folder)
    mine = verify_checkpoint(folder, dist.rank, dist.world_size)
    everyone = [None] * dist.world_size
    tdist.all_gather_object(everyone, mine)
    return list(dict.fromkeys(p for problems in everyone for p in problems))


def step_folders(out: Path) -> list[Path]:
    """The step-N/ folders of a run, newest first (symlinks included: their target is verified alike)."""
    found = [(int(m.group(1)), p) for p in out.glob("step-*") if (m := STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def checkpoint_candidates(out: Path) -> tuple[list[Path], list[str]]:
    """(step folders in the order to try, notes to log): the one `latest` names first, then the others newest
    first. A `latest` holding anything but a bare step-N of this folder (a path, `..`) is ignored with a note."""
    folders, notes = step_folders(out), []
    latest = out / "latest"
    if latest.exists():
        try:
            name = latest.read_bytes()[:200].decode("utf-8", "replace").strip()
        except OSError as err:
            name = f"<unreadable: {err.strerror or err}>"
        if STEP_DIR.fullmatch(name) and out / name in folders:
            folders.remove(out / name)
            folders.insert(0, out / name)
        else:
            notes.append(f"ignoring {latest}: {name!r} is not a step-N folder of {out}")
    return folders, notes


def select_checkpoint(out: Path, log=print, dist=None) -> Path | None:
    """The first of `checkpoint_candidates` that verifies; None if `out` has no step-N/ folder; a ValueError
    listing every folder and why, if none verifies. With `dist` (every rank calls it, outside on_every_rank)
    all ranks return the same folder or raise the same AllRanksError."""
    collective = dist is not None and dist.world_size > 1
    say = log if dist is None or dist.is_main else (lambda message: None)
    candidates, notes = checkpoint_candidates(out) if dist is None or dist.is_main else (None, None)
    if collective:
        box = [(candidates, notes)]
        tdist.broadcast_object_list(box, src=0)
        candidates, notes = box[0]
    for note in notes:
        say(note)
    rejected = []
    for folder in candidates:
        problems = verify_on_every_rank(folder, dist)
        if not problems:
            return folder
        rejected.append(f"{folder.name}: {'; '.join(problems)}")
        say(f"skipping {folder}: {'; '.join(problems)}")
    if not rejected:
        return None
    error = fsdp_setup.AllRanksError if collective else ValueError
    raise error(f"{out} holds step folders but none can be loaded (nothing was deleted): "
                + " | ".join(rejected) + f". {FIX[0].upper() + FIX[1:]}")


# --- Save and load (every rank takes part) --------------------------------------------------------


def barrier(dist) -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if dist.world_size > 1:
        tdist.barrier()


def set_aside(folder: Path, log=print) -> None:
    """Remove a step folder that a save supersedes or replaces, if it verifies; else rename it
    `damaged-step-M/` (never delete what could not be loaded: it may be all that is left of a run)."""
    problems = verify_checkpoint(folder)
    if not problems:
        shutil.rmtree(folder)
        return
    target, k = folder.with_name(f"damaged-{folder.name}"), 1
    while target.exists():
        k += 1
        target = folder.with_name(f"damaged-{folder.name}-{k}")
    os.replace(folder, target)
    log(f"kept {folder} as {target.name}: it does not verify ({'; '.join(problems)}); inspect or delete it")


def publish_checkpoint(out: Path, tmp: Path, final: Path, keep: int, log=print) -> None:
    """Rank 0, after every rank has written: rename, then point `latest` at it, then prune (docs/checkpoints.md):
    a crash at any point leaves `latest` on a complete checkpoint."""
    if final.exists():  # an earlier save of this step that `latest` never named, or a damaged one
        set_aside(final, log)
    os.replace(tmp, final)
    fsync_dir(out)  # the rename on disk before `latest` names it: never a `latest` without its folder
    write_atomic(out / "latest", final.name + "\n")
    step = int(STEP_DIR.fullmatch(final.name).group(1))
    folders = step_folders(out)  # newest first
    older = [p for p in folders if int(p.name[5:]) < step]
    for old in [*older[max(keep - 1, 0):], *out.glob(".tmp-step-*")]:  # .tmp-step-*: left by killed saves
        shutil.rmtree(old, ignore_errors=True)
    for newer in (p for p in folders if int(p.name[5:]) > step):  # saved, never named by `latest`
        set_aside(newer, log)
    pictures = sorted(out.glob("recon-step-*.png"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    for old in pictures[:-keep]:  # train.py's reconstruction pictures follow the checkpoints' --keep
        old.unlink()


def save_checkpoint(out: Path, model, optimizer, train_state: dict, dist, mask_generator, keep: int,
                    log=print) -> Path:
    """Every rank: write `out/step-N/` (N = train_state["step"]); rank 0 publishes it. Order: docs/checkpoints.md."""
    step = train_state["step"]
    tmp, final = out / f".tmp-step-{step}", out / f"step-{step}"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(dist)
    rank_file = f"rank-{dist.rank:05d}.json"
    rng = {"mask_generator": mask_generator.get_state().tolist(), "torch_cpu": torch.get_rng_state().tolist()}
    if dist.device.type == "cuda":
        rng["torch_cuda"] = torch.cuda.get_rng_state(dist.device).tolist()
    write_atomic(tmp / rank_file, json.dumps(rng))
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))  # ends with .metadata written
    # Each rank checksums what it wrote (its DCP files are __R_*.distcp); rank 0 adds its own and writes the list.
    written = [rank_file, *(p.name for p in tmp.glob(f"__{dist.rank}_*.distcp"))]
    mine = {name: file_checksum(tmp / name) for name in written}
    gathered = [mine]
    if dist.world_size > 1:
        gathered = [None] * dist.world_size if dist.is_main else None
        tdist.gather_object(mine, gathered, dst=0)
    if dist.is_main:
        write_atomic(tmp / "train_state.json", json.dumps(train_state, indent=1))
        files = {name: entry for part in gathered for name, entry in part.items()}
        files.update({name: file_checksum(tmp / name) for name in (".metadata", "train_state.json")})
        manifest = {"algorithm": "crc32", "files": dict(sorted(files.items()))}
        write_atomic(tmp / CHECKSUMS, json.dumps(manifest, indent=1))
        publish_checkpoint(out, tmp, final, keep, log)
    barrier(dist)
    return final


def read_checkpoint_files(folder: Path, dist) -> tuple[dict, dict | None]:
    """(train_state.json, this rank's rank-R.json or None for another world size)."""
    train_state = json.loads((folder / "train_state.json").read_text())
    if train_state["world_size"] != dist.world_size:
        return train_state, None
    return train_state, json.loads((folder / f"rank-{dist.rank:05d}.json").read_text())


def load_checkpoint(folder: Path, model, optimizer, dist, mask_generator, verified: bool = False) -> dict:
    """Restore model and optimizer (resharded by DCP to this layout) and, for the same world size, this rank's
    RNG states; returns train_state.json. Verified first (verified=True: select_checkpoint did), so a damaged
    folder stops every rank alike before DCP reads anything, instead of one rank failing inside dcp.load."""
    if not verified:
        problems = verify_on_every_rank(folder, dist)
        if problems:
            error = fsdp_setup.AllRanksError if dist.world_size > 1 else ValueError
            raise error(f"{folder} {'; '.join(problems)}: {FIX}")
    train_state, rng = fsdp_setup.on_every_rank(lambda: read_checkpoint_files(folder, dist), dist)
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp_load({"model": model_state, "optim": optim_state}, folder)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    if rng is not None:
        mask_generator.set_state(torch.tensor(rng["mask_generator"], dtype=torch.uint8))
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


# --- The run folder: a fresh start or a resume (train.py) ------------------------------------------


def prepare_run_folder(cfg, dist) -> tuple[Path, Path | None]:
    """(run folder, checkpoint to resume from or None). Never overwrites an earlier run unasked:
    without --resume a folder with checkpoints or metrics is refused, except the demo's, which
    starts over and says so."""
    out = Path(cfg.out or ("runs/demo" if cfg.data == "demo" else f"runs/{cfg.model}"))

    def check():
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file, not a folder; choose another --out")
        earlier = []
        if out.is_dir():
            earlier = [p.name for p in (out / "config.json", out / "metrics.jsonl", out / "latest") if p.exists()]
            earlier += sorted(p.name for p in out.glob("step-*"))
        if earlier and not cfg.resume and not (cfg.data == "demo" and earlier_demo(out)):
            raise ValueError(f"{out} holds an earlier run ({', '.join(earlier[:4])}); "
                             "pass --resume to continue it, or choose a new --out")

    fsdp_setup.on_every_rank(check, dist)
    # Decided by the flags alone: every rank must agree on entering select_checkpoint's collectives.
    previous = select_checkpoint(out, log=print, dist=dist) if cfg.resume else None
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        old = [*out.glob("step-*"), *out.glob(".tmp-step-*"), *out.glob("recon-step-*.png"), out / "latest"]
        if not cfg.resume and any(p.exists() for p in old):  # only the demo gets here
            print(f"demo: starting over in {out}, removing the earlier demo's checkpoints and pictures", flush=True)
            for p in filter(Path.exists, old):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    barrier(dist)
    return out, previous


def earlier_demo(out: Path) -> bool:
    """Only a folder that an earlier demo wrote may be cleared by the demo: `python train.py --out
    runs/vit3b` without --data is the demo, and must not delete a real run's checkpoints."""
    try:
        return json.loads((out / "config.json").read_text())["data"] == "demo"
    except (OSError, ValueError, KeyError, TypeError):
        return False


def check_resumable(folder: Path, cfg, mae) -> None:
    """Same model as the checkpoint's, else DCP would fail deep inside with a shape error."""
    state = json.loads((folder / "train_state.json").read_text())
    decoder = ("decoder_embed_dim", "decoder_depth", "decoder_num_heads")
    same_decoder = all(state["config"][k] == getattr(cfg, k) for k in decoder)
    if state["vit_config"] != dataclasses.asdict(mae.cfg) or not same_decoder:
        raise ValueError(f"{folder} holds a different model ({state['config']['model']}, {state['vit_config']}, "
                         f"decoder {[state['config'][k] for k in decoder]}); resume with the same --model, "
                         "--img-size, bands and decoder flags, or choose a new --out")


def trim_metrics(path: Path, step: int) -> None:
    """Drop records after the resumed step (written after that checkpoint by a killed run), and a
    line a crash left half-written; a fresh start empties the file."""
    def kept(line: str) -> bool:
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            return False

    if path.is_file():
        lines = [line for line in path.read_text(errors="replace").splitlines() if kept(line)]
        write_atomic(path, "".join(line + "\n" for line in lines))


def cli(argv: list[str] | None = None) -> int:
    """`python checkpoint.py export --ckpt RUN_OR_STEP_FOLDER --out ENCODER.pt`: weights.export_cli."""
    import weights  # weights.py imports this module: imported here, not at the top

    return weights.export_cli(argv)


if __name__ == "__main__":
    sys.exit(cli())
