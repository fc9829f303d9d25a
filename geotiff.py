"""geotiff.py — read GeoTIFFs without GDAL, decoding only the tiles a window touches.

Satellite scenes are GeoTIFFs of often billions of pixels, while a training crop is 512x512. A window (row, col,
height, width) is mapped to the tiles or strips it intersects, only their bytes are read and decoded (by
geotiff_decode.py, with tifffile and imagecodecs; no GDAL), and the pieces are pasted together: a crop costs a
few tiles, not the scene. The pixels are GDAL's, of the files GDAL writes (striped or tiled, pixel or band
interleave, BigTIFF, COG, the usual compressions and dtypes, the GDAL_NODATA tag).

    read_geotiff(path, window, bands)   (bands, height, width) in the file's dtype (1-bit: uint8, float16: float32)
    geotiff_info(path)                  GeoTiffInfo: size, bands, dtype, nodata, layout, codec
    nodata_pixel(nodata, dtype)         the nodata value as a pixel of dtype, None if none can be
    GeoTiff(path)                       an open file for many reads; counts the segments decoded
    sniff(path)                         'tiff' or 'pillow' from the first bytes, not the extension

What it cannot read it refuses with a DataError naming the file and the fix; damaged bytes raise its subclass
CorruptImageError, which data.py's skip_corrupt may skip. The reference (what is read, what is refused, GDAL's
JPEG pixels, speed): docs/geotiff.md.
"""

import logging
import math
from dataclasses import dataclass

import numpy as np
import tifffile

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
PILLOW_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")  # JPEG, PNG
GDAL_NODATA_TAG = 42113
GDAL_TYPES = {np.dtype(bool): np.dtype(np.uint8), np.dtype(np.float16): np.dtype(np.float32)}  # types GDAL lacks

# Settings, looked up on every read: assign geotiff.MAX_READ_BYTES etc. to change them.
# The most one read may return, in bytes; larger reads are refused before allocating (read windows).
MAX_READ_BYTES = 4 * 2**30
# The most one tile or strip may decode to, in bytes: a read touching it decodes all of it.
MAX_BLOCK_BYTES = 256 * 2**20
# Whose pixels YCbCr JPEG decodes to (docs/geotiff.md): "libjpeg-turbo" as GDAL built on it (Debian, Ubuntu,
# conda-forge); "libjpeg9" as GDAL built on IJG libjpeg 9 (the rasterio wheels), at ~3x the decoding time.
# Set it in every process that reads: forked loader workers inherit it, spawned ones import geotiff afresh.
JPEG_CHROMA_UPSAMPLING = "libjpeg-turbo"
# A large read decodes its blocks this many bytes at a time (slabs of block rows; see GeoTiff.read).
BATCH_BYTES = 8 * 2**20


# Why: tifffile parses the GDAL_NODATA tag itself on every open, and logs a raw exception ("ValueError: -9999
# is not castable to uint16") when the dtype cannot hold it: one line per sample in a training loop. This file
# parses the tag itself, says where it is unusable and what an out-of-range value means (see nodata_pixel).
logging.getLogger("tifffile").addFilter(lambda record: "parsing GDAL_NODATA tag raised" not in record.getMessage())


class DataError(ValueError):
    """A problem with the user's data or settings; the message names the file and the fix."""


class CorruptImageError(DataError):
    """The file is not an image or its bytes are damaged: what `skip_corrupt` may skip."""


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
    """An open GeoTIFF that decodes only the segments (tiles or strips) a read needs: it maps a window to the
    segments it intersects, has them decoded (geotiff_decode.BlockDecoder) and pastes the pieces together.
    For a COG the first image is full resolution; overviews follow it."""

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
        except BaseException as err:
            self.close()
            if isinstance(err, DataError) or not isinstance(err, Exception):
                raise
            # A damaged header can give tifffile attributes of any type (a tuple for a tile
            # width); whatever fails while interpreting the header means the same thing.
            raise CorruptImageError(f"{self.path}: unreadable TIFF header ({type(err).__name__}: {err}); "
                                    "the file is truncated or corrupt") from err

    @property
    def segments_decoded(self) -> int:
        """Segments decoded so far, reads of an uncompressed strip's rows included: a small window stays small."""
        return self._decoder.decoded

    def _inspect(self) -> GeoTiffInfo:
        """The header, read once: GeoTiffInfo, and what reads need, so that no read touches tifffile's
        lazily computed attributes (where a damaged header would fail with any exception)."""
        from geotiff_decode import BlockDecoder  # here, not at the top: it imports names of this module

        page = self._tif.pages[0]
        if page.imagedepth != 1 or page.dtype is None:
            raise DataError(f"{self.path}: unsupported TIFF layout (depth {page.imagedepth}, {page.bitspersample}-bit "
                            "samples); convert it, e.g. `gdal_translate -ot UInt16 in.tif out.tif`")
        block_size = (page.tilelength, page.tilewidth) if page.is_tiled else (page.rowsperstrip,)
        if min(page.imagelength, page.imagewidth, page.samplesperpixel, *block_size) < 1:
            raise CorruptImageError(f"{self.path}: the header gives an empty image, tile or strip "
                                    f"({page.imagelength}x{page.imagewidth}); the file is corrupt")
        if 324 not in page.tags and 273 not in page.tags:
            # tifffile drops a TileOffsets/StripOffsets tag whose values lie past the end of the file
            # (with a logged warning) and reads on; every block would then look empty. (Some writers put
            # the tiles' table in the strip tags; libtiff, GDAL and tifffile read it from there.)
            raise CorruptImageError(f"{self.path}: the {'tile' if page.is_tiled else 'strip'} offset table is "
                                    "missing or lies past the end of the file; the file is truncated or corrupt")
        nodata = nodata_text = page.tags.get(GDAL_NODATA_TAG)
        if nodata is not None:
            nodata_text = str(nodata.value).strip("\x00 ")
            try:
                nodata = float(nodata_text)
            except ValueError:
                raise DataError(f"{self.path}: GDAL_NODATA tag {nodata_text!r} is not a number; set it with "
                                "`gdal_edit.py -a_nodata <value> file.tif` or drop it with "
                                "`gdal_edit.py -unsetnodata file.tif`") from None
        info = GeoTiffInfo(
            path=self.path,
            height=page.imagelength,
            width=page.imagewidth,
            bands=page.samplesperpixel,
            # Native byte order; 1-bit samples as uint8 0/1 and float16 as float32, the types GDAL gives them.
            dtype=GDAL_TYPES.get(page.dtype.newbyteorder("="), page.dtype.newbyteorder("=")),
            nodata=nodata,
            tiled=page.is_tiled,
            tile_shape=(page.tilelength, page.tilewidth) if page.is_tiled
            else (min(page.rowsperstrip, page.imagelength), page.imagewidth),
            interleave="band" if page.planarconfig == 2 else "pixel",
            compression=getattr(page.compression, "name", str(page.compression)),
            bigtiff=self._tif.is_bigtiff,
        )
        # Segment rows, segment cols, segments across the image, segments per band plane.
        tile_rows, tile_cols = info.tile_shape
        across = math.ceil(info.width / tile_cols)
        self._grid = tile_rows, tile_cols, across, across * math.ceil(info.height / tile_rows)
        # It refuses what it cannot decode as GDAL does (no decoder, old-style JPEG, ...).
        self._decoder = BlockDecoder(self.path, self._tif, info, self._grid, nodata_text)
        return info

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
        out = self._allocate(len(bands), height, width)
        if not self._decoder.batch:
            self._read_blocks(window, bands, out)
            return out
        # A tall read goes in slabs of block rows of at most BATCH_BYTES decoded: their buffers stay
        # small (no fresh pages to fault in) and the pasting stays in cache; a 512x512 window is one slab.
        tile_rows, tile_cols = info.tile_shape
        planes = len(set(bands)) if info.interleave == "band" else 1
        block_row_bytes = ((col + width - 1) // tile_cols - col // tile_cols + 1) * planes * \
            tile_rows * tile_cols * self._decoder.samples * info.dtype.itemsize
        step = max(1, BATCH_BYTES // block_row_bytes) * tile_rows
        for top in range(row // tile_rows * tile_rows, row + height, step):
            y0, y1 = max(row, top), min(row + height, top + step)
            slab, rows = (y0, col, y1 - y0, width), out[:, y0 - row:y1 - row]
            if not self._read_blocks(slab, bands, rows, at_once=True):
                self._read_blocks(slab, bands, rows)
        return out

    def _read_blocks(self, window, bands, out, at_once=False) -> bool:
        """Paste the blocks `window` needs into `out`, decoded one at a time (the path for every layout and
        codec, which names the block in any error) or `at_once`, in a few calls (LZW and DEFLATE: faster);
        False where those must be decoded one at a time instead (an empty block, damaged bytes)."""
        indices = self._segments(window, bands)
        pieces = self._decoder.decode_many(indices, window) if at_once else self._decoder.decode_each(indices, window)
        if pieces is None:
            return False
        for block, planes, top, left in pieces:
            self._paste(block, planes, top, left, window, bands, out)
        return True

    def _paste(self, block: np.ndarray, planes: list[int], top: int, left: int, window, bands, out):
        """Paste the part in `window` of `block` (planes, rows, cols, samples), whose top-left pixel is (top, left)
        in the image, into `out`: one plane of all bands (planes = [0]), or of one band each (band interleave)."""
        row, col, height, width = window
        y0, y1 = max(row, top), min(row + height, top + block.shape[1])
        x0, x1 = max(col, left), min(col + width, left + block.shape[2])
        if y0 >= y1 or x0 >= x1:
            return
        piece = block[:, y0 - top:y1 - top, x0 - left:x1 - left]
        target = out[:, y0 - row:y1 - row, x0 - col:x1 - col]
        if self.info.interleave == "band":
            for k, band in enumerate(bands):
                if band in planes:
                    target[k] = piece[planes.index(band), ..., 0]
        else:
            pixels = piece[0] if bands == list(range(self.info.bands)) else piece[0][..., bands]
            target[...] = np.moveaxis(pixels, -1, 0)

    def _allocate(self, bands: int, height: int, width: int) -> np.ndarray:
        """The result array, refused up front when it would be larger than MAX_READ_BYTES."""
        dtype = self.info.dtype
        nbytes = bands * height * width * dtype.itemsize
        shape = f"{bands} band{'s' * (bands != 1)} x {height} x {width} {dtype}"
        if nbytes > MAX_READ_BYTES:
            raise DataError(f"{self.path}: this read would return {_size(nbytes)} ({shape}), more than "
                            f"geotiff.MAX_READ_BYTES = {_size(MAX_READ_BYTES)}; read a window instead, e.g. "
                            f"read_geotiff(path, window=(0, 0, 1024, 1024)), or raise geotiff.MAX_READ_BYTES")
        try:
            return np.empty((bands, height, width), dtype)
        except MemoryError:
            raise DataError(f"{self.path}: out of memory allocating {_size(nbytes)} ({shape}) for this read; "
                            "read a smaller window or free memory") from None

    def _segments(self, window, bands) -> list[int]:
        row, col, height, width = window
        tile_rows, tile_cols, across, per_plane = self._grid
        # With band interleave a band subset skips the other bands' planes; pixel-interleaved tiles hold all bands.
        planes = sorted(set(bands)) if self.info.interleave == "band" else [0]
        return [plane * per_plane + r * across + c
                for plane in planes
                for r in range(row // tile_rows, (row + height - 1) // tile_rows + 1)
                for c in range(col // tile_cols, (col + width - 1) // tile_cols + 1)]

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
    """(bands, height, width) in geotiff_info(path).dtype; window = (row, col, height, width) in pixels."""
    with GeoTiff(path) as tif:
        return tif.read(window, bands)


def geotiff_info(path) -> GeoTiffInfo:
    """Size, bands, dtype, nodata and layout of the file, from its header alone."""
    with GeoTiff(path) as tif:
        return tif.info


def nodata_pixel(nodata, dtype):
    """`nodata` (GeoTiffInfo.nodata) as a scalar of the pixel `dtype`, to compare pixels with or fill with; None
    without a nodata value, or when no pixel of `dtype` can equal it: a value outside the dtype's range (-9999 or
    70000 in uint16, 1e40 in float32), a fraction or NaN in an integer dtype. Such a tag marks no pixel, as in
    GDAL's nodata mask (it uses the nodata value only if it is in range for the band's type). Float dtypes round
    it to their precision, as GDAL compares float32 pixels with the float32 nodata: "0.1" matches 0.1f."""
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


def _size(nbytes: int) -> str:
    """A byte count for messages: '18.6 GiB', '256 MiB', '4 KiB'."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} bytes"


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
