"""geotiff.py — read GeoTIFFs without GDAL, decoding only the tiles a window touches.

Satellite scenes arrive as GeoTIFFs written by GDAL: multi-band, 8/16-bit or float, often
billions of pixels. This file reads them with tifffile (header and tags) and imagecodecs (the
codecs and TIFF predictors), and nothing else. GDAL is the reference: the tests compare with
pixels GDAL wrote or decoded (tests/fixtures/make_fixtures.sh).

Supported:

    layout       striped or tiled; pixel interleave (all bands in each tile) or band interleave
                 (one set of tiles per band); classic TIFF or BigTIFF; of a COG, the first,
                 full-resolution image (the overviews after it are ignored)
    compression  none, DEFLATE, LZW, ZSTD, LZMA, PACKBITS, JPEG (RGB or YCbCr, see below), LERC (also
                 LERC_DEFLATE, LERC_ZSTD); the horizontal (2) or floating-point (3) predictor
                 with LZW, DEFLATE, LZMA and ZSTD, the codecs libtiff applies it in (a Predictor
                 tag on other compressions is ignored, as libtiff and GDAL ignore it)
    dtypes       uint8, uint16, int16, float32, float64 (all checked against GDAL's pixels) and
                 any other sample type tifffile maps to numpy; either byte order, returned native
    nodata       the GDAL_NODATA tag, as GeoTiffInfo.nodata (None without one). Blocks with no
                 bytes (GDAL's SPARSE_OK tiles, byte count 0) read as nodata, or 0 without a tag.
                 A tag no pixel of the dtype can hold (-9999 in uint16, 300 in uint8) marks no
                 pixel, as in GDAL's masks, and an empty block in such a file is an error
    LERC NaN     pixels LERC's validity mask marks invalid read as NaN in float files, as in GDAL.
                 GDAL writes NaN into that mask only when a block holds one band (INTERLEAVE=BAND
                 or a single band); pixel-interleaved blocks store it as -3.4028235e+38, which
                 GDAL and this reader then return
    colour       the stored samples, with no colour conversion: CMYK and CIELab files give their
                 C, M, Y, K or L, a, b bands, as GDAL gives them when opened as `GTIFF_RAW:file.tif`
                 (plain GDAL converts both to RGBA); palette files give the indices

JPEG pixels are libjpeg-turbo's (imagecodecs'), identical to those of GDAL built on libjpeg-turbo
(Debian's and Ubuntu's packages, conda-forge's since 2023): 0 levels apart on tiled, striped and
COG files, windows and band subsets (Debian 12's GDAL 3.6). GDAL built on IJG libjpeg 9 (the
rasterio wheels on PyPI: rasterio 1.4, GDAL 3.10, libjpeg 9f) gives other pixels for YCbCr JPEG,
the usual encoding of aerial RGB: libjpeg-turbo upsamples the half-resolution Cb and Cr with a
triangle filter across 16x16 blocks, libjpeg 9 inside each block with a 16x16 inverse DCT, so the
two differ by up to ~70 levels where colours change sharply (mean ~3 at quality 75). RGB JPEG
decodes alike in both. To train on the pixels such a GDAL will serve, set
`geotiff.JPEG_CHROMA_UPSAMPLING = "libjpeg9"` before reading (in every process that reads: forked
data loader workers inherit it, spawned ones import geotiff afresh). YCbCr JPEG then decodes as
libjpeg 9 does, within 2 levels on every pixel of the files tried, quality 50 to 100 (only pure
noise at quality 100 left 4 values in 600,000 off by 3 or 4), in about three times the time (see
_decode_ycbcr_jpeg_as_libjpeg9).

Refused, with a DataError saying what to do instead (usually re-encoding with
`gdal_translate -co COMPRESS=DEFLATE -co TILED=YES in.tif out.tif`):

    - compressions imagecodecs has no decoder for (SGILOG, ThunderScan, NeXT, ...), YCbCr
      photometric without JPEG compression (GDAL converts those to RGB while reading), and
      old-style JPEG (compression 6, rare since 1995), whose decoding varies between readers
    - a read whose result is larger than MAX_READ_BYTES (4 GiB): read windows instead. The
      check comes before anything is allocated, so a header claiming 100000x100000 pixels
      fails at once, not after filling most of the memory
    - a tile or strip whose decoded size is larger than MAX_BLOCK_BYTES (256 MiB): every read
      touching it would decode all of it, so a 64x64 window of a 1 GiB single-strip file
      would cost 1 GiB. Uncompressed strips are exempt: a read takes only the rows it needs
      from them, at most MAX_BLOCK_BYTES of rows at a time
    - damage (CorruptImageError): an unreadable header, a block past the end of the file or at
      offset 0 (inside the header), bytes that do not decode, a JPEG block whose own header is
      larger than the tile, a LERC_DEFLATE/ZSTD block inflating past the block's size, and an
      offset table shorter than the tile grid. Of a pixel-interleaved striped file, though,
      the strips missing from the table read as empty blocks, because libtiff pads such a
      table with empty entries there and GDAL reads them so; it refuses all other layouts
    - a decode that runs out of memory is reported as that (a DataError), not as a corrupt file

Both limits are module constants, looked up on every read: assign `geotiff.MAX_READ_BYTES` or
`geotiff.MAX_BLOCK_BYTES` to change them.

    read_geotiff(path, window, bands)   (bands, height, width) in the file's dtype
    geotiff_info(path)                  GeoTiffInfo: size, bands, dtype, nodata, layout, codec
    nodata_pixel(nodata, dtype)         the nodata value as a pixel of dtype, None if none can be
    GeoTiff(path)                       an open file for many reads; counts the segments decoded
    sniff(path)                         'tiff' or 'pillow' from the first bytes, not the extension

Why windows: a 10000x10000 16-bit scene is 200 MB per band once decoded, while a training crop
is 512x512. A window (row, col, height, width) is mapped to the segments (tiles or strips) it
intersects, only their bytes are read and decoded, and the overlapping pieces are pasted
together, so a crop costs a few 256x256 tiles, not the scene. With band interleave a band
subset also skips every other band's tiles. Compressed strips gain less: a strip spans the width.

Speed: as fast as GDAL on the same reads (`python tools/bench.py gdal`, BENCHMARKS.md). Python
costs tens of microseconds per block, as much as decoding an 8 KiB strip, so LZW and DEFLATE
blocks are decoded many at a time: the runs of adjacent blocks are read with one os.pread each,
LZW is decoded by libtiff (bundled with imagecodecs, faster than imagecodecs' own LZW) in one
call, DEFLATE by libdeflate into one buffer whose predictor is then undone in one call. Other
codecs, and anything unusual (empty blocks, damage), go block by block through tifffile.

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
import struct
from dataclasses import dataclass

import imagecodecs
import numpy as np
import tifffile

TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
PILLOW_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")  # JPEG, PNG
GDAL_NODATA_TAG = 42113

# The most one read may return, in bytes; larger reads are refused before allocating (read windows).
MAX_READ_BYTES = 4 * 2**30
# The most one tile or strip may decode to, in bytes: a read touching it decodes all of it.
MAX_BLOCK_BYTES = 256 * 2**20
# Whose pixels YCbCr JPEG decodes to (see "JPEG pixels" above), looked up on every read:
# "libjpeg-turbo" as GDAL built on libjpeg-turbo (Debian, Ubuntu, conda-forge); "libjpeg9" as GDAL
# built on IJG libjpeg 9 (the rasterio wheels on PyPI), at about 3x the decoding time.
JPEG_CHROMA_UPSAMPLING = "libjpeg-turbo"
JPEG_CHROMA_CHOICES = ("libjpeg-turbo", "libjpeg9")

UNCOMPRESSED, OLD_JPEG, JPEG, LERC = 1, 6, 7, 34887
# libtiff undoes a Predictor only inside these codecs (LZW, Adobe Deflate, Deflate, LZMA, ZSTD); with
# any other compression GDAL ignores the tag and returns the stored samples, and so does this reader.
PREDICTOR_CODECS = {5, 8, 32946, 34925, 50000}
PHOTOMETRIC_YCBCR = 6
# Codecs whose blocks a read hands to libtiff all at once (see GeoTiff._read_in_one_libtiff_call): LZW.
# Not DEFLATE: libtiff stops inflating when a block is full, before zlib's checksum, so it would
# return damaged blocks as pixels, where imagecodecs (inflating to the end) reports them.
LIBTIFF_BATCH_CODECS = {5}
DEFLATE_CODECS = {8, 32946}  # Adobe Deflate, Deflate
# A large read decodes its blocks this many bytes at a time (slabs of block rows; see GeoTiff.read).
BATCH_BYTES = 8 * 2**20
# Blocks closer than this in the file are read with one system call, the bytes between them included.
COALESCE_GAP_BYTES = 16 * 2**10


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
    together. `segments_decoded` counts decodes (and reads of an uncompressed strip's
    rows), so tests can check a small window stays small. For a COG the first image is
    full resolution; overviews follow it.
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
        except DataError:
            self.close()
            raise
        except Exception as err:
            # A damaged header can give tifffile attributes of any type (a tuple for a tile
            # width); whatever fails while interpreting the header means the same thing.
            self.close()
            raise CorruptImageError(f"{self.path}: unreadable TIFF header ({type(err).__name__}: {err}); "
                                    "the file is truncated or corrupt") from err
        except BaseException:
            self.close()
            raise
        self._file_size = os.path.getsize(self.path)
        self._fd = self._tif.filehandle.fileno()  # for os.pread: a read at an offset, without a seek
        self.segments_decoded = 0

    def _inspect(self) -> GeoTiffInfo:
        """The header, read once: GeoTiffInfo, and what reads need, so that no read touches tifffile's
        lazily computed attributes (where a damaged header would fail with any exception)."""
        page = self._page = self._tif.pages[0]
        if page.imagedepth != 1 or page.dtype is None:
            raise DataError(f"{self.path}: unsupported TIFF layout (depth {page.imagedepth}, {page.bitspersample}-bit "
                            "samples); convert it, e.g. `gdal_translate -ot UInt16 in.tif out.tif`")
        block_size = (page.tilelength, page.tilewidth) if page.is_tiled else (page.rowsperstrip,)
        if min(page.imagelength, page.imagewidth, page.samplesperpixel, *block_size) < 1:
            raise CorruptImageError(f"{self.path}: the header gives an empty image, tile or strip "
                                    f"({page.imagelength}x{page.imagewidth}); the file is corrupt")
        if (324 if page.is_tiled else 273) not in page.tags:
            # tifffile drops a TileOffsets/StripOffsets tag whose values lie past the end of the file
            # (with a logged warning) and reads on; every block would then look empty.
            raise CorruptImageError(f"{self.path}: the {'tile' if page.is_tiled else 'strip'} offset table is "
                                    "missing or lies past the end of the file; the file is truncated or corrupt")
        compression = getattr(page.compression, "name", str(page.compression))
        if page.compression == OLD_JPEG:
            # Old-style JPEG (TIFF 6.0's compression 6) has no single layout: its streams lean on
            # JPEGInterchangeFormat, JPEGQTables, JPEGProc and other tags, and libtiff rebuilds each
            # strip's JPEG header from them with heuristics of its own. tifffile's reading of such
            # files measurably differs from GDAL's (up to 44 levels) or fails on files GDAL reads,
            # so they are refused rather than read differently from what a model is later served.
            raise DataError(f"{self.path}: old-style JPEG compression (TIFF compression 6) is not supported: "
                            "its pixels would not match GDAL's. Convert it with GDAL: "
                            "`gdal_translate -co COMPRESS=JPEG -co TILED=YES in.tif out.tif` (or "
                            "`-co COMPRESS=DEFLATE` for no further loss)")
        if page.photometric == PHOTOMETRIC_YCBCR and page.compression != JPEG:
            # GDAL converts such files to RGB while reading; tifffile would return the raw Y, Cb, Cr.
            raise DataError(f"{self.path}: YCbCr colour without JPEG compression (here {compression}) is not "
                            "supported; convert it to RGB with GDAL: "
                            "`gdal_translate -co COMPRESS=DEFLATE -co TILED=YES in.tif out.tif`")
        if page.predictor != 1 and page.compression not in PREDICTOR_CODECS:
            page.predictor = 1  # before tifffile builds its decoder (on first use), which would apply it
        try:
            page.decode(None, 0)  # tifffile hands out a decoder that raises when the codec is missing
        except Exception as err:
            if not isinstance(err, (ValueError, NotImplementedError)):  # what tifffile raises for what it lacks
                raise CorruptImageError(f"{self.path}: unreadable TIFF header ({type(err).__name__}: {err}); "
                                        "the file is truncated or corrupt") from err
            if "requires the 'imagecodecs' package" in str(err):  # tifffile's words for a codec imagecodecs lacks
                advice = "Install the full codec set with `pip install -U imagecodecs`, or re-encode with GDAL"
            else:  # no decoder exists for it, so no package will help
                advice = "This reader does not support it; re-encode the file with GDAL"
            raise DataError(
                f"{self.path}: compression {compression} with predictor {page.predictor} cannot be decoded "
                f"({err}). {advice}: `gdal_translate -co COMPRESS=DEFLATE -co TILED=YES in.tif out.tif`") from err
        self._codec = int(page.compression)
        # As tifffile parsed them: converted with int() where used, not here, because a strip table can
        # hold 100000 entries, and converting them all would cost an open more than a window's read.
        self._offsets, self._bytecounts = page.dataoffsets, page.databytecounts
        self._samples = page.shaped[-1]  # samples in a block's pixel: all bands, or one with band interleave
        self._jpegtables = page.jpegtables
        # YCbCr JPEG with subsampled chroma, the one encoding whose pixels depend on the libjpeg.
        self._ycbcr_subsampling = tuple(page.tags.valueof(530, (2, 2)))  # YCbCrSubSampling (h, v)
        self._subsampled_ycbcr = (page.compression == JPEG and page.photometric == PHOTOMETRIC_YCBCR
                                  and self._ycbcr_subsampling != (1, 1))
        self._lerc_wrapper = page.tags.valueof(50674, (4, 0))[1]  # LercParameters: 0 none, 1 DEFLATE, 2 ZSTD
        # Uncompressed strips of whole-byte samples are read row by row (see _block_rows).
        self._raw_strip_dtype = None
        if (not page.is_tiled and page.compression == UNCOMPRESSED and page.sampleformat != 5  # complex integers
                and page.bitspersample in (8, 16, 32, 64, 128)):
            self._raw_strip_dtype = np.dtype(self._tif.byteorder + page.dtype.char)
        # Whole-byte integer or float samples of LZW and DEFLATE are decoded many blocks at a time
        # (see _read_blocks_at_once); DEFLATE only in native byte order, where its predictor is undone in place.
        self._batch = None
        if page.sampleformat in (1, 2, 3) and page.bitspersample in (8, 16, 32, 64) and page.dtype.kind in "uif":
            if self._codec in LIBTIFF_BATCH_CODECS:
                self._batch = "libtiff"
            elif self._codec in DEFLATE_CODECS and page.dtype.newbyteorder(self._tif.byteorder).isnative:
                self._batch = "deflate"
        if not hasattr(os, "preadv"):  # Windows: the batched path reads with it
            self._batch = None
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
            compression=compression,
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
        out = self._allocate(len(bands), height, width)
        if not self._batch:
            self._read_block_by_block(window, bands, out)
            return out
        # A tall read goes in slabs of block rows of at most BATCH_BYTES decoded: their buffers stay
        # small (no fresh pages to fault in) and the pasting stays in cache; a 512x512 window is one slab.
        tile_rows, tile_cols = info.tile_shape
        planes = len(set(bands)) if info.interleave == "band" else 1
        block_row_bytes = ((col + width - 1) // tile_cols - col // tile_cols + 1) * planes * \
            tile_rows * tile_cols * self._samples * info.dtype.itemsize
        step = max(1, BATCH_BYTES // block_row_bytes) * tile_rows
        for top in range(row // tile_rows * tile_rows, row + height, step):
            y0, y1 = max(row, top), min(row + height, top + step)
            slab, rows = (y0, col, y1 - y0, width), out[:, y0 - row:y1 - row]
            if not self._read_blocks_at_once(slab, bands, rows):
                self._read_block_by_block(slab, bands, rows)
        return out

    def _read_block_by_block(self, window, bands, out):
        """Read `window` into `out` one tile or strip at a time, through tifffile's decoders: the path
        for every layout and codec, and the one that names the block in any error."""
        info = self.info
        row, col, height, width = window
        tile_rows, tile_cols, across, per_plane = self._grid()
        all_bands = bands == list(range(info.bands))
        for index in self._segments(window, bands):
            plane, position = divmod(index, per_plane)
            top, left = position // across * tile_rows, position % across * tile_cols
            # The overlap of this tile and the window, in image coordinates.
            y0, y1 = max(row, top), min(row + height, top + tile_rows, info.height)
            x0, x1 = max(col, left), min(col + width, left + tile_cols, info.width)
            for r0, r1 in self._row_chunks(y0, y1):
                rows = self._block_rows(index, r0 - top, r1 - top)  # (r1 - r0, cols, samples)
                if rows.shape[0] != r1 - r0 or rows.shape[1] < x1 - left:
                    raise CorruptImageError(f"{self.path}: segment {index} decoded to too few rows or columns for "
                                            f"its place in the image; the file is corrupt")
                piece = rows[:, x0 - left:x1 - left]
                target = out[:, r0 - row:r1 - row, x0 - col:x1 - col]
                if info.interleave == "band":
                    for k, band in enumerate(bands):
                        if band == plane:
                            target[k] = piece[..., 0]
                else:
                    target[...] = np.moveaxis(piece if all_bands else piece[..., bands], -1, 0)

    def _read_blocks_at_once(self, window, bands, out) -> bool:
        """Read and decode every block the window needs in as few calls as possible and paste the
        window into `out`; False where the block-by-block path must read it (and overwrite `out`).

        Why: per block, tifffile's decode path costs tens of microseconds of Python, as much as
        decoding a whole 8 KiB strip (GDAL writes DEFLATE strips of one such row), and imagecodecs'
        LZW decoder is slower than libtiff's. So the blocks' bytes are read with one os.pread per run
        of blocks lying next to each other in the file, then
          - LZW: wrapped in a small in-memory TIFF whose image is just these blocks (as its strips)
            and decoded by libtiff (bundled with imagecodecs) in one call;
          - DEFLATE: each block inflated by libdeflate straight into one buffer, the predictor then
            undone for all blocks in one call.
        Anything unusual (an empty or missing block, bytes that fail to decode) returns False, so
        that the block-by-block path reads the window and reports the exact block."""
        info = self.info
        row, col, height, width = window
        tile_rows, tile_cols, across, per_plane = self._grid()
        planes = sorted(set(bands)) if info.interleave == "band" else [0]
        first_row, last_row = row // tile_rows, (row + height - 1) // tile_rows
        first_col, last_col = col // tile_cols, (col + width - 1) // tile_cols
        indices = [plane * per_plane + r * across + c for plane in planes
                   for r in range(first_row, last_row + 1) for c in range(first_col, last_col + 1)]
        if indices[-1] >= min(len(self._offsets), len(self._bytecounts)):
            return False  # missing blocks: the per-block path reads or refuses them
        offsets = {i: self._table_entry(self._offsets, i) for i in indices}
        counts = {i: self._table_entry(self._bytecounts, i) for i in indices}
        if not all(counts.values()):
            return False  # empty (sparse) blocks: the per-block path fills them
        block_bytes = tile_rows * tile_cols * self._samples * info.dtype.itemsize
        for index in indices:
            self._check_block_bytes(index, offsets[index], counts[index])
            self._check_block_size(index, max(block_bytes, counts[index]))
        if sum(counts.values()) > 2 * len(indices) * block_bytes + 2**20:
            # Blocks twice as large compressed as decoded (LZW grows noise by up to ~1.5x, DEFLATE by
            # a few bytes): a damaged byte count table, most likely. Read one at a time, so that memory
            # stays bounded by one block, not by all of them at once.
            return False
        # The runs of blocks to read: blocks in file order, a run ending at a gap of more than
        # COALESCE_GAP_BYTES (reading a small gap costs less than another system call).
        runs, place = [], {}  # [start, stop] in the file; block -> (run, offset in the run)
        for index in sorted(indices, key=offsets.get):
            start, stop = offsets[index], offsets[index] + counts[index]
            if runs and 0 <= start - runs[-1][1] <= COALESCE_GAP_BYTES:
                runs[-1][1] = max(runs[-1][1], stop)
            else:
                runs.append([start, stop])
            place[index] = (len(runs) - 1, start - runs[-1][0])
        # All runs go into one buffer, after 8 bytes left for a TIFF header (used by the libtiff path).
        run_at = np.cumsum([8] + [stop - start for start, stop in runs]).tolist()
        block_at = [run_at[place[i][0]] + place[i][1] for i in indices]  # where each block's bytes land
        top, left = first_row * tile_rows, first_col * tile_cols
        # Tiles are whole at the image's edges too; the last strip holds only the image's last rows.
        bottom = (last_row + 1) * tile_rows if info.tiled else min((last_row + 1) * tile_rows, info.height)
        mosaic_height, mosaic_width = bottom - top, (last_col - first_col + 1) * tile_cols
        head, ifd_at, ifd = b"", run_at[-1], b""
        if self._batch == "libtiff":
            if run_at[-1] + 4096 + 8 * len(indices) >= 2**32:
                return False  # more than a classic TIFF's 32-bit offsets can point to
            # Tiles go one above the other, as the strips of an image one tile wide: a tile's rows are
            # those of such a strip, predictor included, and libtiff decodes strips straight into its
            # result (tiles it decodes into a buffer first, then copies).
            stacked = mosaic_height * (last_col - first_col + 1) if info.tiled else mosaic_height
            head, ifd_at, ifd = self._mini_tiff(run_at[-1], stacked, tile_cols, len(planes),
                                                block_at, [counts[i] for i in indices])
        buffer = np.empty(ifd_at + len(ifd), np.uint8)
        view = memoryview(buffer)
        for (start, stop), at in zip(runs, run_at):  # straight into the buffer: no bytes objects to join
            if os.preadv(self._fd, [view[at:at + stop - start]], start) != stop - start:
                return False  # the file changed under us: the per-block path says what is wrong
        view[:len(head)], view[run_at[-1]:ifd_at], view[ifd_at:] = head, bytes(ifd_at - run_at[-1]), ifd
        try:
            if self._batch == "libtiff":
                blocks = imagecodecs.tiff_decode(buffer)
            else:
                blocks = self._inflate(indices, view, block_at, [counts[i] for i in indices])
                if blocks is None:
                    return False
            # Either way the blocks' pixels follow each other: plane by plane, then block by block.
            if not info.tiled:  # the strips' rows, one after another: the rows of the image
                self._paste(blocks.reshape(len(planes), mosaic_height, info.width, -1), top, 0, window, bands, out)
            else:
                blocks = blocks.reshape(len(planes), last_row - first_row + 1, last_col - first_col + 1,
                                        tile_rows, tile_cols, -1)
                for r in range(blocks.shape[1]):
                    for c in range(blocks.shape[2]):
                        self._paste(blocks[:, r, c], top + r * tile_rows, left + c * tile_cols, window, bands, out)
        except MemoryError:
            raise DataError(f"{self.path}: out of memory decoding a {mosaic_height}x{mosaic_width} read; free "
                            "memory (fewer loader workers) or read smaller windows") from None
        except Exception:
            return False  # damaged bytes: the per-block path finds the block and says which it is
        self.segments_decoded += len(indices)
        return True

    def _inflate(self, indices, data: memoryview, block_at: list[int], nbytes: list[int]) -> np.ndarray | None:
        """DEFLATE blocks inflated into one array, predictor undone: (blocks, rows, cols, samples) for
        tiles, (rows of all strips, width, samples) for strips; None if one inflates to too few bytes."""
        info, samples = self.info, self._samples
        tile_rows, tile_cols = info.tile_shape
        row_bytes = tile_cols * samples * info.dtype.itemsize
        sizes = [tile_rows * row_bytes] * len(indices)
        if not info.tiled:  # the image's last strip may be short
            per_plane, short = self._grid()[3], (info.height - (self._grid()[3] - 1) * tile_rows) * row_bytes
            sizes = [short if index % per_plane == per_plane - 1 else size for index, size in zip(indices, sizes)]
        buffer = np.empty(sum(sizes), np.uint8)
        position = 0
        for at, count, size in zip(block_at, nbytes, sizes):
            # libdeflate checks zlib's checksum, and refuses a stream that inflates past `size`.
            inflated = imagecodecs.deflate_decode(data[at:at + count], out=buffer[position:position + size])
            if len(inflated) != size:
                return None
            position += size
        pixels = buffer.view(info.dtype)
        pixels = pixels.reshape(len(indices), tile_rows, tile_cols, samples) if info.tiled \
            else pixels.reshape(-1, info.width, samples)
        # The predictor works along each row of each block (axis -2: columns), restarting at its left edge.
        if self._page.predictor == 2:
            imagecodecs.delta_decode(pixels, axis=-2, out=pixels)
        elif self._page.predictor == 3:
            pixels = imagecodecs.floatpred_decode(pixels, axis=-2)  # it cannot work in place
        return pixels

    def _paste(self, block: np.ndarray, top: int, left: int, window, bands, out):
        """Paste the part of `block` (planes, rows, cols, samples), whose top-left pixel is (top, left)
        in the image, that lies in `window` into `out`: for pixel interleave one plane of all bands,
        for band interleave one plane per band in sorted(set(bands))."""
        row, col, height, width = window
        y0, y1 = max(row, top), min(row + height, top + block.shape[1])
        x0, x1 = max(col, left), min(col + width, left + block.shape[2])
        if y0 >= y1 or x0 >= x1:
            return
        piece = block[:, y0 - top:y1 - top, x0 - left:x1 - left]
        target = out[:, y0 - row:y1 - row, x0 - col:x1 - col]
        if self.info.interleave == "band":
            planes = sorted(set(bands))
            for k, band in enumerate(bands):
                target[k] = piece[planes.index(band), ..., 0]
        else:
            target[...] = np.moveaxis(piece[0] if bands == list(range(self.info.bands)) else piece[0][..., bands], -1, 0)

    def _mini_tiff(self, data_end: int, height: int, width: int, planes: int,
                   block_offsets: list[int], block_counts: list[int]) -> tuple[bytes, int, bytes]:
        """The rest of a TIFF in memory of these blocks, whose bytes lie from offset 8 to `data_end`:
        (its 8-byte header, where its IFD starts, the IFD), the IFD giving the file's own codec,
        predictor and sample type, and the blocks as the strips of a height x width image."""
        info, page = self.info, self._page
        order = self._tif.byteorder  # libtiff swaps the decoded samples of a big-endian file to native
        samples = planes if info.interleave == "band" else self._samples
        short, long_ = (3, "H"), (4, "I")
        tags = [(256, long_, [width]), (257, long_, [height]), (258, short, [page.bitspersample] * samples),
                (259, short, [self._codec]), (262, short, [1]),  # photometric: min-is-black, plain samples
                (277, short, [samples]), (284, short, [2 if info.interleave == "band" else 1]),
                (317, short, [page.predictor]), (339, short, [page.sampleformat] * samples)]
        if samples > 1:
            tags.append((338, short, [0] * (samples - 1)))  # extra samples of no particular meaning
        tags += [(273, long_, block_offsets), (278, long_, [info.tile_shape[0]]), (279, long_, block_counts)]
        tags.sort()
        ifd_at = data_end + (data_end & 1)  # an IFD starts on a word boundary
        arrays_at = ifd_at + 2 + 12 * len(tags) + 4
        entries, arrays = [], []
        for tag, (kind, code), values in tags:
            packed = np.asarray(values, order + code).tobytes()
            if len(packed) <= 4:  # fits in the entry itself
                entries.append(struct.pack(order + "HHI", tag, kind, len(values)) + packed.ljust(4, b"\0"))
            else:
                entries.append(struct.pack(order + "HHII", tag, kind, len(values), arrays_at + sum(map(len, arrays))))
                arrays.append(packed)
        head = (b"II*\0" if order == "<" else b"MM\0*") + struct.pack(order + "I", ifd_at)
        return head, ifd_at, b"".join([struct.pack(order + "H", len(tags)), *entries, b"\0\0\0\0", *arrays])

    def _row_chunks(self, y0: int, y1: int) -> list[tuple[int, int]]:
        """Image rows y0..y1-1 of one segment, in the pieces to read them in: all at once, except
        from uncompressed strips, read a chunk of at most MAX_BLOCK_BYTES (and BATCH_BYTES) of rows at a time."""
        raw_dtype = self._raw_strip_dtype
        if raw_dtype is None:
            return [(y0, y1)]
        step = max(1, min(MAX_BLOCK_BYTES, BATCH_BYTES) // self._row_bytes(raw_dtype))
        return [(r, min(r + step, y1)) for r in range(y0, y1, step)]

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

    def _block_rows(self, index: int, first: int, last: int) -> np.ndarray:
        """Rows first..last-1 of segment `index` (counted from its top), as (rows, cols, samples)."""
        info, samples = self.info, self._samples
        kind = "tile" if info.tiled else "strip"
        offsets, counts = self._offsets, self._bytecounts
        if index >= len(offsets) or index >= len(counts):
            # libtiff pads a short offset table with empty entries for pixel-interleaved strips and
            # GDAL reads those as empty; of tiled or band-interleaved files GDAL refuses the block.
            if info.tiled or info.interleave == "band":
                planes = info.bands if info.interleave == "band" else 1
                raise CorruptImageError(f"{self.path}: {kind} {index} is missing: the file's offset table lists "
                                        f"{min(len(offsets), len(counts))} {kind}s of {planes * self._grid()[3]}; "
                                        "the file is truncated or corrupt")
            offset, nbytes = 0, 0
        else:
            offset, nbytes = self._table_entry(offsets, index), self._table_entry(counts, index)
        if nbytes == 0:
            # GDAL's SPARSE_OK writes all-nodata blocks as no bytes at all. A broadcast view: filling
            # an empty block costs no memory, whatever size a (damaged) header gives its tiles.
            fill = np.asarray(self._sparse_fill(index), info.dtype)
            return np.broadcast_to(fill, (last - first, info.tile_shape[1], samples))
        self._check_block_bytes(index, offset, nbytes)
        fh = self._tif.filehandle
        raw_dtype = self._raw_strip_dtype
        if raw_dtype is not None:
            # An uncompressed strip is rows stored one after another: read only the rows wanted,
            # so a window of a single-strip file costs its own rows, not the whole file.
            row_bytes = self._row_bytes(raw_dtype)
            start, stop = first * row_bytes, last * row_bytes
            if stop > nbytes:
                raise CorruptImageError(f"{self.path}: strip {index} holds {nbytes} bytes, too few for row {last - 1} "
                                        f"of it ({row_bytes} bytes a row); the file is corrupt")
            if stop - start > MAX_BLOCK_BYTES:  # only a single row can be (read() asks for chunks)
                raise DataError(f"{self.path}: one row of strip {index} is {_size(row_bytes)} (all bands), more "
                                f"than geotiff.MAX_BLOCK_BYTES = {_size(MAX_BLOCK_BYTES)}; re-tile the file with "
                                "`gdal_translate -co TILED=YES -co COMPRESS=DEFLATE in.tif out.tif`, or raise "
                                "geotiff.MAX_BLOCK_BYTES")
            fh.seek(offset + start)
            data = fh.read(stop - start)
            self.segments_decoded += 1
            rows = np.frombuffer(data, raw_dtype).reshape(last - first, info.width, samples)
            return rows.astype(info.dtype, copy=False)  # native byte order (a copy only for the other one)
        block_rows = min(info.tile_shape[0], info.height - self._block_top(index)) if not info.tiled \
            else info.tile_shape[0]
        decoded_bytes = block_rows * info.tile_shape[1] * samples * info.dtype.itemsize
        self._check_block_size(index, max(decoded_bytes, nbytes))
        fh.seek(offset)
        data = fh.read(nbytes)
        try:
            if self._codec == LERC:
                block = self._decode_lerc(data, (block_rows, info.tile_shape[1], samples))
            else:
                if self._codec == JPEG:
                    # libjpeg allocates what the JPEG header says, whatever the TIFF header says:
                    # 65000x65000 in a damaged 16x16 tile would be 12 GB.
                    frame = _jpeg_frame_size(data)
                    if frame is not None and (frame[0] > info.tile_shape[0] or frame[1] > info.tile_shape[1]):
                        raise CorruptImageError(f"{self.path}: {kind} {index} is a {frame[0]}x{frame[1]} JPEG, larger "
                                                f"than the {info.tile_shape[0]}x{info.tile_shape[1]} {kind}s of the "
                                                "file; the file is corrupt")
                if self._subsampled_ycbcr and _jpeg_chroma_upsampling() == "libjpeg9":
                    if self._ycbcr_subsampling != (2, 2):
                        raise DataError(f"{self.path}: YCbCr subsampling {self._ycbcr_subsampling} is not handled "
                                        "by geotiff.JPEG_CHROMA_UPSAMPLING = 'libjpeg9', only (2, 2); read it with "
                                        "'libjpeg-turbo'")
                    block = _decode_ycbcr_jpeg_as_libjpeg9(self.path, data, self._jpegtables)
                    if block.shape != (block_rows, info.tile_shape[1], 3):
                        raise CorruptImageError(f"{self.path}: {kind} {index} is a {block.shape[0]}x{block.shape[1]} "
                                                f"JPEG in {block_rows}x{info.tile_shape[1]} {kind}s; the file is corrupt")
                elif self._codec == JPEG and samples == 1 and info.bands > 1:
                    # Band-interleaved JPEG: each plane is a one-component (grey) JPEG; tifffile asks libjpeg
                    # for the file's RGB or YCbCr colour space and fails ("Bogus JPEG colorspace").
                    block = imagecodecs.jpeg8_decode(data, tables=self._jpegtables)[..., None]
                else:
                    block = self._page.decode(data, index, jpegtables=self._jpegtables)[0][0]
        except DataError:  # CorruptImageError, or a JPEG stream the libjpeg 9 path does not handle
            raise
        except MemoryError:
            raise DataError(f"{self.path}: out of memory decoding {kind} {index} ({_size(decoded_bytes)}); free "
                            "memory (fewer loader workers) or read smaller windows") from None
        except Exception as err:
            raise CorruptImageError(f"{self.path}: segment {index} failed to decode "
                                    f"({type(err).__name__}: {err}); the file is corrupt") from err
        self.segments_decoded += 1
        return block[first:last]

    def _table_entry(self, table, index: int) -> int:
        """An entry of the offset or byte count table, as an int; a damaged header may give any number."""
        try:
            return int(table[index])
        except (TypeError, ValueError, OverflowError) as err:
            raise CorruptImageError(f"{self.path}: entry {index} of the block table is {table[index]!r}, not a "
                                    "byte position; the file is corrupt") from err

    def _check_block_bytes(self, index: int, offset: int, nbytes: int):
        """Refuse a block whose bytes lie inside the header or past the end of the file."""
        if offset == 0:
            kind = "tile" if self.info.tiled else "strip"
            raise CorruptImageError(f"{self.path}: {kind} {index} has {nbytes} bytes at offset 0, inside the "
                                    "TIFF header; the file is corrupt")
        if offset + nbytes > self._file_size:
            raise CorruptImageError(f"{self.path}: truncated: segment {index} needs bytes up to {offset + nbytes} "
                                    f"but the file has {self._file_size}; copy or download it again")

    def _check_block_size(self, index: int, nbytes: int):
        """Refuse a tile or strip that costs more than MAX_BLOCK_BYTES to decode."""
        if nbytes > MAX_BLOCK_BYTES:
            kind = "tile" if self.info.tiled else "strip"
            rows, cols = self.info.tile_shape
            raise DataError(f"{self.path}: {kind} {index} ({rows}x{cols} pixels) is too big to read: decoding it "
                            f"takes {_size(nbytes)}, more than geotiff.MAX_BLOCK_BYTES = {_size(MAX_BLOCK_BYTES)}, "
                            "for any window that touches it. Re-tile the file with "
                            "`gdal_translate -co TILED=YES -co COMPRESS=DEFLATE in.tif out.tif`, or raise "
                            "geotiff.MAX_BLOCK_BYTES")

    def _block_top(self, index: int) -> int:
        """First image row of segment `index`."""
        tile_rows, _, across, per_plane = self._grid()
        return index % per_plane // across * tile_rows

    def _row_bytes(self, raw_dtype: np.dtype) -> int:
        return self.info.width * self._samples * raw_dtype.itemsize

    def _decode_lerc(self, data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
        """A LERC block with its invalid pixels as NaN (floats), as GDAL reads them.

        tifffile's LERC path drops LERC's validity mask, leaving 0.0 where GDAL has NaN.
        The output array has the block's size from the header, so a blob claiming more
        pixels is an error, not an allocation."""
        rows, cols, samples = shape
        out = np.empty((rows, cols) if samples == 1 else shape, self.info.dtype)
        wrapper = self._lerc_wrapper
        if wrapper in (1, 2):
            # Unwrapped by hand, into at most what the block can take (values, a validity mask per
            # sample, headers), because imagecodecs would inflate a damaged stream without bound.
            limit = out.nbytes + out.size + 65536
            data = (imagecodecs.zlib_decode if wrapper == 1 else imagecodecs.zstd_decode)(data, out=limit)
        values, valid = imagecodecs.lerc_decode(data, masks=True, out=out)
        if valid is not None and self.info.dtype.kind in "fc":
            values[~valid.astype(bool)] = np.nan  # a (rows, cols) mask covers every sample of a pixel
        return values.reshape(shape)

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


def _size(nbytes: int) -> str:
    """A byte count for messages: '18.6 GiB', '256 MiB', '4 KiB'."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} bytes"


def _jpeg_frame_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG stream's frame header (SOFn marker), None if there is none."""
    position = 2  # after the start-of-image marker
    while position + 9 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # frame headers (not DHT, JPG, DAC)
            return int.from_bytes(data[position + 5:position + 7], "big"), int.from_bytes(data[position + 7:position + 9], "big")
        if marker == 0xDA:  # start of scan: the frame header comes before it or not at all
            return None
        position += 2 + int.from_bytes(data[position + 2:position + 4], "big")
    return None


def _jpeg_chroma_upsampling() -> str:
    if JPEG_CHROMA_UPSAMPLING not in JPEG_CHROMA_CHOICES:
        raise DataError(f"geotiff.JPEG_CHROMA_UPSAMPLING is {JPEG_CHROMA_UPSAMPLING!r}; set it to one of "
                        f"{', '.join(map(repr, JPEG_CHROMA_CHOICES))}")
    return JPEG_CHROMA_UPSAMPLING


def _dct_basis(samples: int) -> np.ndarray:
    """(samples, 8): the 8 JPEG cosines sampled at `samples` points across a block, scaled so that
    8 points give the orthonormal DCT JPEG uses and 16 points keep each coefficient's amplitude."""
    position = np.arange(samples)[:, None]
    frequency = np.arange(8)[None, :]
    scale = np.where(frequency == 0, np.sqrt(1 / 8), np.sqrt(2 / 8))
    return scale * np.cos((2 * position + 1) * frequency * np.pi / (2 * samples))


DCT8, DCT16 = _dct_basis(8), _dct_basis(16)

# libjpeg's YCbCr->RGB factors in 16-bit fixed point (jdcolor.c's FIX()).
RED_FROM_CR, GREEN_FROM_CB, GREEN_FROM_CR, BLUE_FROM_CB = (int(f * 65536 + 0.5) * sign for f, sign in
                                                           ((1.402, 1), (0.34414, -1), (0.71414, -1), (1.772, 1)))
# The order of a block's 64 values in a DQT segment: entry k is natural (row-major) position ZIGZAG[k].
ZIGZAG = np.array([0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20,
                   13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59, 52,
                   45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63])


def _jpeg_segments(data: bytes):
    """(marker, position, length) of each marker segment of a JPEG stream up to its start of scan."""
    position = 2  # after the start-of-image marker
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        length = int.from_bytes(data[position + 2:position + 4], "big")
        yield marker, position, length
        if marker == 0xDA:
            return
        position += 2 + length


def _jpeg_quantization_tables(data: bytes, tables: dict) -> dict:
    """Add the DQT tables of `data` to `tables` (id -> 8x8 steps in natural order)."""
    for marker, position, length in _jpeg_segments(data):
        if marker != 0xDB:
            continue
        at, end = position + 4, position + 2 + length
        while at < end:
            precision, table_id = data[at] >> 4, data[at] & 15
            size = 128 if precision else 64
            steps = np.frombuffer(data[at + 1:at + 1 + size], ">u2" if precision else "u1")
            natural = np.empty(64, np.float64)
            natural[ZIGZAG[:len(steps)]] = steps
            tables[table_id] = natural.reshape(8, 8)
            at += 1 + size
    return tables


def _decode_ycbcr_jpeg_as_libjpeg9(path: str, data: bytes, jpegtables: bytes | None) -> np.ndarray:
    """A YCbCr JPEG block with 2x2-subsampled chroma, as (rows, cols, 3) RGB the way IJG libjpeg 9 decodes it.

    libjpeg-turbo upsamples the half-resolution Cb and Cr with a triangle filter; libjpeg 9 instead
    takes each 8x8 block of chroma coefficients through a 16x16 inverse DCT (the same 8 cosines,
    sampled twice as densely), so it never blends neighbouring blocks. imagecodecs offers neither the
    coefficients nor that transform, hence three steps:

    1. Rewrite the frame header so libjpeg-turbo decodes the same entropy-coded data without
       upsampling. An MCU (16x16 pixels) holds 4 luma blocks, then Cb, then Cr. Declared with 4x1
       luma sampling instead of 2x2 (an MCU 32 wide, 8 tall), the same blocks are read in the same
       order with the same DC predictions, and 4x1 chroma upsampling is plain repetition: every 4th
       column is the chroma as its 8x8 inverse DCT gave it. The luma blocks only need unshuffling.
    2. Recover the chroma coefficients with a forward DCT, rounded to multiples of the quantisation
       steps (as they were stored), which undoes the rounding to whole levels.
    3. Do the 16x16 inverse DCT and libjpeg's fixed-point YCbCr->RGB conversion here.

    Measured against libjpeg 9f: up to quality 95, 1 value in 1000 is 1 or 2 levels off (float
    transforms here, fixed-point ones there). At quality 100 the quantisation steps are 1, so step 2
    cannot undo the rounding: 1 value in 6 is 1 or 2 off, and where pure noise drove the chroma past
    0..255 a few values in a million are 3 or 4 off."""
    quantization = _jpeg_quantization_tables(jpegtables, {}) if jpegtables else {}
    _jpeg_quantization_tables(data, quantization)
    stream = bytearray(data)
    frame = None
    for marker, position, length in _jpeg_segments(data):
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            frame = marker, position
            break
    if frame is None or frame[0] not in (0xC0, 0xC1) or data[frame[1] + 4] != 8:  # 8-bit sequential Huffman
        raise DataError(f"{path}: a JPEG block is not 8-bit baseline sequential JPEG (frame marker "
                        f"{'none' if frame is None else hex(frame[0])}), which geotiff.JPEG_CHROMA_UPSAMPLING = "
                        "'libjpeg9' does not handle; read it with 'libjpeg-turbo' or re-encode the file with "
                        "`gdal_translate -co COMPRESS=JPEG -co PHOTOMETRIC=YCBCR in.tif out.tif`")
    at = frame[1]
    rows, cols = struct.unpack_from(">HH", stream, at + 5)
    components = [tuple(stream[at + 10 + 3 * i:at + 13 + 3 * i]) for i in range(stream[at + 9])]
    if [sampling for _, sampling, _ in components] != [0x22, 0x11, 0x11]:
        raise CorruptImageError(f"{path}: a JPEG block's sampling factors "
                                f"{[hex(sampling) for _, sampling, _ in components]} are not the 2x2 luma and 1x1 "
                                "chroma of the file's YCbCrSubSampling tag; the file is corrupt")
    mcu_rows, mcu_cols = -(-rows // 16), -(-cols // 16)
    if 32 * mcu_cols > 0xFFFF:
        raise DataError(f"{path}: JPEG blocks {cols} pixels wide are too wide for geotiff.JPEG_CHROMA_UPSAMPLING = "
                        "'libjpeg9' (at most 32752); re-tile the file with "
                        "`gdal_translate -co TILED=YES -co COMPRESS=JPEG -co PHOTOMETRIC=YCBCR in.tif out.tif`")
    # Whole MCUs, so the chroma of the edge blocks is decoded in full: the 16x16 transform needs all 64 samples.
    struct.pack_into(">HH", stream, at + 5, 8 * mcu_rows, 32 * mcu_cols)
    stream[at + 11] = 0x41  # luma sampling 4x1
    ycc = imagecodecs.jpeg8_decode(bytes(stream), tables=jpegtables, colorspace="YCBCR", outcolorspace="YCBCR")
    # Luma: each 8x32 strip of an MCU is its 4 blocks side by side; put the last two under the first two.
    luma = ycc[:, :, 0].reshape(mcu_rows, 8, mcu_cols, 2, 2, 8).transpose(0, 3, 1, 2, 4, 5)
    luma = luma.reshape(16 * mcu_rows, 16 * mcu_cols)[:rows, :cols]
    chroma = []
    for component, plane in zip(components[1:], (1, 2)):
        steps = quantization.get(component[2])
        if steps is None:
            raise CorruptImageError(f"{path}: a JPEG block uses quantisation table {component[2]}, which neither "
                                    "it nor the JPEGTables tag defines; the file is corrupt")
        # Each 8x8 block transformed along its columns, then its rows, with one matrix product per
        # direction for a whole row of blocks: samples are (block row, row in block, column).
        samples = ycc[:, ::4, plane].reshape(mcu_rows, 8, 8 * mcu_cols) - 128.0
        coefficients = ((DCT8.T @ samples).reshape(-1, 8) @ DCT8).reshape(mcu_rows, 8, mcu_cols, 8)  # u, v
        steps = steps[:, None, :]
        coefficients = np.round(coefficients / steps) * steps
        # libjpeg's integer transform rounds between its passes (columns first), to a quarter of its
        # intermediate unit (sqrt(8) levels); doing the same here cuts the mean difference tenfold.
        columns = np.floor(DCT16 @ coefficients.reshape(mcu_rows, 8, 8 * mcu_cols) * (4 * 8**0.5) + 0.5)
        upsampled = (columns.reshape(-1, 8) @ DCT16.T).reshape(16 * mcu_rows, 16 * mcu_cols)[:rows, :cols]
        # Rounded and limited to 0..255 as libjpeg stores a sample, kept centred on 0 (in place: speed).
        np.floor(np.add(upsampled / (4 * 8**0.5), 0.5, out=upsampled), out=upsampled)
        chroma.append(np.clip(upsampled, -128, 127, out=upsampled).astype(np.int32))
    cb, cr = chroma
    # libjpeg's conversion (jdcolor.c): 16-bit fixed-point factors, each product rounded, except
    # green's two, whose sum is rounded once. Planes first, so each operation runs on contiguous memory.
    rgb = np.empty((3, rows, cols), np.int32)
    red, green, blue = rgb
    np.right_shift(RED_FROM_CR * cr + 32768, 16, out=red)
    np.right_shift(GREEN_FROM_CB * cb + GREEN_FROM_CR * cr + 32768, 16, out=green)
    np.right_shift(BLUE_FROM_CB * cb + 32768, 16, out=blue)
    rgb += luma
    return np.clip(rgb, 0, 255, out=rgb).astype(np.uint8).transpose(1, 2, 0)


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
