"""scenes.py — the scene-classification benchmarks that eval.py scores encoders on (UC Merced, AID,
NWPU-RESISC45, MillionAID): dataset layouts and stratified splits, the eval and training transforms,
and the scores (top-1/top-5, per-class accuracy, confusion matrices). Used by eval.py; the layouts and
split rules are written out in docs/eval.md.
"""

from __future__ import annotations

import hashlib
import os
import statistics
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import data

DEFAULT_TRAIN_RATIO = 0.8  # class folders without --train-ratio
EVAL_CROP_FRACTION = 0.875  # test images: resize to img_size / 0.875, then centre-crop img_size


# ---- datasets, splits, transforms ----


def _split_source(root) -> tuple[str, str | None]:
    """--data as (its folder, the train.txt that lists the split, or None for class folders)."""
    root = str(root)
    if os.path.isfile(root):
        return os.path.dirname(root), root
    train_list = os.path.join(root, "train.txt")
    return root, train_list if os.path.isfile(train_list) else None


def _list_split(root, list_file) -> tuple[list, list, list[str]]:
    """The split of train.txt and val.txt (or test.txt): labels are ints ("07" is 7) or class names."""
    test_file = next((os.path.join(root, name) for name in ("val.txt", "test.txt")
                      if os.path.isfile(os.path.join(root, name))), None)
    if test_file is None:
        raise data.DataError(f"{list_file}: no val.txt or test.txt next to it for the test split")
    train, test = [], []
    for file, rows in ((list_file, train), (test_file, test)):
        with open(file) as f:
            for number, line in enumerate(f, 1):
                parts = line.strip().rsplit(None, 1)  # paths may contain spaces, labels don't
                if not parts or parts[0].startswith("#"):
                    continue
                if len(parts) != 2:
                    raise data.DataError(f"{file}:{number}: expected 'relative/path label', got {line.strip()!r}")
                if not os.path.isfile(path := os.path.join(root, parts[0])):
                    raise data.DataError(f"{file}:{number}: {path} does not exist")
                rows.append((path, parts[1]))
    labels = [label for _, label in train + test]
    if not labels:
        raise data.DataError(f"{list_file} and {test_file} list no images; add 'relative/path label' lines")
    if all(label.isdecimal() for label in labels):
        to_int = {label: int(label) for label in labels}
        class_names = [str(i) for i in range(max(to_int.values()) + 1)]
    else:
        class_names = sorted(set(labels))
        to_int = {name: i for i, name in enumerate(class_names)}
    if len(set(to_int.values())) < 2:
        raise data.DataError(f"{list_file}: only one class ({labels[0]!r}); classification needs two or more")
    return [(p, to_int[y]) for p, y in train], [(p, to_int[y]) for p, y in test], class_names


def _class_folders(root) -> tuple[list[list[str]], list[str]]:
    """(images per class, class names) of the shallowest folder (breadth-first) with a subfolder of images:
    root/<class>/*, root/Images/<class>/* (UC Merced), root/AID/<class>/*."""
    queue = [root]
    while queue:
        folder = queue.pop(0)
        names = sorted(name for name in os.listdir(folder)
                       if os.path.isdir(os.path.join(folder, name)) and not name.startswith((".", "__")))
        if any(f.lower().endswith(data.IMAGE_EXTENSIONS) for n in names for f in os.listdir(os.path.join(folder, n))):
            break
        queue += [os.path.join(folder, name) for name in names]
    else:
        raise data.DataError(f"{root}: no classes found; expected <class>/ subfolders of images (e.g. "
                             "Images/<class>/*.tif) or train.txt and val.txt with 'relative/path label' lines")
    if len(names) < 2:
        raise data.DataError(f"{folder}: only one class folder ({names[0]}); classification needs two or more")
    files_per_class = []
    for name in names:
        try:
            files_per_class.append(data.list_images(os.path.join(folder, name)))
        except data.DataError:
            raise data.DataError(f"{os.path.join(folder, name)}: class {name!r} has no images; "
                                 "remove the folder or add images") from None
    return files_per_class, names


def default_train_ratio(root, train_ratio=None) -> float | None:
    """The training fraction scene_splits uses: train_ratio if given, None where train.txt/val.txt are
    the split, else DEFAULT_TRAIN_RATIO."""
    if train_ratio is None and _split_source(root)[1] is None:
        return DEFAULT_TRAIN_RATIO
    return train_ratio


def scene_splits(root, train_ratio=None, seed=0) -> tuple[list, list, list[str]]:
    """(train_items, test_items, class_names), items being (path, label) lists, from class folders or list
    files (docs/eval.md). With a ratio (default 0.8 for class folders) every class is split ratio : 1 - ratio
    by a permutation fixed by `seed`: stratified and reproducible."""
    root, list_file = _split_source(root)
    if not os.path.isdir(root):
        raise data.DataError(f"--data {root}: no such folder")
    if list_file is None:
        files_per_class, class_names = _class_folders(root)
    else:
        train, test, class_names = _list_split(root, list_file)
        if train_ratio is None:
            return train, test, class_names
        files_per_class = [sorted(p for p, y in train + test if y == c) for c in range(len(class_names))]
    ratio = DEFAULT_TRAIN_RATIO if train_ratio is None else train_ratio
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label, files in enumerate(files_per_class):
        order = rng.permutation(len(files))
        n_train = min(max(round(ratio * len(files)), 1), max(len(files) - 1, 1))  # both sides get some
        train += [(files[i], label) for i in order[:n_train]]
        test += [(files[i], label) for i in order[n_train:]]
    return train, test, class_names


def eval_transform(x: torch.Tensor, img_size: int) -> torch.Tensor:
    """Resize the shorter side to img_size / 0.875, then centre-crop img_size."""
    short = round(img_size / EVAL_CROP_FRACTION)
    height, width = x.shape[-2:]
    scale = short / min(height, width)
    x = data.resize(x, max(short, round(height * scale)), max(short, round(width * scale)))
    top, left = (x.shape[-2] - img_size) // 2, (x.shape[-1] - img_size) // 2
    return x[:, top:top + img_size, left:left + img_size].contiguous()


class SceneDataset(data.EpochSeededDataset):
    """(float32 (C, img_size, img_size) normalised, label). train=True: RandomResizedCrop, flips and
    90-degree rotations; train=False: eval_transform."""

    def __init__(self, items, img_size=224, train=False, stats=None, bands=None, in_chans=None,
                 seed=0, scale=(0.08, 1.0)):
        super().__init__(seed)
        data.check_bands(bands)
        self.items, self.img_size, self.train = list(items), img_size, train
        self.bands, self.in_chans, self.scale = bands, in_chans, scale
        self.normalize = data.Normalizer(stats)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index) -> tuple[torch.Tensor, int]:
        path, label = self.items[index]
        with data.open_image(path) as file:  # scenes are small; read whole
            file_bands, nodata = file.info.bands, file.info.nodata
            data.check_band_count(path, file_bands, self.bands, self.in_chans)
            image = file.read(bands=self.bands)
        if self.train:
            rng = self.rng(index)
            top, left, h, w = data.random_resized_box(rng, *image.shape[1:], self.scale)
            image = data.random_dihedral(image[:, top:top + h, left:left + w], rng)
        x = self.normalize(image, path, file_bands, self.bands, nodata)
        x = data.resize(x, self.img_size, self.img_size) if self.train else eval_transform(x, self.img_size)
        return x, int(label)


# ---- scores ----


def classification_metrics(scores_NC: torch.Tensor, labels_N: torch.Tensor, class_names: list[str]) -> dict:
    """top-1 and top-5 (percent), per-class top-1 (percent; None for a class without test images),
    and the confusion matrix (rows: true class, columns: predicted)."""
    C = len(class_names)
    topk = scores_NC.topk(min(5, C), dim=1).indices
    hits = topk == labels_N[:, None]
    confusion = torch.zeros(C, C, dtype=torch.long)
    confusion.index_put_((labels_N, topk[:, 0]), torch.ones(len(labels_N), dtype=torch.long), accumulate=True)
    per_class = {name: 100.0 * confusion[c, c].item() / confusion[c].sum().item() if confusion[c].sum() else None
                 for c, name in enumerate(class_names)}
    return {"top1": 100.0 * hits[:, 0].float().mean().item(), "top5": 100.0 * hits.any(1).float().mean().item(),
            "per_class": per_class, "confusion": confusion.tolist()}


def save_confusion(confusion: list[list[int]], class_names: list[str], stem: Path) -> None:
    """stem.csv (counts, class names as header) and stem.png (rows normalised; darker = more)."""
    with open(stem.with_suffix(".csv"), "w") as f:
        f.write("true\\predicted," + ",".join(class_names) + "\n")
        f.writelines(name + "," + ",".join(map(str, row)) + "\n" for name, row in zip(class_names, confusion))
    C, font = len(class_names), ImageFont.load_default()
    cell = 24 if C <= 40 else 10
    left, top = 8 + int(max(font.getlength(f"{i} {n}") for i, n in enumerate(class_names))), 24
    img = Image.new("RGB", (left + C * cell + 8, top + C * cell + 8), "white")
    draw = ImageDraw.Draw(img)
    for i, (name, row) in enumerate(zip(class_names, confusion)):
        y = top + i * cell
        draw.text((left + i * cell + 3, 6), str(i), fill="black", font=font)  # columns: class index, as the rows
        draw.text((4, y + cell // 2 - 6), f"{i} {name}", fill="black", font=font)
        for j, count in enumerate(row):
            frac, x = count / max(sum(row), 1), left + j * cell
            colour = (int(255 * (1 - frac)), int(255 * (1 - 0.6 * frac)), 255)
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=colour, outline=(220, 220, 220))
            if count and cell >= 20:
                draw.text((x + 3, y + 5), str(count), fill="white" if frac > 0.5 else "black", font=font)
    img.save(stem.with_suffix(".png"))


def summarize(runs: list[dict]) -> dict:
    """Mean and sample standard deviation (0 for a single run) of top-1 and top-5 over the seeds."""
    out = {}
    for key in ("top1", "top5"):
        values = [r[key] for r in runs]
        out[key], out[key + "_std"] = statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def split_id(items) -> str:
    """A short fingerprint of a split, to check that two evaluations used the same images."""
    text = "\n".join(f"{p}\t{y}" for p, y in sorted((str(p), y) for p, y in items))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def report(results: dict, log=print) -> None:
    """Each seed's scores, the per-class top-1 and the mean ± std of a results.json dict, as log lines."""
    for r in results["runs"]:
        log(f"seed {r['seed']}: top-1 {r['top1']:.2f}  top-5 {r['top5']:.2f}  "
            f"({r['num_train']} train / {r['num_test']} test)")
    log("per-class top-1 (mean over seeds):")
    for name in results["class_names"]:
        accs = [r["per_class"][name] for r in results["runs"] if r["per_class"][name] is not None]
        log(f"  {name:<32} {statistics.fmean(accs):6.2f}" if accs else f"  {name:<32}    n/a")
    n = len(results["runs"])
    log(f"{results['mode']}: top-1 {results['top1']:.2f} ± {results['top1_std']:.2f}  top-5 {results['top5']:.2f} ± "
        f"{results['top5_std']:.2f}  over {n} seed{'s' * (n > 1)} ({results['encoder']})")
