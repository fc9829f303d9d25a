"""Tests for geotiff.py: GDAL-written fixtures read exactly, windows and bands, errors.

The fixtures in tests/fixtures were written by GDAL (see make_fixtures.sh) from the arrays
in arrays.npz, so every pixel comparison here is against an independent writer; for lossy,
damaged or odd files (JPEG, LERC, short offset tables, stray predictor tags) arrays.npz holds
what GDAL itself decodes them to. Other damaged files are built here byte by byte from the
fixtures, and a seeded fuzz test truncates and alters every fixture.
"""

import struct
import tracemalloc
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile

import geotiff
import geotiff_decode

FIXTURES = Path(__file__).parent / "fixtures"
ARRAYS = dict(np.load(FIXTURES / "arrays.npz"))

# fixture file -> (source array, dtype, tiled, interleave, nodata, bigtiff)
LOSSLESS = {
    "u16_4b_tiled_deflate_pixel.tif": ("u16_4b", "uint16", True, "pixel", None, False),
    "u16_4b_striped_lzw_band.tif": ("u16_4b", "uint16", False, "band", None, False),
    "u16_4b_tiled_zstd_band.tif": ("u16_4b", "uint16", True, "band", None, False),
    "u16_4b_striped_packbits_pixel.tif": ("u16_4b", "uint16", False, "pixel", None, False),
    "u16_4b_tiled_deflate_bigtiff.tif": ("u16_4b", "uint16", True, "pixel", None, True),
    "u8_3b_striped_none_pixel.tif": ("u8_3b", "uint8", False, "pixel", None, False),
    "i16_3b_nodata_tiled_zstd_pixel.tif": ("i16_3b_nodata", "int16", True, "pixel", -9999, False),
    "i16_3b_nodata_striped_deflate_band.tif": ("i16_3b_nodata", "int16", False, "band", -9999, False),
    "f32_3b_tiled_deflate_pred3_pixel.tif": ("f32_3b", "float32", True, "pixel", None, False),
    "f32_3b_striped_lzw_pred3_band.tif": ("f32_3b", "float32", False, "band", None, False),
    "f64_2b_tiled_zstd_pred3.tif": ("f64_2b", "float64", True, "pixel", None, False),
    "u16_13b_tiled_deflate_band.tif": ("u16_13b", "uint16", True, "band", None, False),
    "u16_1b_cog.tif": ("u16_1b_cog", "uint16", True, "pixel", None, False),
    "u1_1b_striped_ccittfax4.tif": ("u1_1b", "uint8", False, "pixel", None, False),  # 1-bit: uint8 0/1, as GDAL
    "u1_1b_tiled_ccittfax3.tif": ("u1_1b", "uint8", True, "pixel", None, False),
    "u1_1b_striped_ccittrle.tif": ("u1_1b", "uint8", False, "pixel", None, False),
}
# JPEG fixture -> the array it was encoded from. The aerial files are YCbCr with 2x2 chroma subsampling,
# the usual encoding of aerial RGB, with sharp colour edges where decoders' chroma upsampling can differ.
JPEG_SOURCES = {"u8_3b_tiled_jpeg.tif": "u8_3b", "u8_3b_striped_jpeg_ycbcr.tif": "u8_3b",
                "u8_3b_aerial_tiled_jpeg_ycbcr.tif": "u8_3b_aerial", "u8_3b_aerial_striped_jpeg_ycbcr.tif": "u8_3b_aerial",
                "u8_3b_aerial_cog_jpeg_ycbcr.tif": "u8_3b_aerial", "u8_3b_aerial_tiled_jpeg_band.tif": "u8_3b_aerial",
                "u8_3b_aerial_striped_jpeg_band.tif": "u8_3b_aerial",
                # Quality 50 on saturated colours: JPEG decoders clip the chroma of these blocks (0..255).
                "u8_3b_saturated_tiled_jpeg_ycbcr.tif": "u8_3b_saturated"}
JPEG = sorted(JPEG_SOURCES)
YCBCR_JPEG = [name for name in JPEG if ("aerial" in name or "saturated" in name) and "ycbcr" in name]
BAND_JPEG = [name for name in JPEG if name.endswith("_band.tif")]  # one grey JPEG stream per band plane
# Windows of those 150x137 files cutting through 16x16 MCUs and 32- or 128-pixel tiles and strips.
WINDOWS_THROUGH_MCUS = [(0, 0, 150, 137), (7, 9, 50, 61), (15, 15, 2, 2), (8, 24, 17, 9), (31, 31, 3, 3),
                        (100, 120, 50, 17), (127, 127, 23, 10), (149, 0, 1, 137)]


# --- reading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LOSSLESS))
def test_gdal_fixture_reads_exactly(name):
    source, dtype, tiled, interleave, nodata, bigtiff = LOSSLESS[name]
    pixels = geotiff.read_geotiff(FIXTURES / name)
    assert pixels.dtype == np.dtype(dtype) and pixels.shape == ARRAYS[source].shape
    np.testing.assert_array_equal(pixels, ARRAYS[source])  # NaN == NaN here, and must be in place
    info = geotiff.geotiff_info(FIXTURES / name)
    assert (info.height, info.width, info.bands) == ARRAYS[source].shape[1:] + ARRAYS[source].shape[:1]
    assert (info.dtype, info.tiled, info.interleave, info.nodata, info.bigtiff) == (np.dtype(dtype), tiled, interleave, nodata, bigtiff)


def test_cog_returns_full_resolution_not_overview():
    with tifffile.TiffFile(FIXTURES / "u16_1b_cog.tif") as tif:
        assert len(tif.pages) == 2  # the fixture really has an overview after the full image
    assert geotiff.read_geotiff(FIXTURES / "u16_1b_cog.tif").shape == (1, 140, 130)


@pytest.mark.parametrize("name", JPEG)
def test_jpeg_geotiff_matches_gdal_decode(name):
    pixels = geotiff.read_geotiff(FIXTURES / name).astype(int)
    gdal = ARRAYS[f"gdal_decoded_{name[:-4]}"].astype(int)
    source = ARRAYS[JPEG_SOURCES[name]].astype(int)
    assert pixels.shape == gdal.shape == source.shape
    assert np.abs(pixels - gdal).max() <= 2  # libjpeg-turbo builds differ by rounding only
    # And it is the picture we encoded (quality 75 on sharp edges loses ~10 levels, quality 50 on saturated
    # noisy patches ~15; a wrong picture ~50).
    assert np.abs(pixels - source).mean() < {"u8_3b": 3, "u8_3b_aerial": 12, "u8_3b_saturated": 20}[JPEG_SOURCES[name]]


@pytest.mark.parametrize("name", YCBCR_JPEG + BAND_JPEG)
@pytest.mark.parametrize("window", WINDOWS_THROUGH_MCUS)
@pytest.mark.parametrize("bands", [None, [2], [1, 0], [2, 2, 0]])
def test_ycbcr_jpeg_window_and_bands_match_gdal(name, window, bands):
    # Chroma is stored at half resolution and upsampled while decoding a whole tile or strip, so a
    # window cutting through 16x16 blocks (or a tile edge) must still see each pixel as GDAL does.
    row, col, h, w = window
    gdal = ARRAYS[f"gdal_decoded_{name[:-4]}"].astype(int)[bands if bands else slice(None), row:row + h, col:col + w]
    pixels = geotiff.read_geotiff(FIXTURES / name, window=window, bands=bands)
    assert pixels.dtype == np.uint8 and pixels.shape == gdal.shape
    assert np.abs(pixels.astype(int) - gdal).max() <= 2


@pytest.mark.parametrize("name", YCBCR_JPEG)
@pytest.mark.parametrize("window", WINDOWS_THROUGH_MCUS)
@pytest.mark.parametrize("bands", [None, [2], [1, 0]])
def test_ycbcr_jpeg_as_libjpeg9_matches_gdal_on_libjpeg9(name, window, bands, monkeypatch):
    # GDAL on IJG libjpeg 9 (rasterio's wheels) upsamples chroma by a 16x16 inverse DCT per block:
    # its pixels are up to ~70 levels from libjpeg-turbo's here, and the libjpeg9 setting follows them.
    monkeypatch.setattr(geotiff, "JPEG_CHROMA_UPSAMPLING", "libjpeg9")
    row, col, h, w = window
    libjpeg9 = ARRAYS[f"libjpeg9_decoded_{name[:-4]}"].astype(int)[bands if bands else slice(None),
                                                                     row:row + h, col:col + w]
    pixels = geotiff.read_geotiff(FIXTURES / name, window=window, bands=bands)
    assert pixels.dtype == np.uint8 and pixels.shape == libjpeg9.shape
    assert np.abs(pixels.astype(int) - libjpeg9).max() <= 2


def test_libjpeg9_setting_changes_only_subsampled_ycbcr_jpeg(monkeypatch):
    assert geotiff.JPEG_CHROMA_UPSAMPLING == "libjpeg-turbo"  # the default: GDAL's pixels on most installs
    turbo = {name: geotiff.read_geotiff(FIXTURES / name) for name in ("u8_3b_tiled_jpeg.tif", "u16_4b_tiled_zstd_band.tif")}
    libjpeg9 = ARRAYS["libjpeg9_decoded_u8_3b_striped_jpeg_ycbcr"].astype(int)
    assert np.abs(libjpeg9 - ARRAYS["gdal_decoded_u8_3b_striped_jpeg_ycbcr"]).max() > 2  # the two libraries differ
    monkeypatch.setattr(geotiff, "JPEG_CHROMA_UPSAMPLING", "libjpeg9")
    assert np.abs(geotiff.read_geotiff(FIXTURES / "u8_3b_striped_jpeg_ycbcr.tif").astype(int) - libjpeg9).max() <= 2
    for name, pixels in turbo.items():  # RGB JPEG and lossless files decode alike in both libraries
        np.testing.assert_array_equal(geotiff.read_geotiff(FIXTURES / name), pixels)


def test_libjpeg9_setting_refuses_other_subsampling_and_calls_disagreeing_blocks_corrupt(tmp_path, monkeypatch):
    monkeypatch.setattr(geotiff, "JPEG_CHROMA_UPSAMPLING", "libjpeg9")
    source = FIXTURES / "u8_3b_aerial_tiled_jpeg_ycbcr.tif"
    other = tmp_path / "ycbcr_2x1.tif"
    other.write_bytes(source.read_bytes())
    set_tag_value(other, "YCbCrSubSampling", 1, index=1)  # the tag now says 2x1, the blocks still 2x2
    with pytest.raises(geotiff.DataError, match=f"{other}: YCbCr subsampling \\(2, 1\\) is not handled by "
                                                "geotiff.JPEG_CHROMA_UPSAMPLING = 'libjpeg9'"):
        geotiff.read_geotiff(other, window=(0, 0, 4, 4))
    damaged = tmp_path / "damaged.tif"
    raw = bytearray(source.read_bytes())
    with tifffile.TiffFile(source) as tif:
        start = tif.pages[0].dataoffsets[0]
    frame = raw.index(b"\xff\xc0", start)
    raw[frame + 14] = 0x12  # Cb's sampling factors in tile 0's frame header
    damaged.write_bytes(bytes(raw))
    with pytest.raises(geotiff.CorruptImageError, match=f"{damaged}: a JPEG block's sampling factors "
                                                        "\\['0x22', '0x12', '0x11'\\] are not"):
        geotiff.read_geotiff(damaged, window=(0, 0, 4, 4))
    # A damaged SamplesPerPixel entry (tifffile then reads 1 sample) with 3-sample JPEG blocks.
    wrong_samples = tmp_path / "wrong_samples.tif"
    raw = bytearray((FIXTURES / "u8_3b_striped_jpeg_ycbcr.tif").read_bytes())
    raw[85] = 49  # inside tag 277's entry: an invalid type, so tifffile falls back to 1 sample per pixel
    wrong_samples.write_bytes(bytes(raw))
    with pytest.raises(geotiff.CorruptImageError, match=f"{wrong_samples}: strip 0 is a 16x64x3 JPEG in 16x64 "
                                                        "strips of 1 samples; corrupt file"):
        geotiff.read_geotiff(wrong_samples, window=(0, 0, 4, 4))


def test_unknown_jpeg_chroma_setting_is_refused(monkeypatch):
    monkeypatch.setattr(geotiff, "JPEG_CHROMA_UPSAMPLING", "libjpeg-9")
    with pytest.raises(geotiff.DataError, match="geotiff.JPEG_CHROMA_UPSAMPLING is 'libjpeg-9'; set it to one of "
                                                "'libjpeg-turbo', 'libjpeg9'"):
        geotiff.read_geotiff(FIXTURES / "u8_3b_aerial_tiled_jpeg_ycbcr.tif", window=(0, 0, 4, 4))


def test_libjpeg9_setting_refuses_progressive_jpeg_blocks(tmp_path, monkeypatch):
    path = tmp_path / "progressive.tif"
    raw = bytearray((FIXTURES / "u8_3b_aerial_tiled_jpeg_ycbcr.tif").read_bytes())
    with tifffile.TiffFile(FIXTURES / "u8_3b_aerial_tiled_jpeg_ycbcr.tif") as tif:
        start = tif.pages[0].dataoffsets[0]
    frame = raw.index(b"\xff\xc0", start)
    raw[frame + 1] = 0xC2  # the frame header now says progressive
    path.write_bytes(bytes(raw))
    monkeypatch.setattr(geotiff, "JPEG_CHROMA_UPSAMPLING", "libjpeg9")
    with pytest.raises(geotiff.DataError, match=f"{path}: a JPEG block is not 8-bit baseline sequential JPEG \\(frame "
                                                "marker 0xc2\\).*read it with 'libjpeg-turbo'") as err:
        geotiff.read_geotiff(path, window=(0, 0, 4, 4))
    assert not isinstance(err.value, geotiff.CorruptImageError)


WINDOW_FILES = ["u16_4b_tiled_deflate_pixel.tif", "u16_4b_striped_lzw_band.tif", "u16_4b_tiled_zstd_band.tif",
                "u16_4b_striped_packbits_pixel.tif", "f32_3b_tiled_deflate_pred3_pixel.tif", "u8_3b_tiled_jpeg.tif",
                "u8_3b_striped_jpeg_ycbcr.tif", "u8_3b_striped_none_pixel.tif", "u1_1b_tiled_ccittfax3.tif",
                "u1_1b_striped_ccittfax4.tif"]


@pytest.mark.parametrize("name", WINDOW_FILES)
@pytest.mark.parametrize("window", [(0, 0, 1, 1), (15, 15, 2, 2), (3, 5, 20, 30), (30, 33, 7, 8),  # tile edges, border
                                    (36, 0, 1, 41), (0, 40, 37, 1), (16, 16, 16, 16), (0, 0, 37, 41)])
def test_window_equals_slice_of_full_read(name, window):
    full = geotiff.read_geotiff(FIXTURES / name)
    row, col, h, w = window
    np.testing.assert_array_equal(geotiff.read_geotiff(FIXTURES / name, window=window), full[:, row:row + h, col:col + w])


@pytest.mark.parametrize("name", ["u16_4b_tiled_deflate_pixel.tif", "u16_4b_striped_lzw_band.tif", "u16_13b_tiled_deflate_band.tif"])
def test_band_selection(name):
    full = geotiff.read_geotiff(FIXTURES / name)
    for bands in ([0], [3, 1], [2, 2, 0]):
        np.testing.assert_array_equal(geotiff.read_geotiff(FIXTURES / name, bands=bands), full[bands])
    np.testing.assert_array_equal(geotiff.read_geotiff(FIXTURES / name, window=(10, 2, 9, 17), bands=[1, 0]),
                                  full[[1, 0], 10:19, 2:19])


def test_window_decodes_only_the_tiles_it_touches():
    with geotiff.GeoTiff(FIXTURES / "u16_4b_tiled_deflate_pixel.tif") as tif:  # 16x16 tiles, 3 rows x 3 cols
        assert tif.window_segments((0, 0, 16, 16)) == [0]
        assert tif.window_segments((15, 15, 2, 2)) == [0, 1, 3, 4]
        assert tif.window_segments((33, 40, 4, 1)) == [8]
        assert len(tif.window_segments()) == 9
        tif.read((15, 15, 2, 2))
        assert tif.segments_decoded == 4
    with geotiff.GeoTiff(FIXTURES / "u16_4b_tiled_zstd_band.tif") as tif:  # band interleave: 9 tiles per band plane
        assert tif.window_segments((15, 15, 2, 2), bands=[2]) == [18, 19, 21, 22]
        tif.read((0, 0, 37, 41), bands=[1])
        assert tif.segments_decoded == 9  # the other 27 tiles hold other bands and are never decoded
    with geotiff.GeoTiff(FIXTURES / "u16_4b_striped_lzw_band.tif") as tif:  # 7-row strips
        assert tif.window_segments((13, 0, 2, 41), bands=[0]) == [1, 2]


# Fixtures whose blocks a read decodes many at a time (LZW through libtiff, DEFLATE through libdeflate).
BATCHED = {"u16_4b_striped_lzw_band.tif": "libtiff", "f32_3b_striped_lzw_pred3_band.tif": "libtiff",
           "u16_4b_tiled_deflate_pixel.tif": "deflate", "i16_3b_nodata_striped_deflate_band.tif": "deflate",
           "f32_3b_tiled_deflate_pred3_pixel.tif": "deflate", "u16_13b_tiled_deflate_band.tif": "deflate",
           "u16_4b_tiled_deflate_bigtiff.tif": "deflate", "u16_1b_cog.tif": "deflate"}


@pytest.mark.parametrize("name", sorted(BATCHED))
def test_batched_reads_equal_block_by_block_reads(name, monkeypatch):
    # The same windows and bands read through the batched path, with slabs and read coalescing at their
    # extremes, and one block at a time through tifffile's decoders; both against GDAL's pixels.
    full = ARRAYS[LOSSLESS[name][0]]
    bands = full.shape[0]
    reads = [(None, None), ((0, 0, 1, 1), None), ((3, 5, 19, 13), [bands - 1, 0]), ((15, 15, 2, 2), [bands // 2] * 2),
             ((full.shape[1] - 7, full.shape[2] - 9, 7, 9), None)]
    for batch_bytes, gap in [(geotiff.BATCH_BYTES, geotiff_decode.COALESCE_GAP_BYTES), (1, 0), (2**20, 2**30)]:
        monkeypatch.setattr(geotiff, "BATCH_BYTES", batch_bytes)  # 1: a slab per block row
        monkeypatch.setattr(geotiff_decode, "COALESCE_GAP_BYTES", gap)  # 0: a read per run of touching blocks
        for window, band_list in reads:
            with geotiff.GeoTiff(FIXTURES / name) as tif:
                assert tif._decoder.batch == BATCHED[name]
                monkeypatch.setattr(tif._decoder, "decode_each", None)  # the batched path must not fall back
                batched = tif.read(window, band_list)
            with geotiff.GeoTiff(FIXTURES / name) as tif:
                tif._decoder.batch = None
                one_by_one = tif.read(window, band_list)
            row, col, height, width = window or (0, 0, *full.shape[1:])
            expected = full[band_list if band_list else slice(None), row:row + height, col:col + width]
            np.testing.assert_array_equal(batched, expected)
            np.testing.assert_array_equal(one_by_one, expected)


def test_batched_read_counts_and_reads_only_the_blocks_it_needs(tmp_path, monkeypatch):
    # 64 LZW tiles of 256x256; a 512x512 window touches 9 of them, decoded in one libtiff call
    # from the bytes of 3 runs of adjacent tiles (one per tile row; noise: tiles far bigger than the gap).
    path = tmp_path / "scene.tif"
    scene = np.random.default_rng(0).integers(0, 60000, (2048, 2048), dtype=np.uint16)
    tifffile.imwrite(path, scene, tile=(256, 256), compression="lzw", predictor=True)
    preads, decodes = [], []
    real_preadv, real_decode = geotiff_decode.os.preadv, geotiff_decode.imagecodecs.tiff_decode
    monkeypatch.setattr(geotiff_decode.os, "preadv", lambda fd, buffers, offset: preads.append(offset) or real_preadv(fd, buffers, offset))
    monkeypatch.setattr(geotiff_decode.imagecodecs, "tiff_decode", lambda data: decodes.append(len(data)) or real_decode(data))
    with geotiff.GeoTiff(path) as tif:
        window = tif.read((700, 900, 512, 512))
        assert tif.segments_decoded == 9
        offsets = tif._decoder.offsets
    np.testing.assert_array_equal(window[0], scene[700:1212, 900:1412])
    assert sorted(preads) == [offsets[r * 8 + 3] for r in (2, 3, 4)] and len(decodes) == 1


@pytest.mark.parametrize("compression, batch", [("lzw", "libtiff"), ("zlib", None)])
def test_big_endian_batched_or_block_by_block_and_sparse_blocks_in_a_batched_file(tmp_path, compression, batch):
    # Big-endian LZW goes to libtiff in a big-endian TIFF of its own, which returns native samples;
    # big-endian DEFLATE goes block by block (the batched predictor works in native order only).
    pixels = ARRAYS["u16_4b"][:, :40, :40]
    path = tmp_path / "motorola.tif"
    tifffile.imwrite(path, pixels.transpose(1, 2, 0), byteorder=">", tile=(16, 16), compression=compression,
                     predictor=True, photometric="minisblack", planarconfig="contig")
    with geotiff.GeoTiff(path) as tif:
        assert tif._decoder.batch == batch
        read = tif.read((3, 5, 30, 33), bands=[2, 0])
    assert read.dtype.isnative
    np.testing.assert_array_equal(read, pixels[[2, 0], 3:33, 5:38])
    # A sparse tile in a window sends that slab down the block-by-block path, which fills it.
    path = tmp_path / "sparse.tif"
    tifffile.imwrite(path, pixels[0], tile=(16, 16), compression=compression, predictor=True,
                     extratags=[(geotiff.GDAL_NODATA_TAG, "s", 0, "7", True)])
    make_tile_sparse(path, 4)  # the middle tile of 3x3
    expected = pixels[:1].copy()
    expected[:, 16:32, 16:32] = 7
    np.testing.assert_array_equal(geotiff.read_geotiff(path), expected)
    np.testing.assert_array_equal(geotiff.read_geotiff(path, window=(0, 0, 16, 40)), expected[:, :16])  # no sparse tile


def test_small_window_of_big_tiled_scene_stays_small(tmp_path):
    path = tmp_path / "scene.tif"
    scene = np.arange(2048 * 2048, dtype=np.uint32).reshape(2048, 2048).astype(np.uint16)
    tifffile.imwrite(path, scene, tile=(256, 256), compression="zlib")
    with geotiff.GeoTiff(path) as tif:
        window = tif.read((700, 900, 512, 512))
        assert tif.segments_decoded == 9  # of 64: a 512 window covers at most 3x3 tiles of 256
    np.testing.assert_array_equal(window[0], scene[700:1212, 900:1412])


def test_big_endian_and_sparse_tiles(tmp_path):
    pixels = ARRAYS["u16_4b"][:, :32, :32]
    tifffile.imwrite(tmp_path / "motorola.tif", pixels, byteorder=">", tile=(16, 16), compression="zlib", predictor=True,
                     photometric="minisblack", planarconfig="separate")
    read = geotiff.read_geotiff(tmp_path / "motorola.tif")
    assert read.dtype == np.dtype("uint16") and read.dtype.isnative
    np.testing.assert_array_equal(read, pixels)
    # GDAL's SPARSE_OK=TRUE stores an all-nodata tile as offset 0, byte count 0.
    path = tmp_path / "sparse.tif"
    tifffile.imwrite(path, pixels[0], tile=(16, 16), extratags=[(geotiff.GDAL_NODATA_TAG, "s", 0, "7", True)])
    make_tile_sparse(path, 0)
    expected = pixels[:1].copy()
    expected[:, :16, :16] = 7
    np.testing.assert_array_equal(geotiff.read_geotiff(path), expected)


def make_tile_sparse(path, tile):
    """Rewrite `path` so that `tile` has byte count 0, as GDAL's SPARSE_OK=TRUE writes an all-nodata tile."""
    raw = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        counts = tif.pages[0].tags["TileByteCounts"]
    width = counts.valuebytecount // counts.count
    start = counts.valueoffset + tile * width
    raw[start:start + width] = bytes(width)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("dtype, tag", [("uint16", "-9999"), ("uint16", "70000"), ("uint8", "300"), ("uint8", "1.5"),
                                        ("int16", "nan"), ("float32", "1e40")])
def test_nodata_no_pixel_can_hold_marks_nothing_and_sparse_tiles_say_so(tmp_path, dtype, tag, caplog):
    # A tag the dtype cannot hold (as GDAL decides for its nodata masks) matches no pixel; the
    # reads are unchanged and say nothing, but a sparse tile, to be filled with that value, is an error.
    pixels = np.arange(32 * 32).reshape(1, 32, 32).astype(dtype)
    path = tmp_path / f"{dtype}_nodata.tif"
    tifffile.imwrite(path, pixels, tile=(16, 16), extratags=[(geotiff.GDAL_NODATA_TAG, "s", 0, tag, True)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy overflow or invalid-cast warnings either
        info = geotiff.geotiff_info(path)
        np.testing.assert_equal(info.nodata, float(tag))  # the tag's value, as written
        assert geotiff.nodata_pixel(info.nodata, info.dtype) is None
        np.testing.assert_array_equal(geotiff.read_geotiff(path), pixels)
        np.testing.assert_array_equal(geotiff.read_geotiff(path, window=(10, 3, 12, 20)), pixels[:, 10:22, 3:23])
        make_tile_sparse(path, 0)
        np.testing.assert_array_equal(geotiff.read_geotiff(path, window=(16, 0, 16, 32)), pixels[:, 16:, :])
        for window in (None, (10, 3, 12, 20)):
            with pytest.raises(geotiff.DataError, match=f"{path}: tile 0 .* sparse .* GDAL_NODATA tag {tag} .* "
                                                        f"{dtype} .*gdal_edit.py -a_nodata"):
                geotiff.read_geotiff(path, window=window)
    assert not [r for r in caplog.records if r.name == "tifffile"]  # tifffile's own complaint about the tag


def test_nodata_pixel_is_the_tag_in_the_pixel_dtype():
    assert geotiff.nodata_pixel(None, np.uint16) is None
    for value, dtype in [(-9999.0, np.int16), (0.0, np.uint8), (255.0, np.uint8), (65535.0, np.uint16), (1.0, np.bool_)]:
        pixel = geotiff.nodata_pixel(value, dtype)
        assert pixel.dtype == np.dtype(dtype) and pixel == value
    assert geotiff.nodata_pixel(0.1, np.float32) == np.float32(0.1)  # rounded as GDAL compares float32 pixels
    assert np.isnan(geotiff.nodata_pixel(float("nan"), np.float32))
    assert geotiff.nodata_pixel(float("-inf"), np.float64) == -np.inf
    for value, dtype in [(-1.0, np.uint8), (256.0, np.uint8), (2.0 ** 63, np.int64), (0.5, np.int32), (float("inf"), np.int32), (2.0, np.bool_)]:
        assert geotiff.nodata_pixel(value, dtype) is None


# --- bad input -----------------------------------------------------------------------------------


def truncated_copy(tmp_path, name="u16_4b_tiled_deflate_pixel.tif", keep=0.6):
    path = tmp_path / f"truncated_{name}"
    raw = (FIXTURES / name).read_bytes()
    path.write_bytes(raw[:int(len(raw) * keep)])
    return path


def test_bad_input_errors_name_the_file(tmp_path):
    truncated = truncated_copy(tmp_path)
    with pytest.raises(geotiff.CorruptImageError, match=f"{truncated}.*truncated"):
        geotiff.read_geotiff(truncated)
    header_only = truncated_copy(tmp_path, "u16_1b_cog.tif", keep=0.004)
    with pytest.raises(geotiff.CorruptImageError, match=f"{header_only}: unreadable TIFF header"):
        geotiff.read_geotiff(header_only)
    fixture = FIXTURES / "u16_4b_tiled_deflate_pixel.tif"
    for window in [(30, 0, 8, 8), (0, 35, 8, 8), (-1, 0, 4, 4), (0, 0, 0, 4)]:
        with pytest.raises(geotiff.DataError, match=f"{fixture}: window .* not inside the 37x41 image"):
            geotiff.read_geotiff(fixture, window=window)
    with pytest.raises(geotiff.DataError, match=f"{fixture}: band indices \\[4\\] out of range; the file has 4 bands"):
        geotiff.read_geotiff(fixture, bands=[4])
    with pytest.raises(geotiff.DataError, match=f"{fixture}: band indices \\[-1, 0\\] out of range.* 0..3"):
        geotiff.read_geotiff(fixture, bands=[-1, 0])
    with pytest.raises(geotiff.DataError, match=f"{fixture}: no bands selected .*at least one 0-based band index, 0..3"):
        geotiff.read_geotiff(fixture, bands=[])


def test_unreadable_nodata_tag_names_the_file(tmp_path):
    path = tmp_path / "odd_nodata.tif"
    tifffile.imwrite(path, np.zeros((4, 4), np.uint16), extratags=[(geotiff.GDAL_NODATA_TAG, "s", 0, "none", True)])
    with pytest.raises(geotiff.DataError, match=f"{path}: GDAL_NODATA tag 'none' is not a number.*gdal_edit"):
        geotiff.read_geotiff(path)


def test_corrupt_tile_bytes_raise(tmp_path):
    path = tmp_path / "garbled.tif"
    raw = bytearray((FIXTURES / "u16_4b_tiled_deflate_pixel.tif").read_bytes())
    with tifffile.TiffFile(FIXTURES / "u16_4b_tiled_deflate_pixel.tif") as tif:
        offset = tif.pages[0].dataoffsets[4]
    raw[offset:offset + 40] = b"\xff" * 40
    path.write_bytes(bytes(raw))
    with pytest.raises(geotiff.CorruptImageError, match=f"{path}: segment 4 failed to decode"):
        geotiff.read_geotiff(path)
    geotiff.read_geotiff(path, window=(0, 0, 16, 16))  # tiles away from the damage still read


def set_tag_value(path, tag, value, index=0):
    """Overwrite value `index` of an integer `tag` (name or code) in `path`'s first IFD, in place."""
    raw = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        entry, byteorder = tif.pages[0].tags[tag], tif.byteorder
    width = entry.valuebytecount // entry.count
    start = entry.valueoffset + index * width
    raw[start:start + width] = int(value).to_bytes(width, "little" if byteorder == "<" else "big")
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("compression, name", [(34676, "SGILOG"), (32809, "THUNDERSCAN"), (60000, "60000")])
def test_compression_nothing_decodes_says_unsupported_not_pip_install(tmp_path, compression, name):
    path = tmp_path / "odd.tif"
    tifffile.imwrite(path, np.zeros((16, 16), np.uint16), compression="zlib")
    set_tag_value(path, "Compression", compression)
    with pytest.raises(geotiff.DataError, match=f"{path}: compression .*{name}.* does not support it; re-encode "
                                                "the file with GDAL: `gdal_translate -co COMPRESS=DEFLATE") as err:
        geotiff.read_geotiff(path)
    assert "pip install" not in str(err.value)  # imagecodecs has no decoder for these: installing cannot help


def test_ycbcr_without_jpeg_is_refused(tmp_path):
    # GDAL converts such a file to RGB while reading; its raw Y, Cb, Cr samples would be wrong pixels.
    path = tmp_path / "ycbcr.tif"
    tifffile.imwrite(path, ARRAYS["u8_3b"].transpose(1, 2, 0), photometric="rgb", compression="zlib")
    set_tag_value(path, "PhotometricInterpretation", 6)
    with pytest.raises(geotiff.DataError, match=f"{path}: YCbCr colour without JPEG compression .* not supported.*"
                                                "gdal_translate -co COMPRESS=DEFLATE") as err:
        geotiff.read_geotiff(path)
    assert "pip install" not in str(err.value)


@pytest.mark.parametrize("name", JPEG)
def test_old_style_jpeg_is_refused_with_a_conversion_command(tmp_path, name):
    # A GDAL JPEG file relabelled as old-style JPEG (compression 6): tifffile would decode its
    # streams, but on real old-style files its pixels differ from GDAL's, so no file of that
    # compression is read at all.
    path = tmp_path / "old_jpeg.tif"
    path.write_bytes((FIXTURES / name).read_bytes())
    set_tag_value(path, "Compression", 6)
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].compression == 6
    with pytest.raises(geotiff.DataError, match=f"{path}: old-style JPEG compression \\(TIFF compression 6\\) is not "
                                                "supported.*`gdal_translate -co COMPRESS=JPEG -co TILED=YES in.tif out.tif`"):
        geotiff.read_geotiff(path, window=(0, 0, 4, 4))
    with pytest.raises(geotiff.DataError, match="old-style JPEG"):
        geotiff.geotiff_info(path)


def test_out_of_memory_while_decoding_says_so(monkeypatch):
    def decode_without_memory(*args, **kwargs):
        raise MemoryError

    with geotiff.GeoTiff(FIXTURES / "u16_4b_tiled_deflate_pixel.tif") as tif:
        tif._decoder.batch = None  # the block-by-block path
        monkeypatch.setattr(tif._decoder.page, "decode", decode_without_memory)
        with pytest.raises(geotiff.DataError, match="u16_4b_tiled_deflate_pixel.tif: out of memory decoding tile 0") as err:
            tif.read((0, 0, 4, 4))
    assert not isinstance(err.value, geotiff.CorruptImageError)  # not a damaged file: skip_corrupt must not skip it
    with geotiff.GeoTiff(FIXTURES / "u16_4b_striped_lzw_band.tif") as tif:  # all blocks in one libtiff call
        monkeypatch.setattr(geotiff_decode.imagecodecs, "tiff_decode", decode_without_memory)
        with pytest.raises(geotiff.DataError, match="u16_4b_striped_lzw_band.tif: out of memory decoding a 21x41") as err:
            tif.read((0, 0, 20, 20))
    assert not isinstance(err.value, geotiff.CorruptImageError)


# --- damaged offset tables ---------------------------------------------------------------------


@pytest.mark.parametrize("name, source", [("u8_3b_striped_none_pixel_short_table", "u8_3b"),
                                          ("i16_3b_nodata_striped_deflate_pixel_short_table", "i16_3b_nodata")])
def test_strips_missing_from_a_short_offset_table_read_empty_as_in_gdal(name, source):
    # Pixel-interleaved strips: libtiff pads the table with empty entries, so GDAL returns the
    # missing strips as empty blocks: 0, or the nodata value (-9999) where the file has one.
    path = FIXTURES / f"{name}.tif"
    gdal = ARRAYS[f"gdal_decoded_{name}"]
    pixels = geotiff.read_geotiff(path)
    np.testing.assert_array_equal(pixels, gdal)
    kept = {"u8_3b": 4 * 9, "i16_3b_nodata": 3 * 8}[source]  # rows in the strips the table still lists
    np.testing.assert_array_equal(pixels[:, :kept], ARRAYS[source][:, :kept])
    assert np.unique(pixels[:, kept:]).tolist() == [0 if source == "u8_3b" else -9999]
    np.testing.assert_array_equal(geotiff.read_geotiff(path, window=(kept - 3, 5, 10, 7)),
                                  gdal[:, kept - 3:kept + 7, 5:12])


@pytest.mark.parametrize("name, block", [("u16_4b_tiled_deflate_pixel_short_table", "tile 5 is missing: the file's "
                                          "offset table lists 5 tiles of 9"),
                                         ("u16_4b_striped_lzw_band_short_table", "strip 10 is missing: the file's "
                                          "offset table lists 10 strips of 24")])
def test_blocks_missing_from_short_offset_table_of_tiles_or_band_planes_are_corrupt_as_in_gdal(name, block):
    # GDAL refuses these reads (make_fixtures.sh checks), as this reader does; blocks listed still read.
    path = FIXTURES / f"{name}.tif"
    with pytest.raises(geotiff.CorruptImageError, match=f"{path}: {block}; the file is truncated or corrupt"):
        geotiff.read_geotiff(path)
    np.testing.assert_array_equal(geotiff.read_geotiff(path, window=(0, 0, 16, 16), bands=[0]),
                                  ARRAYS["u16_4b"][:1, :16, :16])


def test_file_cut_inside_the_offset_table_is_corrupt(tmp_path):
    # tifffile drops an offset table that lies past the end of the file; read on, every strip
    # would look empty and the image would come back as zeros.
    source = FIXTURES / "u8_3b_striped_none_pixel.tif"
    with tifffile.TiffFile(source) as tif:
        table = tif.pages[0].tags["StripOffsets"].valueoffset  # 6 offsets of 4 bytes, after the IFD
    path = tmp_path / "cut_in_table.tif"
    path.write_bytes(source.read_bytes()[:table + 4])
    with pytest.raises(geotiff.CorruptImageError, match=f"{path}: the strip offset table is missing or lies past the end"):
        geotiff.read_geotiff(path)


def test_block_at_offset_zero_with_bytes_is_corrupt(tmp_path):
    # Offset 0 is the TIFF header; GDAL fails to decode such a block (or returns the header's
    # bytes as pixels, uncompressed), while byte count 0 is an empty block (test above).
    path = tmp_path / "offset0.tif"
    path.write_bytes((FIXTURES / "u16_4b_tiled_deflate_pixel.tif").read_bytes())
    set_tag_value(path, "TileOffsets", 0, index=2)
    with pytest.raises(geotiff.CorruptImageError, match=f"{path}: tile 2 has .* bytes at offset 0, inside the TIFF header"):
        geotiff.read_geotiff(path)


# --- predictor, LERC -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["u16_4b_striped_none_predictor2", "u16_4b_striped_packbits_predictor2"])
def test_predictor_tag_without_a_codec_that_uses_it_is_ignored_as_in_libtiff(name):
    with tifffile.TiffFile(FIXTURES / f"{name}.tif") as tif:
        assert tif.pages[0].predictor == 2  # the fixture really carries the tag
    pixels = geotiff.read_geotiff(FIXTURES / f"{name}.tif")
    np.testing.assert_array_equal(pixels, ARRAYS[f"gdal_decoded_{name}"])
    np.testing.assert_array_equal(pixels, ARRAYS["u16_4b"])  # GDAL returned the stored samples
    np.testing.assert_array_equal(geotiff.read_geotiff(FIXTURES / f"{name}.tif", window=(3, 4, 9, 10), bands=[2]),
                                  ARRAYS["u16_4b"][2:3, 3:12, 4:14])


@pytest.mark.parametrize("name", ["f32_1b_tiled_lerc", "f32_3b_striped_lerc_deflate_band", "f32_3b_tiled_lerc_zstd_pixel"])
def test_lerc_reads_as_gdal_nan_included(name):
    gdal = ARRAYS[f"gdal_decoded_{name}"]
    pixels = geotiff.read_geotiff(FIXTURES / f"{name}.tif")
    assert pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels, gdal)  # NaN where GDAL has NaN (LERC's mask), not 0.0
    np.testing.assert_array_equal(geotiff.read_geotiff(FIXTURES / f"{name}.tif", window=(15, 30, 5, 6)),
                                  gdal[:, 15:20, 30:36])
    source = ARRAYS["f32_3b"][2:] if name == "f32_1b_tiled_lerc" else ARRAYS["f32_3b"]
    if name.endswith("_pixel"):
        # GDAL stores the NaN of pixel-interleaved LERC blocks as -FLT_MAX; everything else is exact.
        assert pixels[2, 17, 33] == np.finfo(np.float32).min
        source = np.nan_to_num(source, nan=np.finfo(np.float32).min)
    np.testing.assert_array_equal(pixels, source)


@pytest.mark.parametrize("photometric, bands", [("separated", 4), ("cielab", 3)])
def test_cmyk_and_lab_read_as_their_stored_samples(tmp_path, photometric, bands):
    # What GDAL returns under GTIFF_RAW: (plain GDAL converts both to RGBA); no colour conversion here.
    samples = np.random.default_rng(bands).integers(0, 256, (20, 24, bands), dtype=np.uint8)
    path = tmp_path / f"{photometric}.tif"
    tifffile.imwrite(path, samples, photometric=photometric, compression="zlib")
    np.testing.assert_array_equal(geotiff.read_geotiff(path), samples.transpose(2, 0, 1))


# --- what other writers write: layouts GDAL (libtiff) reads, found in public TIFF test suites ----------


def rename_tag(path, old, new):
    """Give `path`'s first-IFD entry `old` the tag code `new`, in place (tifffile refuses to write some tags)."""
    raw = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        entry, byteorder = tif.pages[0].tags[old], tif.byteorder
    assert not tif.is_bigtiff
    raw[entry.offset:entry.offset + 2] = new.to_bytes(2, "little" if byteorder == "<" else "big")
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("compression", [None, "lzw", "zlib"])
@pytest.mark.parametrize("layout", ["strips", "tiles"])
def test_fill_order_2_bytes_are_bit_reversed_before_decoding_as_in_libtiff(tmp_path, compression, layout):
    # FillOrder 2 (tag 266): every byte of every block is stored with its bits in reverse order.
    pixels = np.random.default_rng(7).integers(0, 65535, (40, 48, 3), dtype=np.uint16)
    path = tmp_path / "fill_order_2.tif"
    tifffile.imwrite(path, pixels, photometric="rgb", compression=compression, predictor=compression is not None,
                     extratags=[(269, "H", 1, 2, True)], **({"tile": (16, 16)} if layout == "tiles" else
                                                            {"rowsperstrip": 8}))
    rename_tag(path, 269, 266)  # tifffile writes no FillOrder tag; it writes a DocumentName of 2 instead
    raw = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].fillorder == 2
        blocks = list(zip(tif.pages[0].dataoffsets, tif.pages[0].databytecounts))
    for offset, count in blocks:  # each byte's bits in reverse order: unpacked first bit first, packed last first
        block_bits = np.unpackbits(np.frombuffer(raw[offset:offset + count], np.uint8))
        raw[offset:offset + count] = np.packbits(block_bits, bitorder="little").tobytes()
    path.write_bytes(bytes(raw))
    expected = pixels.transpose(2, 0, 1)
    np.testing.assert_array_equal(geotiff.read_geotiff(path), expected)
    np.testing.assert_array_equal(geotiff.read_geotiff(path, window=(5, 7, 30, 33), bands=[2, 0]),
                                  expected[[2, 0], 5:35, 7:40])


@pytest.mark.parametrize("compression", [None, "zlib", "lzw", "packbits"])
def test_one_bit_samples_read_as_uint8_zeros_and_ones_as_in_gdal(tmp_path, compression):
    bits = np.random.default_rng(1).random((37, 45)) < 0.3
    path = tmp_path / "bilevel.tif"
    tifffile.imwrite(path, bits, compression=compression, rowsperstrip=8)
    assert geotiff.geotiff_info(path).dtype == np.uint8
    pixels = geotiff.read_geotiff(path)
    assert pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, bits[None].astype(np.uint8))
    np.testing.assert_array_equal(geotiff.read_geotiff(path, window=(3, 9, 20, 30)), pixels[:, 3:23, 9:39])


def test_ccitt_group4_zero_length_runs_decode_as_in_libtiff(tmp_path):
    # A Group 4 row may hold a horizontal code of two empty runs, H(0, 0) (some fax software writes them).
    # libtiff keeps them as colour changes of the reference line, so the next row's pass code stops at
    # column 0; imagecodecs' own decoder saw no change there, passed to the row's end, and lost the row.
    # Hand-coded 8x2 image: row 0 = H(0, 0), V0 (white to the end); row 1 = pass, H(3 white, 2 black), V0.
    codes = "001" + "00110101" + "0000110111" + "1" + "0001" + "001" + "1000" + "11" + "1" + "000000000001" * 2
    codes += "0" * (-len(codes) % 8)
    strip = bytes(int(codes[i:i + 8], 2) for i in range(0, len(codes), 8))
    entries = [(256, 3, 8), (257, 3, 2), (258, 3, 1), (259, 3, 4), (262, 3, 0), (273, 4, 8), (277, 3, 1),
               (278, 3, 2), (279, 4, len(strip))]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHI" + ("Hxx" if kind == 3 else "I"), tag, kind, 1,
                                                                 value) for tag, kind, value in entries) + bytes(4)
    path = tmp_path / "group4_empty_runs.tif"
    path.write_bytes(b"II*\0" + struct.pack("<I", 8 + len(strip) + len(strip) % 2) + strip + bytes(len(strip) % 2) + ifd)
    expected = np.array([[[0, 0, 0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0, 0]]], np.uint8)  # 1: black (min-is-white)
    np.testing.assert_array_equal(geotiff.read_geotiff(path), expected)


@pytest.mark.parametrize("compression, predictor", [(None, None), ("zlib", None), ("lzw", 3), ("zlib", 3)])
@pytest.mark.parametrize("layout", ["strips", "tiles"])
def test_float16_reads_as_float32_as_in_gdal(tmp_path, compression, predictor, layout):
    values = np.random.default_rng(2).normal(0, 100, (2, 33, 40)).astype(np.float16)
    values[0, 3, 4], values[1, 30, 39] = np.nan, np.inf
    path = tmp_path / "half.tif"
    tifffile.imwrite(path, values, photometric="minisblack", planarconfig="separate", compression=compression,
                     predictor=predictor, **({"tile": (16, 16)} if layout == "tiles" else {"rowsperstrip": 8}))
    assert geotiff.geotiff_info(path).dtype == np.float32
    pixels = geotiff.read_geotiff(path)
    assert pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels, values.astype(np.float32))
    np.testing.assert_array_equal(geotiff.read_geotiff(path, window=(20, 5, 13, 30), bands=[1]),
                                  values[[1], 20:33, 5:35].astype(np.float32))


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_tiles_listed_in_the_strip_tags_are_read_as_in_libtiff(tmp_path, compression):
    # Some writers put a tiled file's block table in StripOffsets/StripByteCounts (273, 279).
    pixels = np.random.default_rng(3).integers(0, 255, (40, 50), dtype=np.uint8)
    path = tmp_path / "tiles_in_strip_tags.tif"
    tifffile.imwrite(path, pixels, tile=(16, 16), compression=compression)
    rename_tag(path, 324, 273)
    rename_tag(path, 325, 279)
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].is_tiled and 324 not in tif.pages[0].tags
    np.testing.assert_array_equal(geotiff.read_geotiff(path), pixels[None])
    np.testing.assert_array_equal(geotiff.read_geotiff(path, window=(17, 3, 20, 40)), pixels[None, 17:37, 3:43])


@pytest.mark.parametrize("predictor", [None, 2])
def test_deflate_last_strip_holding_more_rows_than_the_image_reads_as_in_libtiff(tmp_path, predictor):
    # GDAL used to write the last strip of a DEFLATE file whole (all RowsPerStrip rows); libtiff reads
    # the rows the image has from it. Here: 32 rows written in strips of 16, the header then saying 20.
    pixels = np.random.default_rng(4).integers(0, 65535, (32, 24, 2), dtype=np.uint16)
    path = tmp_path / "long_last_strip.tif"
    tifffile.imwrite(path, pixels, photometric="minisblack", planarconfig="contig", extrasamples=[0],
                     compression="zlib", predictor=predictor, rowsperstrip=16)
    set_tag_value(path, "ImageLength", 20)
    expected = pixels[:20].transpose(2, 0, 1)
    np.testing.assert_array_equal(geotiff.read_geotiff(path), expected)
    np.testing.assert_array_equal(geotiff.read_geotiff(path, window=(15, 2, 5, 20)), expected[:, 15:20, 2:22])


def test_uncompressed_strip_with_a_byte_count_past_the_end_reads_its_rows_as_in_libtiff(tmp_path):
    # A bogus StripByteCounts (here 35 MB in a 10 KB file): libtiff takes the strip's size from its rows.
    pixels = np.random.default_rng(5).integers(0, 255, (50, 40, 4), dtype=np.uint8)
    path = tmp_path / "bogus_count.tif"
    tifffile.imwrite(path, pixels, photometric="rgb", extrasamples=[0], rowsperstrip=50)
    set_tag_value(path, "StripByteCounts", 35_711_440)
    np.testing.assert_array_equal(geotiff.read_geotiff(path), pixels.transpose(2, 0, 1))
    # Cut inside the strip: the rows still in the file read, the others are named missing.
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[0].dataoffsets[0]
    path.write_bytes(path.read_bytes()[:offset + 30 * 40 * 4])
    np.testing.assert_array_equal(geotiff.read_geotiff(path, window=(0, 0, 30, 40)), pixels[:30].transpose(2, 0, 1))
    with pytest.raises(geotiff.CorruptImageError, match=f"{path}: truncated: segment 0 needs bytes up to"):
        geotiff.read_geotiff(path, window=(25, 0, 10, 40))


# --- memory limits -------------------------------------------------------------------------------


def test_full_read_of_huge_header_is_refused_before_allocating():
    path = FIXTURES / "u16_1b_huge_sparse.tif"  # 100000 x 100000 uint16, all sparse tiles: 8 KB on disk
    assert geotiff.geotiff_info(path).height == 100000
    with pytest.raises(geotiff.DataError, match=f"{path}: this read would return 18.6 GiB \\(1 band x 100000 x 100000 "
                                                "uint16\\), more than geotiff.MAX_READ_BYTES = 4 GiB; read a window"):
        geotiff.read_geotiff(path)
    tracemalloc.start()
    try:
        window = geotiff.read_geotiff(path, window=(50000, 99000, 200, 300))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(window, ARRAYS["gdal_decoded_u16_1b_huge_sparse"])
    assert peak < window.nbytes + 2**16  # empty tiles cost nothing: not 200 rows of a 4096-wide tile (1.6 MB)


def test_read_limit_is_the_module_constant(monkeypatch):
    path = FIXTURES / "u16_4b_tiled_deflate_pixel.tif"  # 4 x 37 x 41 uint16 = 12136 bytes
    monkeypatch.setattr(geotiff, "MAX_READ_BYTES", 12135)
    with pytest.raises(geotiff.DataError, match=f"{path}: this read would return 11.9 KiB \\(4 bands x 37 x 41 uint16"):
        geotiff.read_geotiff(path)
    np.testing.assert_array_equal(geotiff.read_geotiff(path, bands=[0, 1, 2]), ARRAYS["u16_4b"][:3])
    monkeypatch.setattr(geotiff, "MAX_READ_BYTES", 12136)
    np.testing.assert_array_equal(geotiff.read_geotiff(path), ARRAYS["u16_4b"])


def single_strip_scene(path, compression=None, byteorder="<"):
    """A 2048 x 2048 x 2 uint16 scene (16 MiB) stored as one strip."""
    scene = np.random.default_rng(5).integers(0, 4000, (2048, 2048, 2), dtype=np.uint16)
    tifffile.imwrite(path, scene, rowsperstrip=2048, compression=compression, byteorder=byteorder,
                     photometric="minisblack", planarconfig="contig")
    return scene.transpose(2, 0, 1)


def test_window_of_a_compressed_block_bigger_than_the_limit_is_refused(tmp_path, monkeypatch):
    # A 64x64 window of one zlib strip would decode all of it; past MAX_BLOCK_BYTES that is refused.
    path = tmp_path / "one_strip.tif"
    scene = single_strip_scene(path, compression="zlib")
    monkeypatch.setattr(geotiff, "MAX_BLOCK_BYTES", 8 * 2**20)
    with pytest.raises(geotiff.DataError, match=f"{path}: strip 0 \\(2048x2048 pixels\\) is too big to read: decoding "
                                                "it takes 16 MiB, more than geotiff.MAX_BLOCK_BYTES = 8 MiB.*"
                                                "gdal_translate -co TILED=YES"):
        geotiff.read_geotiff(path, window=(100, 100, 64, 64))
    monkeypatch.setattr(geotiff, "MAX_BLOCK_BYTES", 16 * 2**20)
    np.testing.assert_array_equal(geotiff.read_geotiff(path, window=(100, 100, 64, 64)), scene[:, 100:164, 100:164])


@pytest.mark.parametrize("byteorder", ["<", ">"])
def test_window_of_an_uncompressed_strip_reads_only_its_rows(tmp_path, monkeypatch, byteorder):
    path = tmp_path / "one_strip.tif"
    scene = single_strip_scene(path, byteorder=byteorder)
    # raising=False: without the limit, the peak memory below is what must fail
    monkeypatch.setattr(geotiff, "MAX_BLOCK_BYTES", 2**20, raising=False)  # 1/16 of the strip: 128 of its rows
    tracemalloc.start()
    try:
        window = geotiff.read_geotiff(path, window=(1000, 7, 64, 64), bands=[1])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(window, scene[1:, 1000:1064, 7:71])
    assert window.dtype.isnative
    assert peak < 4 * 64 * 2048 * 2 * 2  # a few copies of the 64 rows it needs (512 KiB), not the 16 MiB strip
    np.testing.assert_array_equal(geotiff.read_geotiff(path, window=(2040, 2000, 8, 48)), scene[:, 2040:, 2000:])
    # Taller reads go 128 rows at a time: a full read costs its result and little more.
    tracemalloc.start()
    try:
        full = geotiff.read_geotiff(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(full, scene)
    assert peak < full.nbytes + 5 * 2**20  # the result, and a chunk or two (1 MiB each) with their copies
    monkeypatch.setattr(geotiff, "MAX_BLOCK_BYTES", 2048 * 2 * 2 - 1)
    with pytest.raises(geotiff.DataError, match=f"{path}: one row of strip 0 is 8 KiB .*MAX_BLOCK_BYTES = 8 KiB"):
        geotiff.read_geotiff(path, window=(0, 0, 1, 1))


# --- fuzzing ---------------------------------------------------------------------------------------


def expected_pixels(name):
    """What `name` holds: its source array, or GDAL's reading of it; None where GDAL refuses it."""
    if name in LOSSLESS:
        return ARRAYS[LOSSLESS[name][0]]
    return ARRAYS.get(f"gdal_decoded_{name[:-4]}")


FUZZ_FILES = sorted(path.name for path in FIXTURES.glob("*.tif"))


def read_damaged(path):
    """`path` read whole and in a window: the whole image, or None for a DataError. Any other
    exception fails the test, and so does a window that differs from the whole image's."""
    try:
        info = geotiff.geotiff_info(path)
    except geotiff.DataError:
        return None
    row, col = info.height // 3, info.width // 4
    window = (row, col, min(info.height - row, 300), min(info.width - col, 300))
    try:
        part = geotiff.read_geotiff(path, window=window)
    except geotiff.DataError:
        part = None
    try:
        pixels = geotiff.read_geotiff(path)
    except geotiff.DataError:
        return None
    assert pixels.shape == (info.bands, info.height, info.width) and pixels.dtype == info.dtype
    np.testing.assert_array_equal(part, pixels[:, row:row + window[2], col:col + window[3]])
    return pixels


@pytest.mark.parametrize("name", FUZZ_FILES)
def test_fuzzed_files_give_data_errors_or_right_pixels(tmp_path, name):
    # Damaged copies of each fixture: truncated at 12 places, and 40 single bytes replaced. A
    # read must raise DataError (CorruptImageError included) or return pixels; a truncated
    # file that reads at all must read exactly, and so must a DEFLATE file whose damage lies in
    # its compressed bytes (zlib's checksum catches any change there).
    raw = (FIXTURES / name).read_bytes()
    expected = expected_pixels(name)
    rng = np.random.default_rng(sum(raw[:4096]))  # a seed per file, the same on every run
    with tifffile.TiffFile(FIXTURES / name) as tif:
        page = tif.pages[0]
        data_bytes = [range(o, o + n) for o, n in zip(page.dataoffsets, page.databytecounts)]
        checksummed = page.compression in (8, 32946)
    path = tmp_path / name
    for cut in sorted(rng.integers(8, len(raw), 12)):
        path.write_bytes(raw[:cut])
        pixels = read_damaged(path)
        if pixels is not None:
            assert expected is not None, f"{name} cut at {cut} read, where GDAL refuses even the whole file"
            np.testing.assert_array_equal(pixels, expected, err_msg=f"{name} cut at {cut}")
    for position, value in zip(rng.integers(0, len(raw), 40), rng.integers(0, 256, 40)):
        damaged = bytearray(raw)
        damaged[position] = value
        path.write_bytes(bytes(damaged))
        pixels = read_damaged(path)
        if pixels is not None and checksummed and any(position in block for block in data_bytes):
            np.testing.assert_array_equal(pixels, expected, err_msg=f"{name} byte {position} = {value}")


@pytest.mark.parametrize("name", YCBCR_JPEG)
def test_fuzzed_ycbcr_jpeg_as_libjpeg9_gives_data_errors_or_pixels(tmp_path, name, monkeypatch):
    # The libjpeg 9 path parses and rewrites each block's JPEG header itself: damage there must end
    # as a DataError too, never another exception, and a truncated file that reads reads right.
    monkeypatch.setattr(geotiff, "JPEG_CHROMA_UPSAMPLING", "libjpeg9")
    raw = (FIXTURES / name).read_bytes()
    expected = geotiff.read_geotiff(FIXTURES / name)
    rng = np.random.default_rng(sum(raw[:4096]) + 9)
    path = tmp_path / name
    for cut in sorted(rng.integers(8, len(raw), 8)):
        path.write_bytes(raw[:cut])
        pixels = read_damaged(path)
        if pixels is not None:
            np.testing.assert_array_equal(pixels, expected, err_msg=f"{name} cut at {cut}")
    with tifffile.TiffFile(FIXTURES / name) as tif:
        first_block = tif.pages[0].dataoffsets[0]
    for position, value in zip(rng.integers(first_block, first_block + 400, 40), rng.integers(0, 256, 40)):
        damaged = bytearray(raw)  # the first block's headers and the start of its data
        damaged[position] = value
        path.write_bytes(bytes(damaged))
        read_damaged(path)


def test_jpeg_header_larger_than_its_tile_is_corrupt_not_allocated(tmp_path):
    # libjpeg would allocate what the JPEG frame header says: 65000 x 65000 x 3 = 12 GB here.
    path = tmp_path / "jpeg_bomb.tif"
    raw = bytearray((FIXTURES / "u8_3b_tiled_jpeg.tif").read_bytes())
    with tifffile.TiffFile(FIXTURES / "u8_3b_tiled_jpeg.tif") as tif:
        start = tif.pages[0].dataoffsets[0]
    frame = raw.index(b"\xff\xc0", start)  # baseline frame header: length, precision, height, width
    raw[frame + 5:frame + 9] = (65000).to_bytes(2, "big") * 2
    path.write_bytes(bytes(raw))
    with pytest.raises(geotiff.CorruptImageError, match=f"{path}: tile 0 is a 65000x65000 JPEG, larger than the 16x16"):
        geotiff.read_geotiff(path, window=(0, 0, 4, 4))
    np.testing.assert_array_equal(geotiff.read_geotiff(path, window=(16, 16, 4, 4)),
                                  geotiff.read_geotiff(FIXTURES / "u8_3b_tiled_jpeg.tif", window=(16, 16, 4, 4)))


def test_lerc_deflate_bomb_is_corrupt_without_inflating_it(tmp_path):
    # Tile 0 of a LERC_DEFLATE file replaced by 64 MiB of zeros deflated to 64 KiB, appended to the file.
    path = tmp_path / "lerc_bomb.tif"
    bomb = zlib.compress(bytes(64 * 2**20), 9)
    path.write_bytes((FIXTURES / "f32_3b_striped_lerc_deflate_band.tif").read_bytes() + bomb)
    set_tag_value(path, "StripOffsets", path.stat().st_size - len(bomb))
    set_tag_value(path, "StripByteCounts", len(bomb))
    tracemalloc.start()
    try:
        with pytest.raises(geotiff.CorruptImageError, match=f"{path}: segment 0 failed to decode"):
            geotiff.read_geotiff(path, window=(0, 0, 2, 2))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20  # a 5-row strip's worth, not 64 MiB
