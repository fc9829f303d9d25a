"""geotiff_decode.py — the blocks of a GeoTIFF, from their bytes to pixels as GDAL's decoders give them.

geotiff.GeoTiff maps a window to the blocks (tiles or strips) it touches and pastes their pixels together; it
gets those pixels from a BlockDecoder, made from the header when the file is opened. Nothing else uses this
module. A BlockDecoder refuses what it cannot decode as GDAL does, then decodes
  - decode_each(): one block at a time, through tifffile and imagecodecs, as GDAL gives its pixels: LERC with
    its NaN mask, band-interleaved JPEG, libjpeg 9's pixels if asked for (geotiff_jpeg9.py), CCITT fax
    through libtiff, the rows wanted of an uncompressed strip, sparse blocks as nodata; every failure is a
    DataError naming the block;
  - decode_many(): many LZW or DEFLATE blocks in a few calls (libtiff, libdeflate), for speed.
What is read and refused, and why: docs/geotiff.md.
"""

import os
import struct

import imagecodecs
import numpy as np

# geotiff imports this module when it opens a file, not at its top, so geotiff is complete by now.
import geotiff  # its settings, looked up on every read: MAX_BLOCK_BYTES, BATCH_BYTES, JPEG_CHROMA_UPSAMPLING
import geotiff_jpeg9  # YCbCr JPEG as GDAL on IJG libjpeg 9 decodes it (JPEG_CHROMA_UPSAMPLING = "libjpeg9")
from geotiff import CorruptImageError, DataError, _size

UNCOMPRESSED, OLD_JPEG, JPEG, LERC = 1, 6, 7, 34887
# CCITT bilevel codecs (Modified Huffman RLE, Group 3, Group 4, RLE word-aligned), decoded by libtiff as in GDAL:
# imagecodecs' own decoder finds a Group 4 pass's b1, b2 from the reference line's pixels, where libtiff keeps
# the zero-length runs of a horizontal code H(0, 0) as changing elements, and the two then part ways.
CCITT_CODECS = {2, 3, 4, 32771}
PHOTOMETRIC_YCBCR = 6
# libtiff undoes a Predictor only inside these codecs (LZW, Adobe Deflate, Deflate, LZMA, ZSTD); with
# any other compression GDAL ignores the tag and returns the stored samples, and so does this reader.
PREDICTOR_CODECS = {5, 8, 32946, 34925, 50000}
# Codecs whose blocks decode_many hands to libtiff all at once: LZW. Not DEFLATE: libtiff stops inflating
# when a block is full, before zlib's checksum, so it would return damaged blocks as pixels, where
# imagecodecs (inflating to the end) reports them.
LIBTIFF_BATCH_CODECS = {5}
DEFLATE_CODECS = {8, 32946}  # Adobe Deflate, Deflate
# Blocks closer than this in the file are read with one system call, the bytes between them included.
COALESCE_GAP_BYTES = 16 * 2**10
JPEG_CHROMA_CHOICES = ("libjpeg-turbo", "libjpeg9")  # the values of geotiff.JPEG_CHROMA_UPSAMPLING


class BlockDecoder:
    """The blocks of one open GeoTIFF, from its tifffile.TiffFile `tif`, `info` (its GeoTiffInfo), `grid`
    (block rows, block cols, blocks across, blocks per band plane) and its GDAL_NODATA tag as written."""

    def __init__(self, path: str, tif, info, grid: tuple[int, int, int, int], nodata_text: str | None):
        page = self.page = tif.pages[0]
        self.path, self.info, self.grid, self.nodata_text = path, info, grid, nodata_text
        self.kind = "tile" if info.tiled else "strip"
        self.samples = page.shaped[-1]  # samples in a block's pixel: all bands, or one with band interleave
        # The samples as stored, which blocks decode to; GeoTiff converts them to info.dtype when pasting (1-bit
        # to uint8 and float16 to float32, as GDAL returns them).
        self.dtype = page.dtype.newbyteorder("=")
        self.decoded = 0  # blocks decoded, and reads of an uncompressed strip's rows (GeoTiff.segments_decoded)
        if page.compression == OLD_JPEG:
            # Old-style JPEG (TIFF 6.0's compression 6) has no single layout: libtiff rebuilds each strip's JPEG
            # header from JPEGQTables, JPEGProc and other tags with heuristics of its own, and tifffile's reading
            # differs from GDAL's (up to 44 levels) or fails: refused, not read unlike what a model is served.
            raise DataError(f"{path}: old-style JPEG compression (TIFF compression 6) is not supported: "
                            "its pixels would not match GDAL's. Convert it with GDAL: "
                            "`gdal_translate -co COMPRESS=JPEG -co TILED=YES in.tif out.tif` (or "
                            "`-co COMPRESS=DEFLATE` for no further loss)")
        if page.photometric == PHOTOMETRIC_YCBCR and page.compression != JPEG:
            # GDAL converts such files to RGB while reading; tifffile would return the raw Y, Cb, Cr.
            raise DataError(f"{path}: YCbCr colour without JPEG compression (here {info.compression}) is not "
                            "supported; convert it to RGB with GDAL: "
                            "`gdal_translate -co COMPRESS=DEFLATE -co TILED=YES in.tif out.tif`")
        if page.predictor != 1 and page.compression not in PREDICTOR_CODECS:
            page.predictor = 1  # before tifffile builds its decoder (on first use), which would apply it
        try:
            page.decode(None, 0)  # tifffile hands out a decoder that raises when the codec is missing
        except Exception as err:
            if not isinstance(err, (ValueError, NotImplementedError)):  # what tifffile raises for what it lacks
                raise CorruptImageError(f"{path}: unreadable TIFF header ({type(err).__name__}: {err}); "
                                        "the file is truncated or corrupt") from err
            if "requires the 'imagecodecs' package" in str(err):  # tifffile's words for a codec imagecodecs lacks
                advice = "Install the full codec set with `pip install -U imagecodecs`, or re-encode with GDAL"
            else:  # no decoder exists for it, so no package will help
                advice = "This reader does not support it; re-encode the file with GDAL"
            raise DataError(
                f"{path}: compression {info.compression} with predictor {page.predictor} cannot be decoded "
                f"({err}). {advice}: `gdal_translate -co COMPRESS=DEFLATE -co TILED=YES in.tif out.tif`") from err
        self.codec = int(page.compression)
        # As tifffile parsed them: converted with int() where used, not here, because a strip table can
        # hold 100000 entries, and converting them all would cost an open more than a window's read.
        self.offsets, self.bytecounts = page.dataoffsets, page.databytecounts
        self.file = tif.filehandle
        self.file_size = os.path.getsize(path)
        self.fd = self.file.fileno()  # for os.preadv: a read at an offset, without a seek
        self.byteorder = tif.byteorder
        self.jpegtables = page.jpegtables
        # YCbCr JPEG with subsampled chroma, the one encoding whose pixels depend on the libjpeg.
        self.ycbcr_subsampling = tuple(page.tags.valueof(530, (2, 2)))  # YCbCrSubSampling (h, v)
        self.subsampled_ycbcr = (page.compression == JPEG and page.photometric == PHOTOMETRIC_YCBCR
                                 and self.ycbcr_subsampling != (1, 1))
        self.lerc_wrapper = page.tags.valueof(50674, (4, 0))[1]  # LercParameters: 0 none, 1 DEFLATE, 2 ZSTD
        # Uncompressed strips of whole-byte samples are read row by row, only the rows wanted (see _rows).
        self.raw_dtype = None
        if (not page.is_tiled and page.compression == UNCOMPRESSED and page.sampleformat != 5  # complex integers
                and page.bitspersample in (8, 16, 32, 64, 128)):
            self.raw_dtype = np.dtype(tif.byteorder + page.dtype.char)
            self.row_bytes = info.width * self.samples * self.raw_dtype.itemsize
        # FillOrder 2: every byte stored with its bits reversed (libtiff reverses them back before decoding;
        # tifffile's decode does too, the batched paths below do not).
        self.reversed_bits = page.fillorder == 2
        # Whole-byte integer or float samples of LZW and DEFLATE are decoded many blocks at a time
        # (decode_many); DEFLATE only in native byte order, where its predictor is undone in place.
        self.batch = None
        if page.sampleformat in (1, 2, 3) and page.bitspersample in (8, 16, 32, 64) and page.dtype.kind in "uif":
            if self.codec in LIBTIFF_BATCH_CODECS:
                self.batch = "libtiff"
            elif self.codec in DEFLATE_CODECS and page.dtype.newbyteorder(tif.byteorder).isnative:
                self.batch = "deflate"
        if not hasattr(os, "preadv") or self.reversed_bits:  # Windows: decode_many reads with os.preadv
            self.batch = None

    def decode_each(self, indices: list[int], window):
        """Blocks `indices` decoded one at a time, through tifffile's decoders: the path for every layout and
        codec, and the one that names the block in any error. Yields (pixels, planes, top, left) pieces: pixels
        (1, rows, cols, samples) of band planes `planes`, whose top-left pixel is (top, left) in the image. Of
        an uncompressed strip only the rows in `window` are read."""
        info = self.info
        row, col, height, width = window
        tile_rows, tile_cols, across, per_plane = self.grid
        for index in indices:
            plane, position = divmod(index, per_plane)
            top, left = position // across * tile_rows, position % across * tile_cols
            # The overlap of this tile and the window, in image coordinates.
            y0, y1 = max(row, top), min(row + height, top + tile_rows, info.height)
            x1 = min(col + width, left + tile_cols, info.width)
            for r0, r1 in self._row_chunks(y0, y1):
                rows = self._rows(index, r0 - top, r1 - top)  # (r1 - r0, cols, samples)
                if rows.shape[0] != r1 - r0 or rows.shape[1] < x1 - left:
                    raise CorruptImageError(f"{self.path}: segment {index} decoded to too few rows or columns for "
                                            f"its place in the image; the file is corrupt")
                yield rows[None], [plane], r0, left

    def _row_chunks(self, y0: int, y1: int) -> list[tuple[int, int]]:
        """Image rows y0..y1-1 of one block, in the pieces to read them in: all at once, except from
        uncompressed strips, read a chunk of at most MAX_BLOCK_BYTES (and BATCH_BYTES) of rows at a time."""
        if self.raw_dtype is None:
            return [(y0, y1)]
        step = max(1, min(geotiff.MAX_BLOCK_BYTES, geotiff.BATCH_BYTES) // self.row_bytes)
        return [(r, min(r + step, y1)) for r in range(y0, y1, step)]

    def _rows(self, index: int, first: int, last: int) -> np.ndarray:
        """Rows first..last-1 of block `index` (counted from its top), as (rows, cols, samples)."""
        info, samples = self.info, self.samples
        tile_rows, tile_cols, across, per_plane = self.grid
        offsets, counts = self.offsets, self.bytecounts
        if index >= len(offsets) or index >= len(counts):
            # libtiff pads a short offset table with empty entries for pixel-interleaved strips and
            # GDAL reads those as empty; of tiled or band-interleaved files GDAL refuses the block.
            if info.tiled or info.interleave == "band":
                planes = info.bands if info.interleave == "band" else 1
                raise CorruptImageError(f"{self.path}: {self.kind} {index} is missing: the file's offset table "
                                        f"lists {min(len(offsets), len(counts))} {self.kind}s of "
                                        f"{planes * per_plane}; the file is truncated or corrupt")
            offset, nbytes = 0, 0
        else:
            offset, nbytes = self._table_entry(offsets, index), self._table_entry(counts, index)
        if nbytes == 0:
            # GDAL's SPARSE_OK writes all-nodata blocks as no bytes at all. A broadcast view: filling
            # an empty block costs no memory, whatever size a (damaged) header gives its tiles.
            fill = np.asarray(self._sparse_fill(index), info.dtype)
            return np.broadcast_to(fill, (last - first, tile_cols, samples))
        if self.raw_dtype is not None:
            # An uncompressed strip is rows stored one after another: read only the rows wanted,
            # so a window of a single-strip file costs its own rows, not the whole file.
            row_bytes = self.row_bytes
            start, stop = first * row_bytes, last * row_bytes
            if stop > nbytes:
                raise CorruptImageError(f"{self.path}: strip {index} holds {nbytes} bytes, too few for row {last - 1} "
                                        f"of it ({row_bytes} bytes a row); the file is corrupt")
            # Only the rows read must lie in the file: a byte count running past its end is bogus when they do
            # (libtiff then reads the strip by the size its rows give, and so does GDAL).
            self._check_block_bytes(index, offset, stop)
            if stop - start > geotiff.MAX_BLOCK_BYTES:  # only a single row can be (_row_chunks asks for chunks)
                raise DataError(f"{self.path}: one row of strip {index} is {_size(row_bytes)} (all bands), more "
                                f"than geotiff.MAX_BLOCK_BYTES = {_size(geotiff.MAX_BLOCK_BYTES)}; re-tile the file "
                                "with `gdal_translate -co TILED=YES -co COMPRESS=DEFLATE in.tif out.tif`, or raise "
                                "geotiff.MAX_BLOCK_BYTES")
            self.file.seek(offset + start)
            data = self.file.read(stop - start)
            if self.reversed_bits:
                data = imagecodecs.bitorder_decode(data)
            self.decoded += 1
            rows = np.frombuffer(data, self.raw_dtype).reshape(last - first, info.width, samples)
            return rows.astype(self.dtype, copy=False)  # native byte order (a copy only for the other one)
        self._check_block_bytes(index, offset, nbytes)
        # The last strip holds only the image's last rows.
        block_rows = tile_rows if info.tiled else min(tile_rows, info.height - index % per_plane // across * tile_rows)
        decoded_bytes = block_rows * tile_cols * samples * self.dtype.itemsize
        self._check_block_size(index, max(decoded_bytes, nbytes))
        self.file.seek(offset)
        data = self.file.read(nbytes)
        try:
            block = self._decode(index, data, block_rows)
        except DataError:  # CorruptImageError, or a JPEG stream the libjpeg 9 path does not handle
            raise
        except MemoryError:
            raise DataError(f"{self.path}: out of memory decoding {self.kind} {index} ({_size(decoded_bytes)}); "
                            "free memory (fewer loader workers) or read smaller windows") from None
        except Exception as err:
            raise CorruptImageError(f"{self.path}: segment {index} failed to decode "
                                    f"({type(err).__name__}: {err}); the file is corrupt") from err
        self.decoded += 1
        return block[first:last]

    def _decode(self, index: int, data: bytes, rows: int) -> np.ndarray:
        """The `rows` x tile cols block `index` from its bytes, as (rows, cols, samples)."""
        info, samples = self.info, self.samples
        tile_rows, tile_cols = info.tile_shape
        if self.codec == LERC:
            return self._decode_lerc(data, (rows, tile_cols, samples))
        if self.codec in CCITT_CODECS:
            # The block as the one strip of a small in-memory TIFF, with the file's FillOrder and T4/T6 options.
            page, short, long_ = self.page, (3, "H"), (4, "I")
            extra = [(266, short, [page.fillorder])]
            extra += [(tag, long_, [page.tags.valueof(tag)]) for tag in (292, 293) if tag in page.tags]
            head, ifd_at, ifd = self._mini_tiff(8 + len(data), rows, tile_cols, 1, [8], [len(data)], extra)
            try:
                return imagecodecs.tiff_decode(head + data + bytes(ifd_at - 8 - len(data)) + ifd).reshape(
                    rows, tile_cols, samples)
            except imagecodecs.TiffError:
                # imagecodecs reads 1-bit images one row at a time, and libtiff fails a row read on a stream
                # that ends early (EOFB, damage), which GDAL's whole-strip read accepts: tifffile's decoder
                # below fills the missing rows with 0, as GDAL does.
                pass
        if self.codec == JPEG:
            # libjpeg allocates what the JPEG header says, whatever the TIFF header says:
            # 65000x65000 in a damaged 16x16 tile would be 12 GB.
            frame = _jpeg_frame_size(data)
            if frame is not None and (frame[0] > tile_rows or frame[1] > tile_cols):
                raise CorruptImageError(f"{self.path}: {self.kind} {index} is a {frame[0]}x{frame[1]} JPEG, larger "
                                        f"than the {tile_rows}x{tile_cols} {self.kind}s of the file; the file is "
                                        "corrupt")
        if self.subsampled_ycbcr and _jpeg_chroma_upsampling() == "libjpeg9":
            if self.ycbcr_subsampling != (2, 2):
                raise DataError(f"{self.path}: YCbCr subsampling {self.ycbcr_subsampling} is not handled by "
                                "geotiff.JPEG_CHROMA_UPSAMPLING = 'libjpeg9', only (2, 2); read it with "
                                "'libjpeg-turbo'")
            block = geotiff_jpeg9.decode_ycbcr_jpeg(self.path, data, self.jpegtables)
            if block.shape != (rows, tile_cols, samples):  # a header claiming other than 3 samples: damage
                raise CorruptImageError(f"{self.path}: {self.kind} {index} is a {'x'.join(map(str, block.shape))} "
                                        f"JPEG in {rows}x{tile_cols} {self.kind}s of {samples} samples; corrupt file")
            return block
        if self.codec == JPEG and samples == 1 and info.bands > 1:
            # Band-interleaved JPEG: each plane is a one-component (grey) JPEG; tifffile asks libjpeg
            # for the file's RGB or YCbCr colour space and fails ("Bogus JPEG colorspace").
            return imagecodecs.jpeg8_decode(data, tables=self.jpegtables)[..., None]
        return self.page.decode(data, index, jpegtables=self.jpegtables)[0][0]

    def _decode_lerc(self, data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
        """A LERC block with its invalid pixels as NaN (floats), as GDAL reads them: tifffile's LERC path drops
        LERC's validity mask, leaving 0.0 where GDAL has NaN. The output array has the block's size from the
        header, so a blob claiming more pixels is an error, not an allocation."""
        rows, cols, samples = shape
        out = np.empty((rows, cols) if samples == 1 else shape, self.dtype)
        wrapper = self.lerc_wrapper
        if wrapper in (1, 2):
            # Unwrapped by hand, into at most what the block can take (values, a validity mask per
            # sample, headers), because imagecodecs would inflate a damaged stream without bound.
            limit = out.nbytes + out.size + 65536
            data = (imagecodecs.zlib_decode if wrapper == 1 else imagecodecs.zstd_decode)(data, out=limit)
        values, valid = imagecodecs.lerc_decode(data, masks=True, out=out)
        if valid is not None and self.dtype.kind in "fc":
            values[~valid.astype(bool)] = np.nan  # a (rows, cols) mask covers every sample of a pixel
        return values.reshape(shape)

    def decode_many(self, indices: list[int], window) -> list | None:
        """Blocks `indices`, those `window` touches, read and decoded in as few calls as possible, as pieces
        like decode_each's: one for all strips, one per tile, each of all planes. None for anything unusual
        (an empty or missing block, bytes that fail to decode): decode_each then decodes them one at a time
        and says which block is damaged.

        Why: per block, tifffile's decode path costs tens of microseconds of Python, as much as decoding an
        8 KiB strip, and imagecodecs' LZW is slower than libtiff's. So the bytes are read with one os.preadv
        per run of adjacent blocks, then LZW goes to libtiff in one call, in a small in-memory TIFF of these
        blocks as its strips, and DEFLATE is inflated into one buffer whose predictor is undone in one call."""
        info = self.info
        row, col, height, width = window
        tile_rows, tile_cols, _, per_plane = self.grid
        if indices[-1] >= min(len(self.offsets), len(self.bytecounts)):
            return None  # missing blocks: decode_each reads or refuses them
        offsets = {i: self._table_entry(self.offsets, i) for i in indices}
        counts = {i: self._table_entry(self.bytecounts, i) for i in indices}
        if not all(counts.values()):
            return None  # empty (sparse) blocks: read as nodata
        block_bytes = tile_rows * tile_cols * self.samples * self.dtype.itemsize
        for index in indices:
            self._check_block_bytes(index, offsets[index], counts[index])
            self._check_block_size(index, max(block_bytes, counts[index]))
        if sum(counts.values()) > 2 * len(indices) * block_bytes + 2**20:
            # Blocks twice as large compressed as decoded (LZW grows noise by up to ~1.5x, DEFLATE by
            # a few bytes): a damaged byte count table, most likely. Read one at a time, so that memory
            # stays bounded by one block, not by all of them at once.
            return None
        first_row, last_row = row // tile_rows, (row + height - 1) // tile_rows
        first_col, last_col = col // tile_cols, (col + width - 1) // tile_cols
        rows, cols = last_row - first_row + 1, last_col - first_col + 1
        planes = [index // per_plane for index in indices[::rows * cols]]  # indices go plane by plane
        top, left = first_row * tile_rows, first_col * tile_cols
        # Tiles are whole at the image's edges too; the last strip holds only the image's last rows.
        bottom = (last_row + 1) * tile_rows if info.tiled else min((last_row + 1) * tile_rows, info.height)
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
        nbytes = [counts[i] for i in indices]
        head, ifd_at, ifd = b"", run_at[-1], b""
        if self.batch == "libtiff":
            if run_at[-1] + 4096 + 8 * len(indices) >= 2**32:
                return None  # more than a classic TIFF's 32-bit offsets can point to
            # Tiles go one above the other, as the strips of an image one tile wide: a tile's rows are
            # those of such a strip, predictor included, and libtiff decodes strips straight into its
            # result (tiles it decodes into a buffer first, then copies).
            stacked = (bottom - top) * cols
            head, ifd_at, ifd = self._mini_tiff(run_at[-1], stacked, tile_cols, len(planes), block_at, nbytes)
        buffer = np.empty(ifd_at + len(ifd), np.uint8)
        view = memoryview(buffer)
        for (start, stop), at in zip(runs, run_at):  # straight into the buffer: no bytes objects to join
            if os.preadv(self.fd, [view[at:at + stop - start]], start) != stop - start:
                return None  # the file changed under us: decode_each says what is wrong
        view[:len(head)], view[run_at[-1]:ifd_at], view[ifd_at:] = head, bytes(ifd_at - run_at[-1]), ifd
        try:
            if self.batch == "libtiff":
                blocks = imagecodecs.tiff_decode(buffer)
            else:
                blocks = self._inflate(indices, view, block_at, nbytes)
                if blocks is None:
                    return None
            # Either way the blocks' pixels follow each other: plane by plane, then block by block.
            if not info.tiled:  # the strips' rows, one after another: the rows of the image
                pieces = [(blocks.reshape(len(planes), bottom - top, info.width, -1), planes, top, 0)]
            else:
                blocks = blocks.reshape(len(planes), rows, cols, tile_rows, tile_cols, -1)
                pieces = [(blocks[:, r, c], planes, top + r * tile_rows, left + c * tile_cols)
                          for r in range(rows) for c in range(cols)]
        except MemoryError:
            raise DataError(f"{self.path}: out of memory decoding a {bottom - top}x{cols * tile_cols} read; free "
                            "memory (fewer loader workers) or read smaller windows") from None
        except Exception:
            return None  # damaged bytes: decode_each finds the block and says which it is
        self.decoded += len(indices)
        return pieces

    def _inflate(self, indices, data: memoryview, block_at: list[int], nbytes: list[int]) -> np.ndarray | None:
        """DEFLATE blocks inflated into one array, predictor undone: (blocks, rows, cols, samples) for
        tiles, (rows of all strips, width, samples) for strips; None if one inflates to too few bytes."""
        info, samples = self.info, self.samples
        tile_rows, tile_cols = info.tile_shape
        row_bytes = tile_cols * samples * self.dtype.itemsize
        sizes = [tile_rows * row_bytes] * len(indices)
        if not info.tiled:  # the image's last strip may be short
            per_plane = self.grid[3]
            short = (info.height - (per_plane - 1) * tile_rows) * row_bytes
            sizes = [short if index % per_plane == per_plane - 1 else size for index, size in zip(indices, sizes)]
        buffer = np.empty(sum(sizes), np.uint8)
        position = 0
        for at, count, size in zip(block_at, nbytes, sizes):
            # libdeflate checks zlib's checksum, and refuses a stream that inflates past the room it has.
            if size == tile_rows * row_bytes:
                inflated = imagecodecs.deflate_decode(data[at:at + count], out=buffer[position:position + size])
            else:
                # A short last strip gets a whole strip's room: some writers (older GDAL among them) store all
                # its rows, and libtiff reads the rows the image has from it.
                inflated = imagecodecs.deflate_decode(data[at:at + count], out=tile_rows * row_bytes)
                buffer[position:position + min(size, len(inflated))] = np.frombuffer(inflated, np.uint8)[:size]
            if len(inflated) < size:
                return None
            position += size
        pixels = buffer.view(self.dtype)
        pixels = pixels.reshape(len(indices), tile_rows, tile_cols, samples) if info.tiled \
            else pixels.reshape(-1, info.width, samples)
        # The predictor works along each row of each block (axis -2: columns), restarting at its left edge.
        if self.page.predictor == 2:
            imagecodecs.delta_decode(pixels, axis=-2, out=pixels)
        elif self.page.predictor == 3:
            pixels = imagecodecs.floatpred_decode(pixels, axis=-2)  # it cannot work in place
        return pixels

    def _mini_tiff(self, data_end: int, height: int, width: int, planes: int,
                   block_offsets: list[int], block_counts: list[int], extra=()) -> tuple[bytes, int, bytes]:
        """The rest of a TIFF in memory of these blocks, whose bytes lie from offset 8 to `data_end`:
        (its 8-byte header, where its IFD starts, the IFD), the IFD giving the file's own codec,
        predictor and sample type, and the blocks as the strips of a height x width image."""
        info, page = self.info, self.page
        order = self.byteorder  # libtiff swaps the decoded samples of a big-endian file to native
        samples = planes if info.interleave == "band" else self.samples
        short, long_ = (3, "H"), (4, "I")
        tags = [(256, long_, [width]), (257, long_, [height]), (258, short, [page.bitspersample] * samples),
                (259, short, [self.codec]), (262, short, [1]),  # photometric: min-is-black, plain samples
                (277, short, [samples]), (284, short, [2 if info.interleave == "band" else 1]),
                (317, short, [page.predictor]), (339, short, [page.sampleformat] * samples)]
        if samples > 1:
            tags.append((338, short, [0] * (samples - 1)))  # extra samples of no particular meaning
        tags += [(273, long_, block_offsets), (278, long_, [info.tile_shape[0]]), (279, long_, block_counts), *extra]
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
            raise CorruptImageError(f"{self.path}: {self.kind} {index} has {nbytes} bytes at offset 0, inside the "
                                    "TIFF header; the file is corrupt")
        if offset + nbytes > self.file_size:
            raise CorruptImageError(f"{self.path}: truncated: segment {index} needs bytes up to {offset + nbytes} "
                                    f"but the file has {self.file_size}; copy or download it again")

    def _check_block_size(self, index: int, nbytes: int):
        """Refuse a tile or strip that costs more than geotiff.MAX_BLOCK_BYTES to decode."""
        if nbytes > geotiff.MAX_BLOCK_BYTES:
            rows, cols = self.info.tile_shape
            raise DataError(f"{self.path}: {self.kind} {index} ({rows}x{cols} pixels) is too big to read: decoding "
                            f"it takes {_size(nbytes)}, more than geotiff.MAX_BLOCK_BYTES = "
                            f"{_size(geotiff.MAX_BLOCK_BYTES)}, for any window that touches it. Re-tile the file "
                            "with `gdal_translate -co TILED=YES -co COMPRESS=DEFLATE in.tif out.tif`, or raise "
                            "geotiff.MAX_BLOCK_BYTES")

    def _sparse_fill(self, index: int):
        """The pixel value of a sparse segment: the nodata value, or 0 without a GDAL_NODATA tag."""
        info = self.info
        if info.nodata is None:
            return info.dtype.type(0)
        fill = geotiff.nodata_pixel(info.nodata, info.dtype)
        if fill is None:
            # Why an error: GDAL would fill this tile with the tag clamped (or rounded) into the
            # dtype, -9999 becoming 0 in uint16, i.e. ordinary pixels that nothing marks as nodata,
            # since the tag matches no pixel. Any value we picked would be data that isn't there.
            raise DataError(f"{self.path}: {self.kind} {index} has no bytes (a sparse {self.kind}, which reads as "
                            f"nodata), but the GDAL_NODATA tag {self.nodata_text} is not a {info.dtype} value "
                            f"({_value_range(info.dtype)}), so there is nothing to fill it with; set a nodata value "
                            f"the pixels can hold with `gdal_edit.py -a_nodata <value> {self.path}`")
        return fill


def _value_range(dtype: np.dtype) -> str:
    if dtype.kind == "b":
        return "0 or 1"
    if dtype.kind in "iu":
        return f"whole numbers {np.iinfo(dtype).min}..{np.iinfo(dtype).max}"
    if dtype.kind in "fc":
        return f"-{np.finfo(dtype).max:g}..{np.finfo(dtype).max:g}, inf or nan"
    return f"{dtype} values"


def _jpeg_chroma_upsampling() -> str:
    if geotiff.JPEG_CHROMA_UPSAMPLING not in JPEG_CHROMA_CHOICES:
        raise DataError(f"geotiff.JPEG_CHROMA_UPSAMPLING is {geotiff.JPEG_CHROMA_UPSAMPLING!r}; set it to one of "
                        f"{', '.join(map(repr, JPEG_CHROMA_CHOICES))}")
    return geotiff.JPEG_CHROMA_UPSAMPLING


# -----------------------------------------------------------------------------
# JPEG


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
            rows, cols = struct.unpack_from(">HH", data, position + 5)
            return rows, cols
        if marker == 0xDA:  # start of scan: the frame header comes before it or not at all
            return None
        position += 2 + int.from_bytes(data[position + 2:position + 4], "big")
    return None
