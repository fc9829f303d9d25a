"""
data.py — geofm's pretraining data: chips and whole scenes (GeoTIFF, JPEG, PNG) in, normalised random
crops out, reproducibly: item i of an epoch is a crop of file i // chips_per_scene, drawn from the random
stream of (seed, epoch, i) alone. geotiff.py reads GeoTIFFs; eval.py has the labelled datasets of evaluation.
Errors are geotiff.py's DataError (a ValueError) and CorruptImageError.

    python data.py stats <folder|manifest> --out stats.json   per-band statistics
    python data.py demo <folder>                             write the demo's sample chips
    python tools/bench.py data [folder]                      crops/s against a bare decode

Sources, crops, nodata, statistics, the sampler and the loader's workers in detail: docs/data.md.
"""

import argparse
import json
import math
import multiprocessing
import os
import signal
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

# The reader and the errors of the whole project; geotiff_info and read_geotiff are re-exported.
from geotiff import (CorruptImageError, DataError, GeoTiff, geotiff_info, nodata_pixel,  # noqa: F401
                     read_geotiff, sniff)

IMAGE_EXTENSIONS = (".tif", ".tiff", ".jpg", ".jpeg", ".png")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WINDOW_DRAWS = 8  # draws of a crop box per item at most, while they hold too much nodata


class PillowImage:
    """A JPEG or PNG, decoded whole when opened (they are small), read like a GeoTiff."""

    def __init__(self, path):
        self.path = str(path)
        try:
            with Image.open(self.path) as img:
                img.load()
                if img.mode in ("P", "1"):
                    img = img.convert("RGBA" if "transparency" in img.info else "RGB" if img.mode == "P" else "L")
                pixels = np.asarray(img)
        except Image.DecompressionBombError as err:
            raise DataError(f"{self.path}: {err} Convert big scenes to tiled GeoTIFF (`gdal_translate -co TILED=YES "
                            "-co COMPRESS=DEFLATE`) so they are read in windows") from err
        except (OSError, SyntaxError, ValueError) as err:
            raise CorruptImageError(f"{self.path}: Pillow could not decode it ({err}); "
                                    "the file is truncated or corrupt") from err
        # A copy: Pillow's arrays are read-only, and (height, width, bands) is not our order.
        self._pixels = np.array(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1), order="C")
        bands, height, width = self._pixels.shape
        self.info = SimpleNamespace(path=self.path, bands=bands, height=height, width=width,
                                    dtype=self._pixels.dtype, nodata=None)

    # GeoTiff's checks and messages: they read only self.path and self.info.
    _check_window, _check_bands = GeoTiff._check_window, GeoTiff._check_bands

    def read(self, window=None, bands=None) -> np.ndarray:
        row, col, height, width = self._check_window(window)
        pixels = self._pixels if bands is None else self._pixels[self._check_bands(bands)]
        return pixels[:, row:row + height, col:col + width]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def open_image(path) -> GeoTiff | PillowImage:
    """Any supported image, opened for reads as a context manager with .info (height, width, bands, dtype,
    nodata) and .read(window, bands). The file's first bytes decide its kind, not its name."""
    path = str(path)
    try:
        kind = sniff(path)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file; fix the path or remove it from the folder or manifest") from None
    return GeoTiff(path) if kind == "tiff" else PillowImage(path)


def read_image(path, window=None, bands=None) -> np.ndarray:
    """Any supported image as (bands, height, width) in the file's dtype; window = (row, col, height, width)."""
    with open_image(path) as image:
        return image.read(window, bands)


def list_images(source) -> list[str]:
    """Image paths from a folder (recursive, sorted), an image, a manifest file or a list of paths."""
    if isinstance(source, (list, tuple)):
        paths = [str(p) for p in source]
    elif os.path.isdir(source):
        paths = sorted(os.path.join(folder, name) for folder, _, names in os.walk(source)
                       for name in names if name.lower().endswith(IMAGE_EXTENSIONS))
    elif os.path.isfile(source) and str(source).lower().endswith(IMAGE_EXTENSIONS):
        paths = [str(source)]
    elif os.path.isfile(source):
        with open(source) as f:
            lines = [line.strip() for line in f]
        # Only whole lines are comments: '#' is a legal character in a path.
        base = os.path.dirname(os.path.abspath(source))
        paths = [os.path.join(base, line) for line in lines if line and not line.startswith("#")]
    else:
        raise DataError(f"{source}: no such folder or manifest file")
    if not paths:
        raise DataError(f"{source}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)} recursively, "
                        "or one path per line in a manifest)")
    return paths


def invalid_values(pixels: np.ndarray, nodata) -> np.ndarray | None:
    """Where `pixels` are nodata, NaN or infinite; None where no value can be. The tag is compared
    in the file's dtype (nodata_pixel): a float32 file's "0.1" matches its float32 pixels."""
    value = nodata_pixel(nodata, pixels.dtype)
    invalid = None if value is None else pixels == value
    if pixels.dtype.kind == "f":
        invalid = ~np.isfinite(pixels) if invalid is None else invalid | ~np.isfinite(pixels)
    return invalid


def compute_stats(source, max_files=500, sample_size=512, seed=0, progress=True) -> dict:
    """Per-band mean/std/min/max of the valid pixels of one random window from each of a random sample of
    files. Means and variances merge per file (Chan et al.): accurate over billions of 16-bit pixels."""
    paths = list_images(source)
    rng = np.random.default_rng(seed)
    if max_files is not None and len(paths) > max_files:
        paths = [paths[i] for i in sorted(rng.choice(len(paths), max_files, replace=False))]
    for i, path in enumerate(paths):
        with open_image(path) as image:
            info = image.info
            height, width = min(info.height, sample_size), min(info.width, sample_size)
            window = (rng.integers(info.height - height + 1), rng.integers(info.width - width + 1), height, width)
            pixels = image.read(window)
        if i == 0:
            first = info
            count, mean, m2 = np.zeros(info.bands), np.zeros(info.bands), np.zeros(info.bands)
            low, high = np.full(info.bands, np.inf), np.full(info.bands, -np.inf)
        elif info.bands != first.bands:
            raise DataError(f"{path} has {info.bands} bands but {paths[0]} has {first.bands}; "
                            "statistics need files with the same bands (use separate folders or manifests)")
        invalid = invalid_values(pixels, info.nodata)
        for b, band in enumerate(pixels):
            valid = (band if invalid is None else band[~invalid[b]]).astype(np.float64).ravel()
            if valid.size == 0:
                continue
            n, file_mean = valid.size, valid.mean()
            delta, total = file_mean - mean[b], count[b] + n
            mean[b] += delta * n / total
            m2[b] += ((valid - file_mean) ** 2).sum() + delta ** 2 * count[b] * n / total
            count[b] = total
            low[b], high[b] = min(low[b], valid.min()), max(high[b], valid.max())
        if progress and (i + 1 == len(paths) or (i + 1) % max(1, len(paths) // 50) == 0):
            end = "\n" if i + 1 == len(paths) else ""
            print(f"\rstats: {i + 1}/{len(paths)} files", end=end, file=sys.stderr, flush=True)
    if (count == 0).any():
        raise DataError(f"{source}: band(s) {np.flatnonzero(count == 0).tolist()} have no valid pixels in the sample")
    return {"format": "geofm-stats-1", "bands": first.bands, "dtype": np.dtype(first.dtype).name,
            "nodata": first.nodata, "mean": mean.tolist(), "std": np.sqrt(m2 / count).tolist(), "min": low.tolist(),
            "max": high.tolist(), "pixels": count.astype(int).tolist(), "files": len(paths), "source": str(source)}


def load_stats(path) -> tuple[list[float], list[float]]:
    """(mean, std) per band from a statistics JSON written by `python data.py stats`."""
    try:
        with open(path) as f:
            stats = json.load(f)
        mean, std = [float(v) for v in stats["mean"]], [float(v) for v in stats["std"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a statistics file ({err}); make one with "
                        "`python data.py stats <folder> --out stats.json`") from err
    if len(mean) != len(std) or not mean:
        raise DataError(f"{path}: 'mean' and 'std' must be non-empty lists of the same length")
    for band, (m, s) in enumerate(zip(mean, std)):
        # Caught here, not many steps later as "loss is not finite". `not s > 0` is also true for NaN.
        if not (math.isfinite(m) and math.isfinite(s) and s > 0):
            what = f"mean {m}" if not math.isfinite(m) else f"std {s}"
            raise DataError(f"{path}: band {band} has {what}; normalising needs a finite mean and a positive std per "
                            "band. Recompute it with `python data.py stats <folder> --out stats.json`, and leave a "
                            "constant band (std 0) out with `bands=[...]`")
    return mean, std


class Normalizer:
    """Per-band (x - mean) / std with nodata, NaN and infinities set to 0, with the statistics of a stats file
    or, for 3-band uint8 only, ImageNet's. A file of another dtype than the statistics' is normalised anyway,
    with a warning once per dtype and process (docs/data.md says why)."""

    def __init__(self, stats_path=None):
        self.stats_path, self.mean, self.std, self.stats_dtype = stats_path, None, None, None
        if stats_path:
            self.mean, self.std = load_stats(stats_path)
            with open(stats_path) as f:
                self.stats_dtype = json.load(f).get("dtype")  # what the statistics were computed on, if said
        self._dtypes_seen = {self.stats_dtype}
        self._cache = {}  # (file bands, selection, dtype) -> float32 (mean, 1 / std) columns

    def band_stats(self, path, file_bands, bands, dtype) -> tuple[np.ndarray, np.ndarray]:
        selected = list(range(file_bands)) if bands is None else list(bands)
        if self.mean is None:
            if np.dtype(dtype) == np.uint8 and len(selected) == 3:
                return np.array(IMAGENET_MEAN) * 255, np.array(IMAGENET_STD) * 255
            raise DataError(f"{path}: {np.dtype(dtype).name} with {len(selected)} bands needs per-band statistics "
                            "(only 3-band uint8 falls back to ImageNet's); run "
                            "`python data.py stats <folder> --out stats.json` and pass stats='stats.json'")
        if len(self.mean) == file_bands:
            return np.array(self.mean)[selected], np.array(self.std)[selected]
        if len(self.mean) == len(selected):  # statistics of the already-selected bands
            return np.array(self.mean), np.array(self.std)
        raise DataError(f"{self.stats_path} has statistics for {len(self.mean)} bands but {path} has {file_bands} "
                        f"({len(selected)} selected); compute statistics on the same kind of files")

    def __call__(self, pixels: np.ndarray, path, file_bands, bands, nodata) -> torch.Tensor:
        """float32 (C, H, W), C-contiguous: the conversion also pays for a flipped view's copy."""
        key = (file_bands, None if bands is None else tuple(bands), pixels.dtype)
        if key not in self._cache:
            if self.stats_dtype is not None and pixels.dtype.name not in self._dtypes_seen:
                self._dtypes_seen.add(pixels.dtype.name)
                warnings.warn(f"{path} is {pixels.dtype.name} but the statistics in {self.stats_path} are of "
                              f"{self.stats_dtype} files; normalising it with them anyway. If its values have another "
                              "scale, convert it or keep it apart, with statistics of its own", stacklevel=2)
            mean, std = self.band_stats(path, file_bands, bands, pixels.dtype)
            self._cache[key] = tuple(np.asarray(v, np.float32).reshape(-1, 1, 1) for v in (mean, 1 / std))
        mean, inv_std = self._cache[key]
        x = pixels.astype(np.float32, order="C")
        x -= mean
        x *= inv_std
        invalid = invalid_values(pixels, nodata)
        if invalid is not None:
            x[invalid] = 0
        return torch.from_numpy(x)


def check_bands(bands):
    """Raise naming the `bands` setting when it can select no file's bands. A repeated index is fine:
    [0, 0, 0] gives a grey band three channels."""
    if bands is None:
        return
    if isinstance(bands, (str, bytes)) or not isinstance(bands, (Sequence, np.ndarray)) or not all(
            isinstance(b, (int, np.integer)) and not isinstance(b, (bool, np.bool_)) for b in bands):
        raise DataError(f"bands={bands!r} must be a list of 0-based band indices, e.g. bands=[3, 2, 1] "
                        "(train.py --bands 3,2,1), or None to keep every band")
    if len(bands) == 0:
        raise DataError("bands=[] selects no bands (an empty --bands or config list): list at least one 0-based "
                        "band index, e.g. bands=[3, 2, 1] (train.py --bands 3,2,1), or leave bands unset (None) "
                        "to keep every band")
    if min(bands) < 0:
        raise DataError(f"bands={[int(b) for b in bands]}: band indices are 0-based, the first band is 0, so none "
                        "can be negative (counting from the end is not supported)")


def check_band_count(path, file_bands, bands, in_chans):
    """Raise naming the file when its bands don't fit the configured selection."""
    check_bands(bands)
    if bands is not None and max(bands) >= file_bands:
        raise DataError(f"{path} has {file_bands} bands but the config selects bands={[int(b) for b in bands]}; "
                        f"band indices are 0-based, so this file's are 0..{file_bands - 1}")
    selected = file_bands if bands is None else len(bands)
    if in_chans is not None and selected != in_chans:
        raise DataError(f"{path} has {file_bands} bands ({selected} after selecting bands={bands}) but "
                        f"in_chans={in_chans}; remove the file from the dataset or fix in_chans/bands")


def random_resized_box(rng, height, width, scale, ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) covering a random `scale` fraction of the area at a random aspect
    ratio (Inception-style RandomResizedCrop); a central crop if ten draws don't fit."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(height - h + 1)), int(rng.integers(width - w + 1)), h, w
    aspect = min(max(width / height, ratio[0]), ratio[1])
    if width / height < aspect:
        w, h = width, min(height, round(width / aspect))
    else:
        w, h = min(width, round(height * aspect)), height
    return (height - h) // 2, (width - w) // 2, h, w


def random_dihedral(pixels: np.ndarray, rng) -> np.ndarray:
    """One of the 8 flips/90-degree rotations, all valid views of overhead imagery. A view: the float
    conversion that follows pays the copy."""
    pixels = np.rot90(pixels, k=int(rng.integers(4)), axes=(1, 2))
    return pixels[:, :, ::-1] if rng.integers(2) else pixels


def resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear (C, h, w) -> (C, height, width), antialiased when shrinking, as PIL and torchvision
    do. Float stays float; uint8 stays uint8 (rounded), in channels-last memory order."""
    if x.shape[-2:] == (height, width):
        return x.contiguous()
    shrink = height < x.shape[-2] or width < x.shape[-1]
    batch = x[None].contiguous(memory_format=torch.channels_last) if x.dtype == torch.uint8 else x[None]
    return F.interpolate(batch, size=(height, width), mode="bilinear", align_corners=False, antialias=shrink)[0]


class EpochSeededDataset(Dataset):
    """Per-item randomness from (seed, epoch, index) alone, so a resumed run sees exactly
    the augmentations of an uninterrupted one, whichever worker loads the item."""

    def __init__(self, seed):
        self.seed = seed
        # Shared memory, so set_epoch in the main process reaches persistent DataLoader
        # workers that copied the dataset earlier. Call it before iterating the loader.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int):
        self._epoch.fill_(epoch)

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, int(self._epoch), index))


@dataclass
class PretrainDataConfig:
    img_size: int = 224  # side of the square crops the model sees
    bands: list[int] | None = None  # 0-based band indices to keep (may repeat); None keeps all
    in_chans: int | None = None  # expected band count after selection; any other file is an error
    stats: str | None = None  # statistics JSON from `python data.py stats`
    scale: tuple = (0.2, 1.0)  # RandomResizedCrop area fraction (MAE's pretraining setting)
    ratio: tuple = (3 / 4, 4 / 3)  # RandomResizedCrop aspect ratios
    crop_size: int = 512  # side of the random window a bigger file is cut to before RandomResizedCrop
    chips_per_scene: int = 1  # items (each with its own window) per file per epoch
    max_nodata: float = 0.5  # a box with a larger fraction of nodata/NaN values is drawn again
    skip_corrupt: bool = False  # skip and count corrupt files instead of stopping with an error

    def __post_init__(self):
        for name in ("img_size", "crop_size", "chips_per_scene"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise DataError(f"{name}={value!r} (train.py --{name.replace('_', '-')}) must be a whole number >= 1")
        if not 0 <= self.max_nodata <= 1:
            raise DataError(f"max_nodata={self.max_nodata} (train.py --max-nodata) is a fraction of a crop's "
                            "values, in [0, 1]; 1 keeps every crop")


class PretrainDataset(EpochSeededDataset):
    """MAE's random crops: float32 (C, img_size, img_size), normalised per band. Item i is a crop
    of file i // chips_per_scene in a random crop_size window; docs/data.md says how it is drawn."""

    def __init__(self, source, cfg: PretrainDataConfig | None = None, seed=0):
        super().__init__(seed)
        self.cfg = cfg or PretrainDataConfig()
        check_bands(self.cfg.bands)  # before any file is read, and before DataLoader workers start
        self.paths = list_images(source)
        self.normalize = Normalizer(self.cfg.stats)
        # Skips counted per worker slot (0 = main process) so workers never race on a cell.
        self._skipped = torch.zeros(256, dtype=torch.int64).share_memory_()

    def __len__(self):
        return len(self.paths) * self.cfg.chips_per_scene

    def __getitem__(self, index) -> torch.Tensor:
        rng = self.rng(index)
        scene = index // self.cfg.chips_per_scene
        for attempt in range(len(self.paths)):
            path = self.paths[(scene + attempt) % len(self.paths)]  # skip mode: the next file stands in
            try:
                return self.load(path, rng)
            except CorruptImageError as err:
                if not self.cfg.skip_corrupt:
                    raise
                worker = get_worker_info()
                self._skipped[0 if worker is None else 1 + worker.id % 255] += 1
                print(f"warning: skipped corrupt image: {err}", file=sys.stderr)
        raise DataError(f"every image in the dataset ({len(self.paths)} files, e.g. {self.paths[0]}) is corrupt")

    def load(self, path, rng) -> torch.Tensor:
        cfg, size = self.cfg, self.cfg.img_size
        with open_image(path) as image:
            info = image.info
            check_band_count(path, info.bands, cfg.bands, cfg.in_chans)
            for _ in range(WINDOW_DRAWS):
                pixels = image.read(self.draw_box(rng, info.height, info.width), cfg.bands)
                invalid = invalid_values(pixels, info.nodata)
                if invalid is None or invalid.mean() <= cfg.max_nodata:
                    break
        if invalid is None and pixels.dtype == np.uint8:
            # Resized first, as torchvision does, on torch's uint8 kernel (several times cheaper than in float).
            pixels = resize(torch.from_numpy(pixels), size, size).numpy()
        x = self.normalize(random_dihedral(pixels, rng), path, info.bands, cfg.bands, info.nodata)
        return resize(x, size, size)

    def draw_box(self, rng, height, width) -> tuple[int, int, int, int]:
        """(top, left, h, w) in the file: RandomResizedCrop's box in a random crop_size window."""
        crop_h, crop_w = min(height, self.cfg.crop_size), min(width, self.cfg.crop_size)
        crop_top, crop_left = int(rng.integers(height - crop_h + 1)), int(rng.integers(width - crop_w + 1))
        top, left, h, w = random_resized_box(rng, crop_h, crop_w, self.cfg.scale, self.cfg.ratio)
        return crop_top + top, crop_left + left, h, w

    @property
    def num_skipped(self) -> int:
        return int(self._skipped.sum())

    def set_epoch(self, epoch: int):
        """Starting a new epoch reports, and resets, the count of corrupt files skipped in the last."""
        if epoch != int(self._epoch) and self.num_skipped:
            print(f"epoch {int(self._epoch)}: skipped {self.num_skipped} corrupt image reads (paths in the "
                  "warnings above)", file=sys.stderr)
            self._skipped.zero_()
        super().set_epoch(epoch)


class SyntheticDataset(Dataset):
    """Random float tensors in memory; item i is always the same tensor. For benchmarks and tests."""

    def __init__(self, num_images, in_chans, img_size, seed=0):
        self.num_images, self.in_chans, self.img_size, self.seed = num_images, in_chans, img_size, seed

    def __len__(self):
        return self.num_images

    def __getitem__(self, index) -> torch.Tensor:
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence((self.seed, index)).generate_state(1)[0]))
        return torch.randn(self.in_chans, self.img_size, self.img_size, generator=generator)


class ResumableDistributedSampler(Sampler[int]):
    """Disjoint per-rank shards of a permutation from torch.Generator(seed + epoch), resumable mid-epoch
    from (epoch, index), index counting the samples this rank was handed this epoch. Save the position
    from the step counter, not from state_dict() (workers prefetch ahead); docs/data.md has the recipe.
    set_epoch restarts at index 0 only for a new epoch, so it keeps a loaded resume point."""

    def __init__(self, dataset_len, rank, world_size, seed=0, shuffle=True, drop_last=True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if dataset_len < (world_size if drop_last else 1):
            raise ValueError(f"{dataset_len} samples cannot give each of {world_size} ranks one")
        self.dataset_len, self.rank, self.world_size = dataset_len, rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.num_samples = dataset_len // world_size if drop_last else math.ceil(dataset_len / world_size)
        self.epoch, self.index = 0, 0

    def set_epoch(self, epoch: int):
        if epoch != self.epoch:
            self.epoch, self.index = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": int(self.epoch), "index": int(self.index)}

    def load_state_dict(self, state: dict):
        epoch, index = int(state["epoch"]), int(state["index"])
        if not 0 <= index <= self.num_samples:
            raise ValueError(f"sampler index {index} is outside the {self.num_samples} samples per rank per epoch")
        self.epoch, self.index = epoch, index

    def epoch_order(self, epoch: int) -> list[int]:
        """This rank's full index order for `epoch`."""
        if self.shuffle:
            order = torch.randperm(self.dataset_len, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(self.dataset_len)
        total = self.num_samples * self.world_size
        order = (order.tolist() * math.ceil(total / self.dataset_len))[:total]  # drop the tail, or pad by wrapping
        return order[self.rank:total:self.world_size]

    def __iter__(self):
        order = self.epoch_order(self.epoch)
        while self.index < len(order):
            self.index += 1
            yield order[self.index - 1]

    def __len__(self):
        return self.num_samples


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM/SIGUSR1. SLURM signals the whole process group; torch's own
    worker handler would die on it, failing the step that the main process is about to save."""
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)


def stop_loader_workers() -> None:
    """Kill the loader's workers after a failure: they ignore SIGTERM, so Python's exit would wait for them
    forever. torch's SIGCHLD handler is set aside meanwhile, or it would report a second loader failure."""
    torch_handler = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in multiprocessing.active_children():
        worker.kill()
        worker.join()
    signal.signal(signal.SIGCHLD, torch_handler)


def error_message(err: Exception) -> str:
    """An error's own message. A DataLoader worker's error arrives with the worker's traceback as its
    message; its last line, 'module.ErrorType: message', ends with the message that names the file."""
    text = str(err)
    if "\nOriginal Traceback" in text:
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return text


def make_loader(dataset, batch_size, sampler, workers=4, pin_memory=True, drop_last=True) -> DataLoader:
    """A DataLoader with worker processes that stay alive between epochs and prefetch ahead."""
    extra = dict(persistent_workers=True, prefetch_factor=4) if workers > 0 else {}
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory and torch.cuda.is_available(), drop_last=drop_last,
                      worker_init_fn=ignore_stop_signals, **extra)


def make_demo_chips(folder, n=64, size=64, bands=4, seed=0) -> str:
    """Write n uint16 `bands`-band GeoTIFF chips that look like land cover, plus stats.json; returns the
    stats path. Smooth patches of water, vegetation, soil and built-up areas crossed by roads, each with
    its own spectrum: real spatial and spectral structure to learn, unlike white noise."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    wavelength = np.linspace(0, 1, bands)  # band 0 ~ blue ... last band ~ short-wave infrared
    spectra = np.stack([
        0.09 - 0.07 * wavelength,  # water: dark, darker in the infrared
        # vegetation: a green bump, then the red edge into bright near-infrared
        0.04 + 0.05 * np.exp(-((wavelength - 0.3) / 0.1) ** 2) + 0.4 / (1 + np.exp(-(wavelength - 0.55) * 30)),
        0.10 + 0.20 * wavelength,  # bare soil: brightening towards the infrared
        0.22 + 0.03 * wavelength,  # built-up: bright and flat
    ])
    # Tiled DEFLATE GeoTIFFs in UTM zone 33N, as GDAL writes them: 10 m pixels, projected, pixel-is-area.
    geokeys = [1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32633]
    geotags = [(33550, "d", 3, (10.0, 10.0, 0.0), True),  # pixel size
               (33922, "d", 6, (0.0, 0.0, 0.0, 500000.0, 4500000.0, 0.0), True),  # the top-left corner's position
               (34735, "H", len(geokeys), geokeys, True)]
    tile = 256 if size >= 256 else 16 * max(1, size // 32)
    y, x = np.mgrid[0:size, 0:size]

    def smooth_noise(cells):  # values in [0, 1] varying smoothly over about size/cells pixels
        grid = torch.from_numpy(rng.random((1, 1, cells + 1, cells + 1), dtype=np.float32))
        return F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=True)[0, 0].clamp(0, 1).numpy()

    for i in range(n):
        land = np.digitize(smooth_noise(3), [0.3, 0.6, 0.8])
        for _ in range(rng.integers(0, 3)):  # straight roads with built-up spectra
            angle, offset = rng.uniform(0, np.pi), rng.uniform(0, size)
            land[np.abs((x - size / 2) * np.sin(angle) - (y - size / 2) * np.cos(angle) + offset - size / 2) < 1.2] = 3
        texture = 1 + 0.15 * (smooth_noise(8) - 0.5)
        reflectance = spectra[land].transpose(2, 0, 1) * texture + rng.normal(0, 0.004, (bands, size, size))
        digital_numbers = np.clip(reflectance * 10000, 0, 65535).astype(np.uint16)  # Sentinel-2 L2A scaling
        tifffile.imwrite(os.path.join(folder, f"chip_{i:04d}.tif"), digital_numbers, photometric="minisblack",
                         planarconfig="separate", tile=(tile, tile), compression="zlib", predictor=True,
                         extratags=geotags)
    stats_path = os.path.join(folder, "stats.json")
    with open(stats_path, "w") as f:
        json.dump(compute_stats(folder, max_files=None, progress=False), f, indent=1)
    return stats_path


def main(argv=None):
    parser = argparse.ArgumentParser(description="geofm data tools")
    commands = parser.add_subparsers(dest="command", required=True)
    stats = commands.add_parser("stats", help="per-band mean/std/min/max of a folder or manifest")
    stats.add_argument("source")
    stats.add_argument("--out", required=True)
    stats.add_argument("--max-files", type=int, default=500, help="random sample of this many files")
    stats.add_argument("--sample-size", type=int, default=512, help="read a random window this big from each")
    stats.add_argument("--seed", type=int, default=0)
    commands.add_parser("demo", help="write the built-in sample chips and stats.json").add_argument("folder")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            print(f"wrote chips and {make_demo_chips(args.folder)}")
            return 0
        for flag, value in (("--max-files", args.max_files), ("--sample-size", args.sample_size)):
            if value < 1:
                raise ValueError(f"{flag} must be positive, got {value}")
        result = compute_stats(args.source, args.max_files, args.sample_size, args.seed)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    except (ValueError, OSError) as err:  # DataError is a ValueError: its message names the file and the fix
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: mean {[round(m, 2) for m in result['mean']]}, std {[round(s, 2) for s in result['std']]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
