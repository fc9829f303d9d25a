"""Tests for geotiff.py: GDAL-written fixtures read exactly, windows and bands, errors.

The fixtures in tests/fixtures were written by GDAL (see make_fixtures.sh) from the arrays
in arrays.npz, so every pixel comparison here is against an independent writer.
"""

import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile

import geotiff

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
}
JPEG = ["u8_3b_tiled_jpeg.tif", "u8_3b_striped_jpeg_ycbcr.tif"]


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
    assert pixels.shape == gdal.shape == (3, 48, 64)
    assert np.abs(pixels - gdal).max() <= 2  # libjpeg builds differ by rounding only
    assert np.abs(pixels - ARRAYS["u8_3b"]).mean() < 3  # and it is the picture we encoded


WINDOW_FILES = ["u16_4b_tiled_deflate_pixel.tif", "u16_4b_striped_lzw_band.tif", "u16_4b_tiled_zstd_band.tif",
                "u16_4b_striped_packbits_pixel.tif", "f32_3b_tiled_deflate_pred3_pixel.tif", "u8_3b_tiled_jpeg.tif",
                "u8_3b_striped_jpeg_ycbcr.tif"]


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
                                        ("int16", "nan"), ("float16", "70000"), ("float32", "1e40")])
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


def test_unsupported_compression_says_what_helps(tmp_path):
    path = tmp_path / "odd.tif"
    tifffile.imwrite(path, np.zeros((16, 16), np.uint16), compression="zlib")
    raw = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        tag = tif.pages[0].tags["Compression"]
    raw[tag.valueoffset:tag.valueoffset + 2] = (60000).to_bytes(2, "little")  # no codec has this number
    path.write_bytes(bytes(raw))
    with pytest.raises(geotiff.DataError, match=f"{path}: compression .* imagecodecs.*gdal_translate -co COMPRESS=DEFLATE"):
        geotiff.read_geotiff(path)
