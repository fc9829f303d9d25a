"""weights.py — single-file weights in the official MAE layout, in and out.

In: train.py --init and eval.py --encoder start from an official MAE/ViT .pth (ImageNet weights, say),
read without running code from the file (`read_checkpoint_file`), fitted to the model's image size
and band count (`adapt_mae_state_dict`: positional tables resized, RGB kernels mapped to chosen bands,
--init-rgb-bands), checked against the model's shapes (`check_mae_state`), and loaded: into a plain
model (`load_mae_checkpoint`) or, rank 0 reading and broadcasting, into a sharded one (`load_init_weights`).

`load_encoder` resolves eval.py's --encoder (an encoder file, a training run folder or `random`).

Out: `export_encoder` reads the encoder of a training checkpoint (checkpoint.py's format) into one
official-layout state dict, which `python checkpoint.py export --ckpt RUN --out ENCODER.pt` writes.

Keys are the official layout of mae.py and vit.py: encoder keys at top level (`patch_embed.proj`,
`cls_token`, `pos_embed`, `blocks.N.*`, `norm`), decoder keys `mask_token` and `decoder_*`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

import checkpoint
import fsdp_setup
from vit import CONFIGS, ViTConfig, VisionTransformer, get_config, sincos_pos_embed_2d


# An official MAE file is either the released weights, {"model": state dict}, or a run checkpoint
# (checkpoint-799.pth) that also holds "optimizer", "epoch", "scaler" (a dict of numbers) and "args",
# the run's argparse.Namespace. torch.load(weights_only=True) refuses the Namespace, and
# weights_only=False would run whatever a pickle asks for; so the Namespace, a plain bag of values,
# is the one class allowed beyond tensors and containers.

SAFE_CHECKPOINT_GLOBALS = [argparse.Namespace]
NON_ENCODER_PREFIXES = ("decoder_", "mask_token", "head.", "fc_norm.")  # MAE decoder, fine-tuned heads


def read_checkpoint_file(path) -> dict:
    """A .pth file as a dict, read without running code: tensors, containers, numbers and SAFE_CHECKPOINT_GLOBALS."""
    try:
        with torch.serialization.safe_globals(SAFE_CHECKPOINT_GLOBALS):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except Exception as e:  # the unpickler's refusal, or not a torch file at all
        reason = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(e)) or re.match(r"([^\n]*)", str(e))
        reason = reason.group(1).split(" Please use")[0].strip().rstrip(".")  # torch's advice is to trust the file
        raise ValueError(f"{path}: not readable as a checkpoint without running code ({reason}); "
                         "torch.load(weights_only=True) reads tensors, containers and numbers, and here "
                         "argparse.Namespace, nothing else") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a state dict, or a checkpoint with one under \"model\"")
    return loaded


def read_mae_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The state dict of an official-layout .pth (bare, or under "model"), read without running code."""
    loaded = read_checkpoint_file(path)
    state = loaded.get("model", loaded)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict, or a checkpoint with one under \"model\"")
    return state


def parse_band_map(text: str | None, flag: str = "--init-rgb-bands") -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated 0-based band indices like 3,2,1, got {text!r}") from None


def adapt_band_kernels(weight: torch.Tensor, in_chans: int, band_map: list[int] | None, scale: bool) -> torch.Tensor:
    """Kernels over the file's S bands -> kernels over `in_chans` bands, along dim 1.

    The file's band k goes to the model's band band_map[k]; every other band gets the mean of the
    file's kernels (an unknown band is treated as an average of the known ones). With `scale`, all
    kernels are multiplied by S / in_chans: neighbouring bands of normalised imagery are strongly
    correlated, so a patch embedding summing in_chans kernels of RGB size would make tokens about
    in_chans / S times larger than the ones the pretrained blocks saw (and swamp the positional
    embedding). One band thus gets the *sum* of the RGB kernels: exactly what the RGB model computes
    on a grey image (R = G = B), so a single band looks like a grey photograph to it.
    """
    S = weight.shape[1]
    band_map = list(range(S)) if band_map is None and in_chans >= S else band_map or []
    shape = list(weight.shape)
    shape[1] = in_chans
    adapted = weight.mean(dim=1, keepdim=True).expand(shape).clone()
    for k, band in enumerate(band_map):
        adapted[:, band] = weight[:, k]
    return adapted * (S / in_chans) if scale else adapted


def resize_pos_embed(table: torch.Tensor, grid_size: int) -> tuple[torch.Tensor, str]:
    """A (1, 1 + g·g, D) positional table for a new grid; returns (table, what was done).

    A fixed 2-D sin-cos table (the official MAE pretraining and this project use one) is computed
    afresh for the new grid: it is a formula of the position, not something learned. Any other table
    was learned (timm and fine-tuned ViTs); its patch rows are resized as an image by bicubic
    interpolation, as the original MAE fine-tuning code does, and the cls row is kept.
    """
    D = table.shape[-1]
    old_grid = math.isqrt(table.shape[1] - 1)
    assert old_grid**2 + 1 == table.shape[1], "caller checks the table is 1 + g·g rows"
    fixed = sincos_pos_embed_2d(D, old_grid).to(table.device)
    if torch.allclose(table[0].float(), fixed, atol=1e-4):
        return sincos_pos_embed_2d(D, grid_size)[None].to(table.dtype), (
            f"the fixed sin-cos table of a {old_grid}x{old_grid} grid, rebuilt for {grid_size}x{grid_size}")
    patches = table[:, 1:].float().reshape(1, old_grid, old_grid, D).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid_size, grid_size), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid_size * grid_size, D).to(table.dtype)
    return torch.cat([table[:, :1], patches], dim=1), (
        f"a learned table, resized from {old_grid}x{old_grid} to {grid_size}x{grid_size} patches by bicubic "
        "interpolation (cls row kept)")


def adapt_mae_state_dict(state: dict[str, torch.Tensor], cfg: ViTConfig, band_map: list[int] | None = None,
                         source: str = "the state dict") -> tuple[dict[str, torch.Tensor], list[str]]:
    """Fit an official-layout state dict to a model of another image size or band count.

    Returns (new state dict, one line per change, for the log). Only those two differences are
    bridged; anything else (width, depth, patch size) is left for load_mae_checkpoint to report.
    - pos_embed, decoder_pos_embed: resized to cfg's patch grid (resize_pos_embed).
    - patch_embed.proj.weight: the file's bands mapped to the model's (band_map: model band of each
      file band, e.g. the red, green, blue bands of the data for ImageNet weights; default 0, 1, 2 when
      the model has at least as many bands, identity when as many), the rest the mean; scaled by
      file bands / model bands (adapt_band_kernels says why).
    - decoder_pred: the same band mapping on its outputs, unscaled (each output predicts its own band).
    """
    state, notes = dict(state), []
    grid = cfg.grid_size
    for key in ("pos_embed", "decoder_pos_embed"):
        table = state.get(key)
        if table is None or table.ndim != 3 or table.shape[1] == grid * grid + 1:
            continue
        if math.isqrt(table.shape[1] - 1) ** 2 + 1 != table.shape[1]:
            continue  # not 1 cls row + a square grid: reported as a mismatch
        state[key], what = resize_pos_embed(table, grid)
        notes.append(f"{key}: {what}")
    weight = state.get("patch_embed.proj.weight")
    kernel = (cfg.embed_dim, cfg.patch_size, cfg.patch_size)
    if weight is None or weight.ndim != 4 or (weight.shape[0], *weight.shape[2:]) != kernel:
        return state, notes  # another width or patch size: nothing to adapt, reported as a mismatch
    S, C = weight.shape[1], cfg.in_chans
    if band_map is not None:
        if len(band_map) != S or len(set(band_map)) != S or not all(0 <= b < C for b in band_map):
            raise ValueError(f"--init-rgb-bands {','.join(map(str, band_map))}: {source} has {S} input bands; "
                             f"give {S} different 0-based bands of the {C} the model sees (the data's bands to "
                             "receive them)")
    elif S == C:
        return state, notes  # same bands, no mapping asked for: the file's kernels as they are
    state["patch_embed.proj.weight"] = adapt_band_kernels(weight, C, band_map, scale=True)
    used = list(range(S)) if band_map is None and C >= S else band_map or []
    rest = [b for b in range(C) if b not in used]
    listed = lambda bands: ",".join(map(str, bands))  # noqa: E731
    notes.append(
        f"patch_embed.proj.weight: {S} -> {C} bands: "
        + (f"model bands {listed(used)} take the file's bands {listed(range(S))}" if used else "")
        + ("; " if used and rest else "")
        + (f"band(s) {listed(rest)} the mean of the file's {S} kernels" if rest else "")
        + (f"; all scaled by {S}/{C}" if S != C else "") + " (--init-rgb-bands sets the mapping)")
    pred_w, pred_b = state.get("decoder_pred.weight"), state.get("decoder_pred.bias")
    p2 = cfg.patch_size**2
    if pred_w is not None and pred_b is not None and pred_w.shape[0] == p2 * S:
        # Rows in (row, column, band) order, as patchify lays out a patch: bands are the last axis.
        w = adapt_band_kernels(pred_w.reshape(p2, S, -1).transpose(0, 1)[None], C, band_map, scale=False)
        state["decoder_pred.weight"] = w[0].transpose(0, 1).reshape(p2 * C, -1)
        b = adapt_band_kernels(pred_b.reshape(p2, S).T[None], C, band_map, scale=False)
        state["decoder_pred.bias"] = b[0].T.reshape(p2 * C)
        notes.append(f"decoder_pred: {S} -> {C} output bands by the same mapping, unscaled")
    return state, notes


def load_mae_checkpoint(model: nn.Module, state_or_path: dict | str, source: str | None = None,
                        band_map: list[int] | None = None, log=None) -> list[str]:
    """Load an official-layout MAE or ViT state dict (a path, or a dict, optionally under "model").

    A file made for another image size or band count is adapted first (adapt_mae_state_dict; each
    change goes to `log`); every other shape must match. Decoder keys may be absent (ImageNet MAE
    encoders are often shipped without). Returns the model keys left at their initial values.
    Raises ValueError naming `source` (the file, by default) and any mismatch.
    """
    if isinstance(state_or_path, str):
        source = source or state_or_path
        state_or_path = read_mae_checkpoint(state_or_path)
    source = source or "the state dict"
    state = state_or_path.get("model", state_or_path)
    state, notes = adapt_mae_state_dict(state, model.cfg, band_map, source)
    for note in notes:
        (log or print)(f"{source}: {note}")
    missing = check_mae_state(model, state, source)
    model.load_state_dict(state, strict=False)
    return missing


def check_mae_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """The loader's checks alone (a meta-device model will do): every key of `state` fits `model`,
    no encoder weight is missing. Returns the model keys `state` lacks (decoder ones only)."""
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in state if k in own and state[k].shape != own[k].shape]
    if unexpected or wrong:
        raise ValueError(
            f"{source} does not fit this model (check --model and the patch size; image size and band count "
            "are adapted): " + "; ".join(wrong[:5] + [f"unexpected key {k}" for k in unexpected[:5]])
        )
    missing = sorted(set(own) - set(state))
    if any(not k.startswith(("decoder_", "mask_token")) for k in missing):
        raise ValueError(f"{source} lacks encoder weights: {missing[:5]}")
    return missing


def load_init_weights(model: nn.Module, shapes: nn.Module, path: str, rgb_bands: str | None, dist: fsdp_setup.Dist,
                      cpu_offload: bool = False) -> None:
    """train.py --init, continual pretraining: rank 0 reads the file (whole, on CPU), adapts it and checks
    it against `shapes` (a meta-device copy of the model), then it is broadcast into the sharded `model`
    shard by shard; the other ranks never hold the full weights."""
    source = f"--init {path}"

    def read_and_check():
        if not dist.is_main:
            return {}, []
        state, notes = adapt_mae_state_dict(read_mae_checkpoint(path), shapes.cfg, parse_band_map(rgb_bands), source)
        for note in notes:
            print(f"init: {note}", flush=True)
        return state, check_mae_state(shapes, state, source)

    state, missing = fsdp_setup.on_every_rank(read_and_check, dist)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    plain = fsdp_setup.unwrap(model)
    # Offloaded shards are on the CPU, buffers on the GPU: the buffers join the shards for the broadcast.
    with fsdp_setup.buffers_on(plain, torch.device("cpu")) if cpu_offload else contextlib.nullcontext():
        set_model_state_dict(plain, state, options=options)
    kept = f"; {len(missing)} decoder tensors keep their fresh init" if missing else ""
    if dist.is_main:
        print(f"init: weights from {path}{kept}", flush=True)


def describe_state(state: dict[str, torch.Tensor]) -> str:
    """What ViT a state dict holds, read off its shapes, and the flags that would build it."""
    try:
        width = state["cls_token"].shape[-1]
        depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        _, in_chans, patch, _ = state["patch_embed.proj.weight"].shape
        img_size = round(math.sqrt(state["pos_embed"].shape[1] - 1)) * patch
        mlp = state["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, IndexError, ValueError):
        return "no recognisable ViT (expected cls_token, pos_embed, patch_embed.proj.weight, blocks.N.*)"
    what = f"a ViT of width {width}, depth {depth}, MLP {mlp}, patch {patch}, {in_chans} bands, {img_size} px"
    for name, c in CONFIGS.items():
        if (c.embed_dim, c.depth, c.mlp_dim, c.patch_size) == (width, depth, mlp, patch):
            return what + f"; use --model {name} --in-chans {in_chans} --img-size {img_size}"
    return what + "; no vit.CONFIGS entry has these dimensions"


def load_encoder(spec: str, model: str | None = None, in_chans: int | None = None, img_size: int | None = None,
                 log=print):
    """Resolve --encoder into (ViTConfig, encoder state dict or None for random init, description). A file
    made for another --img-size or --in-chans is adapted; one that does not fit fails before any image is read."""
    overrides = {k: v for k, v in (("in_chans", in_chans), ("img_size", img_size)) if v is not None}
    if spec == "random":
        if model is None:
            raise ValueError("--encoder random needs --model (e.g. --model vit_base) to know what to build")
        return get_config(model, **overrides), None, f"random init ({model})"
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"--encoder {spec}: no such file or folder; give an encoder .pt, a training run "
                         "folder, or `random` with --model")
    try:
        if path.is_dir():
            ckpt = export_encoder(str(path))
        else:
            ckpt = read_checkpoint_file(path)
    except ValueError as e:
        raise ValueError(f"--encoder {path}: {e}" if path.is_dir() else f"--encoder {e}; an encoder of a training "
                         "run comes from `python checkpoint.py export --ckpt <run> --out encoder.pt`") from None
    state = ckpt.get("model", ckpt)  # official MAE files wrap it in "model"; timm files are bare
    if not isinstance(state, dict):
        raise ValueError(f"--encoder {path}: its \"model\" entry is a {type(state).__name__}, not a state dict")
    state = {k: v for k, v in state.items() if torch.is_tensor(v) and not k.startswith(NON_ENCODER_PREFIXES)}
    if "vit_config" in ckpt:
        cfg = ViTConfig(**ckpt["vit_config"])
        for flag_, value, own in (("--in-chans", in_chans, cfg.in_chans), ("--img-size", img_size, cfg.img_size)):
            if value is not None and value != own:
                raise ValueError(f"{flag_} {value} contradicts the encoder file {path}, made for {own}; drop {flag_}")
        if model is not None:
            expected = dataclasses.replace(get_config(model), img_size=cfg.img_size, in_chans=cfg.in_chans)
            if expected != dataclasses.replace(cfg, drop_path=0.0):
                raise ValueError(f"--model {model} contradicts the encoder file {path}, which records {cfg}; "
                                 "drop --model")
    elif model is None:
        raise ValueError(f"--encoder {path} does not record its architecture (no vit_config): pass --model. "
                         f"The file holds {describe_state(state)}")
    else:
        cfg = get_config(model, **overrides)
        state, notes = adapt_mae_state_dict(state, cfg, source=f"--encoder {path}")
        for note in notes:
            log(f"--encoder {path}: {note}")
    with torch.device("meta"):
        shapes_only = VisionTransformer(cfg)
    try:
        check_mae_state(shapes_only, state, source=f"--encoder {path}")
    except ValueError as e:
        raise ValueError(f"{e}. The file holds {describe_state(state)}") from None
    return cfg, state, str(path)


def resolve_step_folder(path: str, log=print) -> Path:
    """A checkpoint folder (exactly that one, verified) or a run folder (its select_checkpoint)."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"--ckpt {path}: no such folder; give a run folder or one of its step-N folders")
    if any((folder / name).exists() for name in (checkpoint.CHECKSUMS, ".metadata", "train_state.json")):
        problems = checkpoint.verify_checkpoint(folder)
        if problems:
            raise ValueError(f"--ckpt {path}: {'; '.join(problems)}: {checkpoint.FIX}")
        return folder
    found = checkpoint.select_checkpoint(folder, log)
    if found is None:
        raise ValueError(f"--ckpt {path}: neither a step-N checkpoint folder nor a run folder holding one")
    return found


def export_encoder(ckpt_path: str, log=None) -> dict:
    """The encoder of a checkpoint as one official-layout state dict, in a single process (no process
    group: DCP reads every shard). Returns {"model", "vit_config", "step"}; save it with torch.save,
    it loads with torch.load(weights_only=True) into vit.VisionTransformer(ViTConfig(**vit_config)).
    Folders passed over in a run folder are logged (to stderr by default)."""
    folder = resolve_step_folder(ckpt_path, log or (lambda message: print(message, file=sys.stderr, flush=True)))
    train_state = json.loads((folder / "train_state.json").read_text())
    vit_cfg = ViTConfig(**train_state["vit_config"])
    with torch.device("meta"):
        encoder = VisionTransformer(vit_cfg)
    encoder.to_empty(device="cpu")  # no init: every tensor is read from the checkpoint
    state = {"model": encoder.state_dict()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        checkpoint.dcp_load(state, folder, no_dist=True)  # reads only the encoder's keys
    return {"model": state["model"], "vit_config": dataclasses.asdict(vit_cfg), "step": train_state["step"]}


def export_cli(argv: list[str] | None = None) -> int:
    """`python checkpoint.py export --ckpt RUN_OR_STEP_FOLDER --out ENCODER.pt` (checkpoint.cli)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["export"]:
        print("usage: python checkpoint.py export --ckpt RUN_OR_STEP_FOLDER --out ENCODER.pt", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="checkpoint.py export",
                                     description="write a checkpoint's encoder as one file")
    parser.add_argument("--ckpt", required=True, help="run folder (its newest loadable checkpoint) or a step-N folder")
    parser.add_argument("--out", required=True, help="output .pt file")
    args = parser.parse_args(argv[1:])
    out = Path(args.out)
    try:
        if not out.parent.is_dir():
            raise ValueError(f"--out {out}: no folder {out.parent}")
        exported = export_encoder(args.ckpt)
        torch.save(exported, out.with_name(out.name + ".tmp"))  # complete or absent, as checkpoint.write_atomic's files
        os.replace(out.with_name(out.name + ".tmp"), out)
    except (ValueError, OSError) as err:  # the message, no traceback (as train.py's cli)
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    print(f"wrote {args.out}: encoder of step {exported['step']} ({len(exported['model'])} tensors, "
          f"{exported['vit_config']['img_size']} px, {exported['vit_config']['in_chans']} bands)")
    return 0

