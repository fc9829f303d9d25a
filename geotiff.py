"""geotiff.py — read GeoTIFFs without GDAL, decoding only the tiles a window touches.

Satellite scenes arrive as GeoTIFFs written by GDAL: multi-band, 8/16-bit or float, often
billions of pixels. This file reads them with tifffile (header and tags) and imagecodecs (the
codecs and TIFF predictors), and nothing else:

    layout       striped or tiled; pixel interleave (all bands in each tile) or band interleave
                 (one set of tiles per band); classic TIFF or BigTIFF; of a COG, the first,
                 full-resolution image (the overviews after it are ignored)
    compression  none, DEFLATE, LZW, ZSTD, PACKBITS, JPEG (RGB or YCbCr), with the horizontal
                 (2) or floating-point (3) predictor; a codec imagecodecs lacks is an error
                 saying how to install it or re-encode the file
    dtypes       uint8, uint16, int16, float32, float64 (all checked against GDAL's pixels) and
                 any other sample type tifffile maps to numpy; either byte order, returned native
    nodata       the GDAL_NODATA tag, as GeoTiffInfo.nodata (None without one); GDAL's sparse
                 tiles (SPARSE_OK, no bytes at all) read as nodata, or 0 without it. A tag no
                 pixel of the dtype can hold (-9999 in uint16, 300 in uint8) marks no pixel, as
                 in GDAL's masks, and a sparse tile in such a file is an error

    read_geotiff(path, window, bands)   (bands, height, width) in the file's dtype
    geotiff_info(path)                  GeoTiffInfo: size, bands, dtype, nodata, layout, codec
    nodata_pixel(nodata, dtype)         the nodata value as a pixel of dtype, None if none can be
    GeoTiff(path)                       an open file for many reads; counts the segments decoded
    sniff(path)                         'tiff' or 'pillow' from the first bytes, not the extension

Why windows: a 10000x10000 16-bit scene is 200 MB per band once decoded, while a training crop
is 512x512. A window (row, col, height, width) is mapped to the segments (tiles or strips) it
intersects, only their bytes are read and decoded, and the overlapping pieces are pasted
together, so a crop costs a few 256x256 tiles, not the scene. With band interleave a band
subset also skips every other band's tiles. Striped files gain less: a strip spans the width.

Errors name the file and what to do: DataError for files this reader cannot handle and for
windows or bands outside the image, its subclass CorruptImageError for missing, truncated or
damaged bytes (what the datasets in data.py may skip with skip_corrupt=True).

Try it:

    python -c "import geotiff; print(geotiff.geotiff_info('x.tif'))"
    python -c "import geotiff; print(geotiff.read_geotiff('x.tif', window=(0, 0, 512, 512), bands=[3, 2, 1]).shape)"
"""

import logging
import math
import os
from dataclasses import dataclass

import numpy as np
import tifffile

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
PILLOW_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")  # JPEG, PNG
GDAL_NODATA_TAG = 42113


def _drop_tifffile_nodata_warnings(record: logging.LogRecord) -> bool:
    return "parsing GDAL_NODATA tag raised" not in record.getMessage()


# Why: tifffile parses the GDAL_NODATA tag itself on every open, and logs a raw exception
# (e.g. "ValueError: -9999 is not castable to uint16") when the dtype cannot hold it; in a
# training loop that is one line per sample. This file parses the tag on its own, raises a
# DataError naming the file where it is unusable and defines what an out-of-range value means
# (see nodata_pixel), so tifffile's message says nothing the user needs.
logging.getLogger("tifffile").addFilter(_drop_tifffile_nodata_warnings)


class DataError(ValueError):
    """A problem with the user's data or settings; the message names the file and the fix."""


class CorruptImageError(DataError):
    """The file is not an image or its bytes are damaged: what `skip_corrupt` may skip."""


# -----------------------------------------------------------------------------
# Reading GeoTIFFs one tile at a time


@dataclass
class GeoTiffInfo:
    path: str
    height: int
    width: int
    bands: int
    dtype: np.dtype
    nodata: float | None  # GDAL_NODATA tag, as written; None when the file has none. It can lie outside
    # the dtype's range (-9999 in a uint16 file): nodata_pixel(nodata, dtype) is the value to compare pixels with
    tiled: bool
    tile_shape: tuple[int, int]  # (rows, cols) of a tile; strips are (rows per strip, width)
    interleave: str  # "pixel": all bands in each tile; "band": one set of tiles per band
    compression: str
    bigtiff: bool


class GeoTiff:
    """An open GeoTIFF that decodes only the segments (tiles or strips) a read needs.

    tifffile parses the header and owns the codecs (via imagecodecs, with the TIFF
    predictors); this class does the part that matters for huge scenes: map a window to
    the segments it intersects, read just their bytes and paste the decoded pieces
    together. `segments_decoded` counts decodes, so tests can check a small window
    stays small. For a COG the first image is full resolution; overviews follow it.
    """

    def __init__(self, path):
        self.path = str(path)
        if sniff(self.path) != "tiff":
            raise CorruptImageError(f"{self.path}: not a TIFF file (wrong magic bytes)")
        try:
            self._tif = tifffile.TiffFile(self.path)
        except Exception as err:
            raise CorruptImageError(f"{self.path}: unreadable TIFF header ({err}); "
                                    "the file is truncated or corrupt") from err
        try:
            self.info = self._inspect()
        except BaseException:
            self.close()
            raise
        self._file_size = os.path.getsize(self.path)
        self.segments_decoded = 0

    def _inspect(self) -> GeoTiffInfo:
        try:
            page = self._page = self._tif.pages[0]
        except Exception as err:
            raise CorruptImageError(f"{self.path}: unreadable TIFF header ({err}); "
                                    "the file is truncated or corrupt") from err
        if page.imagedepth != 1 or page.dtype is None:
            raise DataError(f"{self.path}: unsupported TIFF layout (depth {page.imagedepth}, {page.bitspersample}-bit "
                            "samples); convert it, e.g. `gdal_translate -ot UInt16 in.tif out.tif`")
        try:
            page.decode(None, 0)  # tifffile hands out a decoder that raises when the codec is missing
        except Exception as err:
            raise DataError(
                f"{self.path}: compression {page.compression!r} with predictor {page.predictor} cannot be decoded "
                f"({err}). Install the full codec set with `pip install -U imagecodecs`, or re-encode "
                "with GDAL: `gdal_translate -co COMPRESS=DEFLATE -co TILED=YES in.tif out.tif`") from err
        nodata = page.tags.get(GDAL_NODATA_TAG)
        if nodata is not None:
            text = self._nodata_text = str(nodata.value).strip("\x00 ")
            try:
                nodata = float(text)
            except ValueError:
                raise DataError(f"{self.path}: GDAL_NODATA tag {text!r} is not a number; set it with "
                                "`gdal_edit.py -a_nodata <value> file.tif` or drop it with "
                                "`gdal_edit.py -unsetnodata file.tif`") from None
        return GeoTiffInfo(
            path=self.path,
            height=page.imagelength,
            width=page.imagewidth,
            bands=page.samplesperpixel,
            dtype=page.dtype.newbyteorder("="),  # big-endian files still give native arrays
            nodata=nodata,
            tiled=page.is_tiled,
            tile_shape=(page.tilelength, page.tilewidth) if page.is_tiled
            else (min(page.rowsperstrip, page.imagelength), page.imagewidth),
            interleave="band" if page.planarconfig == 2 else "pixel",
            compression=getattr(page.compression, "name", str(page.compression)),
            bigtiff=self._tif.is_bigtiff,
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._tif.close()

    def window_segments(self, window=None, bands=None) -> list[int]:
        """Indices (into the file's offset table) of the segments a window intersects."""
        return self._segments(self._check_window(window), self._check_bands(bands))

    def read(self, window=None, bands=None) -> np.ndarray:
        """Pixels of `window` = (row, col, height, width) for `bands`, as (bands, height, width)."""
        info = self.info
        row, col, height, width = window = self._check_window(window)
        bands = self._check_bands(bands)
        tile_rows, tile_cols, across, per_plane = self._grid()
        band_interleaved = info.interleave == "band"
        all_bands = bands == list(range(info.bands))
        out = np.empty((len(bands), height, width) if band_interleaved else (height, width, len(bands)), info.dtype)
        for index in self._segments(window, bands):
            plane, position = divmod(index, per_plane)
            top, left = position // across * tile_rows, position % across * tile_cols
            tile = self._decode(index)  # (rows, cols, samples)
            # The overlap of this tile and the window, in image coordinates.
            y0, y1 = max(row, top), min(row + height, top + tile_rows, info.height)
            x0, x1 = max(col, left), min(col + width, left + tile_cols, info.width)
            if tile.shape[0] < y1 - top or tile.shape[1] < x1 - left:
                raise CorruptImageError(f"{self.path}: segment {index} decoded to {tile.shape[:2]}, "
                                        f"too small for its place in the image; the file is corrupt")
            piece = tile[y0 - top:y1 - top, x0 - left:x1 - left]
            if band_interleaved:
                for k, band in enumerate(bands):
                    if band == plane:
                        out[k, y0 - row:y1 - row, x0 - col:x1 - col] = piece[..., 0]
            else:
                out[y0 - row:y1 - row, x0 - col:x1 - col] = piece if all_bands else piece[..., bands]
        return out if band_interleaved else np.ascontiguousarray(out.transpose(2, 0, 1))

    def _grid(self) -> tuple[int, int, int, int]:
        """Segment rows, segment cols, segments across the image, segments per band plane."""
        tile_rows, tile_cols = self.info.tile_shape
        across = math.ceil(self.info.width / tile_cols)
        return tile_rows, tile_cols, across, across * math.ceil(self.info.height / tile_rows)

    def _segments(self, window, bands) -> list[int]:
        row, col, height, width = window
        tile_rows, tile_cols, across, per_plane = self._grid()
        # Band-interleaved files store each band's tiles as a separate plane, so a band
        # subset skips the other planes entirely; pixel-interleaved tiles hold every band.
        planes = sorted(set(bands)) if self.info.interleave == "band" else [0]
        return [plane * per_plane + r * across + c
                for plane in planes
                for r in range(row // tile_rows, (row + height - 1) // tile_rows + 1)
                for c in range(col // tile_cols, (col + width - 1) // tile_cols + 1)]

    def _decode(self, index: int) -> np.ndarray:
        page = self._page
        offset, nbytes = page.dataoffsets[index], page.databytecounts[index]
        if nbytes == 0:
            # GDAL's SPARSE_OK writes all-nodata tiles as no bytes at all.
            rows, cols = self.info.tile_shape
            return np.full((rows, cols, page.shaped[-1]), self._sparse_fill(index), self.info.dtype)
        if offset + nbytes > self._file_size:
            raise CorruptImageError(f"{self.path}: truncated: segment {index} needs bytes up to {offset + nbytes} "
                                    f"but the file has {self._file_size}; copy or download it again")
        fh = self._tif.filehandle
        fh.seek(offset)
        data = fh.read(nbytes)
        try:
            tile, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        except Exception as err:
            raise CorruptImageError(f"{self.path}: segment {index} failed to decode "
                                    f"({type(err).__name__}: {err}); the file is corrupt") from err
        self.segments_decoded += 1
        return tile[0]

    def _sparse_fill(self, index: int):
        """The pixel value of a sparse segment: the nodata value, or 0 without a GDAL_NODATA tag."""
        info = self.info
        if info.nodata is None:
            return info.dtype.type(0)
        fill = nodata_pixel(info.nodata, info.dtype)
        if fill is None:
            # Why an error: GDAL would fill this tile with the tag clamped (or rounded) into the
            # dtype, -9999 becoming 0 in uint16, i.e. ordinary pixels that nothing marks as nodata,
            # since the tag matches no pixel. Any value we picked would be data that isn't there.
            segment = "tile" if info.tiled else "strip"
            raise DataError(f"{self.path}: {segment} {index} has no bytes (a sparse {segment}, which reads as "
                            f"nodata), but the GDAL_NODATA tag {self._nodata_text} is not a {info.dtype} value "
                            f"({_value_range(info.dtype)}), so there is nothing to fill it with; set a nodata value "
                            f"the pixels can hold with `gdal_edit.py -a_nodata <value> {self.path}`")
        return fill

    def _check_window(self, window) -> tuple[int, int, int, int]:
        info = self.info
        if window is None:
            return 0, 0, info.height, info.width
        row, col, height, width = (int(v) for v in window)
        if row < 0 or col < 0 or height < 1 or width < 1 or row + height > info.height or col + width > info.width:
            raise DataError(f"{self.path}: window (row={row}, col={col}, height={height}, width={width}) is not "
                            f"inside the {info.height}x{info.width} image; it needs row+height <= {info.height} "
                            f"and col+width <= {info.width}")
        return row, col, height, width

    def _check_bands(self, bands) -> list[int]:
        count = self.info.bands
        if bands is None:
            return list(range(count))
        bands = [int(b) for b in bands]
        if not bands:
            raise DataError(f"{self.path}: no bands selected (bands=[]); list at least one 0-based band index, "
                            f"0..{count - 1}, or pass bands=None to read all {count}")
        if min(bands) < 0 or max(bands) >= count:
            raise DataError(f"{self.path}: band indices {bands} out of range; the file has {count} "
                            f"bands, valid 0-based indices are 0..{count - 1}")
        return bands


def read_geotiff(path, window=None, bands=None) -> np.ndarray:
    """(bands, height, width) in the file's dtype; window = (row, col, height, width) in pixels."""
    with GeoTiff(path) as tif:
        return tif.read(window, bands)


def geotiff_info(path) -> GeoTiffInfo:
    """Size, bands, dtype, nodata and layout of the file, from its header alone."""
    with GeoTiff(path) as tif:
        return tif.info


def nodata_pixel(nodata, dtype):
    """`nodata` (GeoTiffInfo.nodata) as a scalar of the pixel `dtype`, to compare pixels with or
    fill with; None without a nodata value, or when no pixel of `dtype` can equal it: a value
    outside the dtype's range (-9999 or 70000 in uint16, 1e40 in float32), a fraction or NaN in
    an integer dtype. Such a tag marks no pixel, as GDAL's nodata mask decides too (it uses the
    nodata value only if it is in range for the band's type). Float dtypes round it to their
    precision, as GDAL compares float32 pixels with the float32 nodata: "0.1" matches 0.1f."""
    if nodata is None:
        return None
    dtype = np.dtype(dtype)
    if dtype.kind in "biu":
        low, high = (0, 1) if dtype.kind == "b" else (int(np.iinfo(dtype).min), int(np.iinfo(dtype).max))
        if not (math.isfinite(nodata) and nodata == int(nodata) and low <= int(nodata) <= high):
            return None
        return dtype.type(int(nodata))
    if dtype.kind in "fc":
        with np.errstate(over="ignore"):
            value = dtype.type(nodata)
        return None if math.isfinite(nodata) and not np.isfinite(value) else value  # overflowed to inf
    return None


def _value_range(dtype: np.dtype) -> str:
    if dtype.kind == "b":
        return "0 or 1"
    if dtype.kind in "iu":
        return f"whole numbers {np.iinfo(dtype).min}..{np.iinfo(dtype).max}"
    if dtype.kind in "fc":
        return f"-{np.finfo(dtype).max:g}..{np.finfo(dtype).max:g}, inf or nan"
    return f"{dtype} values"


def sniff(path: str) -> str:
    """'tiff' or 'pillow' from the first bytes, because extensions lie."""
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        raise CorruptImageError(f"{path}: empty file (0 bytes); copy or download it again")
    if head[:4] in TIFF_MAGIC:
        return "tiff"
    if head.startswith(PILLOW_MAGIC):
        return "pillow"
    raise CorruptImageError(f"{path}: not an image (starts with {head!r}); expected GeoTIFF, JPEG or PNG")
