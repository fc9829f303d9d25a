"""gdal_check.py — does geotiff.py read your TIFFs as GDAL does? Every TIFF under a folder, pixel by pixel.

    pip install -e .[bench]                            # rasterio: GDAL, for this check only
    python tools/gdal_check.py /data/scenes            # every .tif/.tiff (by content) under the folder
    python tools/gdal_check.py /data/scenes --out check.jsonl --workers 2 --timeout 60
    python tools/gdal_check.py /data/scenes --libjpeg9 # compare YCbCr JPEG with a GDAL on IJG libjpeg 9

For each file (the first image of it) both readers read the whole image (a 512x512 window instead when the
image is over 1 GiB), a window inside it and, with 3 or more bands, the band subset [2, 0]. Verdicts:
  match          the same dtype and values (NaN equal to NaN; JPEG within --jpeg-tolerance levels)
  both refuse    GDAL fails to open or read it, and geotiff.py raises its DataError
  differ         values, dtype or shape differ: the largest difference and the first pixel that differs
  geofm refuses  GDAL reads it, geotiff.py raises a DataError (its message says why: unsupported or damaged)
  gdal refuses   geotiff.py reads what GDAL refuses
  geofm error    geotiff.py raised something other than a DataError: a defect to report
  timeout/crash  the file took longer than --timeout seconds, or the worker died on it
GDAL reads CMYK and CIELab files through `GTIFF_RAW:` (their stored samples, as geotiff.py returns them).
The GDAL in rasterio's wheels decodes JPEG with IJG libjpeg 9, whose YCbCr pixels differ from libjpeg-turbo's
(docs/geotiff.md): compare those with --libjpeg9. Each file is read in a worker process, so a file that hangs
or crashes a reader costs its timeout, not the run. The summary is printed last; --out keeps one JSON line
per file.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from multiprocessing.connection import wait

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import geotiff  # noqa: E402  (the project's root is one folder up)

RAW_PHOTOMETRICS = {5, 8, 9, 10}  # CMYK, CIELab, ICCLab, ITULab: GDAL's stored samples come through GTIFF_RAW:
BIG_BYTES = 2**30  # above this, a 512x512 window stands in for the whole image


def find_tiffs(folder: str) -> list[str]:
    """Every file under `folder` that starts like a TIFF, whatever its extension, sorted."""
    found = []
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            try:
                with open(path, "rb") as f:
                    if f.read(4) in geotiff.TIFF_MAGIC:
                        found.append(path)
            except OSError:
                continue
    return sorted(found)


def gdal_reader(path: str):
    """(header, read): GDAL's size, band count and dtype of the file, and read(window, bands) -> array, as
    rasterio gives them; GTIFF_RAW: for colour spaces GDAL would convert."""
    import rasterio
    from rasterio.windows import Window

    import tifffile

    with tifffile.TiffFile(path) as tif:
        raw = int(tif.pages[0].photometric) in RAW_PHOTOMETRICS
    dataset = rasterio.open(("GTIFF_RAW:" if raw else "") + path)
    header = dict(height=dataset.height, width=dataset.width, bands=dataset.count,
                  itemsize=np.dtype(dataset.dtypes[0]).itemsize)

    def read(window=None, bands=None):
        indexes = [b + 1 for b in bands] if bands is not None else None
        rows_cols = None if window is None else Window(window[1], window[0], window[3], window[2])
        return dataset.read(indexes, window=rows_cols)
    return header, read, dataset.close


def compare(reference: np.ndarray, pixels: np.ndarray, tolerance: float) -> dict:
    """Verdict details of geotiff.py's `pixels` against `reference` (GDAL's): the same dtype and shape, and
    values within `tolerance` (NaN equal to NaN). Only the differing values are converted, so a 1 GiB image
    costs one boolean array, not several float64 copies."""
    if reference.shape != pixels.shape or reference.dtype != pixels.dtype:
        return dict(same=False, why=f"GDAL {reference.dtype} {reference.shape}, geotiff.py {pixels.dtype} "
                                    f"{pixels.shape}")
    differs = reference != pixels
    if reference.dtype.kind in "fc":
        differs &= ~(np.isnan(reference) & np.isnan(pixels))
    if not differs.any():
        return dict(same=True, max_difference=0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        difference = np.abs(reference[differs].astype(np.float64) - pixels[differs].astype(np.float64))
    largest = float(np.nan_to_num(difference, nan=np.inf).max())
    first = tuple(int(i) for i in np.argwhere(differs)[0])
    return dict(same=largest <= tolerance, max_difference=largest, differing=float(differs.mean()),
                first=dict(at=first, gdal=reference[first].item(), geofm=pixels[first].item()))


def check_file(path: str, open_reference=gdal_reader, jpeg_tolerance: float = 2) -> dict:
    """Read `path` with geotiff.py and with the reference (GDAL) the same ways; return its verdict record."""
    record = dict(path=path)
    try:
        header, read_reference, close = open_reference(path)
    except Exception as err:  # GDAL cannot open it
        header, read_reference, close, record["gdal_error"] = None, None, None, f"{type(err).__name__}: {err}"[:300]
    try:
        info = geotiff.geotiff_info(path)
        record["layout"] = (f"{info.bands}x{info.height}x{info.width} {info.dtype} {info.compression} "
                            f"{'tiled' if info.tiled else 'striped'} {info.interleave}")
        tolerance = jpeg_tolerance if info.compression == "JPEG" else 0
    except Exception:
        info, tolerance = None, 0
    size = header or (dict(height=info.height, width=info.width, bands=info.bands, itemsize=info.dtype.itemsize)
                      if info else None)
    reads = [("image", None, None)]
    if size:
        height, width = size["height"], size["width"]
        if height * width * size["bands"] * size["itemsize"] > BIG_BYTES:
            reads = [("512x512 window", (0, 0, min(512, height), min(512, width)), None)]
        row, col = height // 3, width // 4
        reads.append(("window", (row, col, min(300, height - row), min(300, width - col)), None))
        if size["bands"] >= 3:
            reads.append(("bands [2, 0]", reads[-1][1], [2, 0]))
    verdicts = []
    try:
        for label, window, bands in reads:
            try:
                pixels = geotiff.read_geotiff(path, window=window, bands=bands)
                geofm_error = None
            except geotiff.DataError as err:
                pixels, geofm_error = None, str(err)[:400]
            except Exception as err:
                record.update(verdict="geofm error", read=label, error=f"{type(err).__name__}: {err}"[:400])
                return record
            try:
                reference = read_reference(window, bands) if read_reference else None
            except Exception as err:
                reference, record["gdal_error"] = None, f"{type(err).__name__}: {err}"[:300]
            if reference is None and pixels is None:
                verdicts.append(("both refuse", label, {}))
            elif reference is None:
                verdicts.append(("gdal refuses", label, {}))
            elif pixels is None:
                verdicts.append(("geofm refuses", label, dict(error=geofm_error)))
            else:
                details = compare(reference, pixels, tolerance)
                verdicts.append(("match" if details.pop("same") else "differ", label, details))
    finally:
        if close:
            close()
    worst = next((v for v in verdicts if v[0] != "match"), verdicts[0])  # the first read that is not a match
    record.update(verdict=worst[0], read=worst[1], **worst[2])
    return record


def _worker(connection, libjpeg9: bool, jpeg_tolerance: float):
    import logging
    import warnings

    os.environ.setdefault("CPL_LOG", os.devnull)  # GDAL's own warnings about odd files
    warnings.filterwarnings("ignore")
    logging.disable(logging.CRITICAL)  # tifffile's
    if libjpeg9:
        geotiff.JPEG_CHROMA_UPSAMPLING = "libjpeg9"
    import rasterio

    with rasterio.Env(GDAL_NUM_THREADS=1):
        connection.send("ready")  # imports done: a file's time counts from here
        while (path := connection.recv()) is not None:
            connection.send(check_file(path, jpeg_tolerance=jpeg_tolerance))


def check_all(paths: list[str], workers: int, timeout: float, libjpeg9: bool, jpeg_tolerance: float):
    """Yield each file's record, from `workers` worker processes; a worker that passes `timeout` seconds on a
    file, or dies, is replaced and the file recorded as such."""
    context = multiprocessing.get_context("spawn")
    todo, busy = list(reversed(paths)), {}  # connection -> (process, path, started)

    def start():
        parent, child = context.Pipe()
        process = context.Process(target=_worker, args=(child, libjpeg9, jpeg_tolerance), daemon=True)
        process.start()
        try:
            if parent.poll(300) and parent.recv() == "ready":
                return parent, process
        except EOFError:
            pass
        process.kill()
        raise RuntimeError(f"a worker process did not start (exit code {process.exitcode}); run `python -c "
                           "\"import rasterio, geotiff\"` to see why")

    idle = [start() for _ in range(max(1, min(workers, len(paths))))]
    while todo or busy:
        while idle and todo:
            connection, process = idle.pop()
            path = todo.pop()
            connection.send(path)
            busy[connection] = (process, path, time.monotonic())
        for connection in wait(list(busy), timeout=1.0):
            process, path, _ = busy.pop(connection)
            try:
                yield connection.recv()
                idle.append((connection, process))
            except EOFError:  # the worker died on this file
                process.join(timeout=5)
                yield dict(path=path, verdict="crash", exitcode=process.exitcode)
                idle.append(start())
        for connection, (process, path, started) in list(busy.items()):
            if time.monotonic() - started > timeout:
                process.kill()
                del busy[connection]
                yield dict(path=path, verdict="timeout", seconds=timeout)
                idle.append(start())
    for connection, process in idle:
        connection.send(None)
        process.join(timeout=5)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="a folder of TIFFs, searched recursively")
    parser.add_argument("--out", help="write one JSON line per file here")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per file for both readers")
    parser.add_argument("--jpeg-tolerance", type=float, default=2.0, help="levels JPEG pixels may differ")
    parser.add_argument("--libjpeg9", action="store_true", help="decode YCbCr JPEG as GDAL on IJG libjpeg 9 does "
                        "(geotiff.JPEG_CHROMA_UPSAMPLING), as the GDAL in rasterio's wheels")
    args = parser.parse_args(argv)
    try:
        import rasterio
    except ImportError:
        print("error: the check compares with GDAL through rasterio: `pip install rasterio` (or `pip install -e "
              ".[bench]`)", file=sys.stderr)
        return 2
    if not os.path.isdir(args.folder):
        print(f"error: {args.folder} is not a folder", file=sys.stderr)
        return 2
    paths = find_tiffs(args.folder)
    print(f"{len(paths)} TIFFs under {args.folder}; geotiff.py against GDAL {rasterio.__gdal_version__}", flush=True)
    out = open(args.out, "w") if args.out else None
    records = []
    for record in check_all(paths, args.workers, args.timeout, args.libjpeg9, args.jpeg_tolerance):
        records.append(record)
        if out:
            out.write(json.dumps(record) + "\n")
        if record["verdict"] != "match":
            details = {k: v for k, v in record.items() if k not in ("path", "verdict")}
            print(f"{record['verdict']:13s} {record['path']}  {json.dumps(details)[:300]}", flush=True)
    if out:
        out.close()
    counts = Counter(r["verdict"] for r in records)
    print("summary: " + ", ".join(f"{verdict} {n}" for verdict, n in counts.most_common()))
    return 1 if counts["differ"] or counts["geofm error"] else 0


if __name__ == "__main__":
    sys.exit(main())
