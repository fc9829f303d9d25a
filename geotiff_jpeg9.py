"""geotiff_jpeg9.py — YCbCr JPEG blocks decoded to the pixels of GDAL built on IJG libjpeg 9.

GDAL in the rasterio wheels on PyPI decodes JPEG with IJG libjpeg 9, which upsamples YCbCr's half-resolution
chroma with a 16x16 inverse DCT per block; libjpeg-turbo (imagecodecs, and GDAL on most Linux installs)
blends neighbouring blocks with a triangle filter instead, up to ~70 levels apart at colour edges.
geotiff_decode.BlockDecoder calls decode_ycbcr_jpeg() for 2x2-subsampled YCbCr JPEG blocks when
geotiff.JPEG_CHROMA_UPSAMPLING is "libjpeg9"; nothing else uses this module. How close it comes to libjpeg
9f, and why the setting exists: docs/geotiff.md ("JPEG pixels").
"""

import struct

import imagecodecs
import numpy as np

from geotiff import CorruptImageError, DataError


def _dct_basis(samples: int) -> np.ndarray:
    """(samples, 8): the 8 JPEG cosines sampled at `samples` points across a block, scaled so that
    8 points give the orthonormal DCT JPEG uses and 16 points keep each coefficient's amplitude."""
    position = np.arange(samples)[:, None]
    frequency = np.arange(8)[None, :]
    scale = np.where(frequency == 0, np.sqrt(1 / 8), np.sqrt(2 / 8))
    return scale * np.cos((2 * position + 1) * frequency * np.pi / (2 * samples))


DCT8, DCT16 = _dct_basis(8), _dct_basis(16)
CLIPPED_CHROMA_ROUNDS = 20  # at most, recovering the coefficients of saturated chroma (_chroma_coefficients)

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


def _chroma_coefficients(samples: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """The dequantised DCT coefficients (block row, u, block col, v) of chroma `samples` (block row, row in block,
    column; centred on 0), which libjpeg-turbo's 8x8 inverse DCT gave, rounded and clipped to -128..127.
    The forward DCT of the samples, rounded to multiples of the quantisation `steps` (u, v), gives them back
    where nothing was clipped. In a block of saturated colour it does not: there the clipped samples are set
    to what the coefficients found so far give, where that lies beyond the clip as the true values did, and
    the transform is done again, until nothing changes."""
    mcu_rows, _, width = samples.shape
    blocks = samples.reshape(mcu_rows, 8, width // 8, 8)  # block row, y, block col, x
    # Along each block's columns, then its rows: one matrix product per direction for a whole row of blocks.
    coefficients = ((DCT8.T @ samples).reshape(-1, 8) @ DCT8).reshape(mcu_rows, 8, width // 8, 8)  # u, v
    coefficients = np.round(coefficients / steps[:, None, :]) * steps[:, None, :]
    block_rows, block_cols = np.nonzero(((blocks <= -128) | (blocks >= 127)).any(axis=(1, 3)))
    if len(block_rows):
        clipped = blocks[block_rows, :, block_cols, :]  # (blocks, y, x)
        low, high, values = clipped <= -128, clipped >= 127, clipped
        for _ in range(CLIPPED_CHROMA_ROUNDS):
            found = np.round(DCT8.T @ values @ DCT8 / steps) * steps
            inverse = DCT8 @ found @ DCT8.T
            updated = np.where(low, np.minimum(inverse, -128), np.where(high, np.maximum(inverse, 127), clipped))
            if np.array_equal(updated, values):
                break
            values = updated
        coefficients[block_rows, :, block_cols, :] = found
    return coefficients


def decode_ycbcr_jpeg(path: str, data: bytes, jpegtables: bytes | None) -> np.ndarray:
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
    How close this comes to libjpeg 9f's pixels: docs/geotiff.md ("JPEG pixels")."""
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
        # Samples are (block row, row in block, column).
        samples = ycc[:, ::4, plane].reshape(mcu_rows, 8, 8 * mcu_cols) - 128.0
        coefficients = _chroma_coefficients(samples, steps)
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
