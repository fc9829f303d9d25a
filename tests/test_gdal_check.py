"""Tests for tools/gdal_check.py: the verdicts against a stand-in for GDAL (the exact arrays the fixtures
were made from, or GDAL's own decoding of them, stored in arrays.npz), and the worker loop's timeouts and
crashes with stand-in workers. GDAL itself is not needed here."""

import os
import sys
import time

import numpy as np

import gdal_check
import geotiff

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
ARRAYS = dict(np.load(os.path.join(FIXTURES, "arrays.npz")))


def reference(pixels):
    """An open_reference for check_file that reads `pixels` (bands, rows, cols) as GDAL would."""
    def open_reference(path):
        header = dict(bands=pixels.shape[0], height=pixels.shape[1], width=pixels.shape[2],
                      itemsize=pixels.dtype.itemsize)

        def read(window=None, bands=None):
            selected = pixels if bands is None else pixels[bands]
            if window is None:
                return selected
            row, col, height, width = window
            return selected[:, row:row + height, col:col + width]
        return header, read, lambda: None
    return open_reference


def refuses(path):
    raise RuntimeError("not recognized as a supported file format")


def fixture(name):
    return os.path.join(FIXTURES, name)


def test_verdicts_against_a_stand_in_for_gdal(tmp_path, monkeypatch):
    exact = ARRAYS["u16_4b"]
    assert gdal_check.check_file(fixture("u16_4b_tiled_deflate_pixel.tif"), reference(exact))["verdict"] == "match"

    changed = exact.copy()
    changed[2, 30, 35] += 7  # in the window and the band subset too; the whole image is read first
    record = gdal_check.check_file(fixture("u16_4b_tiled_deflate_pixel.tif"), reference(changed))
    assert (record["verdict"], record["read"], record["max_difference"]) == ("differ", "image", 7.0)
    assert record["first"] == dict(at=(2, 30, 35), gdal=int(changed[2, 30, 35]), geofm=int(exact[2, 30, 35]))

    record = gdal_check.check_file(fixture("u16_4b_tiled_deflate_pixel.tif"), reference(exact.astype(np.int32)))
    assert record["verdict"] == "differ" and "GDAL int32" in record["why"]

    assert gdal_check.check_file(fixture("u16_4b_tiled_deflate_pixel.tif"), refuses)["verdict"] == "gdal refuses"

    damaged = tmp_path / "cut.tif"
    damaged.write_bytes(open(fixture("u16_4b_tiled_deflate_pixel.tif"), "rb").read()[:400])
    assert gdal_check.check_file(str(damaged), refuses)["verdict"] == "both refuse"
    record = gdal_check.check_file(str(damaged), reference(exact))
    assert record["verdict"] == "geofm refuses" and "truncated" in record["error"]

    # JPEG within the tolerance of GDAL's libjpeg-turbo pixels, not without it.
    jpeg = "u8_3b_aerial_tiled_jpeg_ycbcr"
    turbo, libjpeg9 = reference(ARRAYS[f"gdal_decoded_{jpeg}"]), reference(ARRAYS[f"libjpeg9_decoded_{jpeg}"])
    assert gdal_check.check_file(fixture(f"{jpeg}.tif"), turbo)["verdict"] == "match"
    assert gdal_check.check_file(fixture(f"{jpeg}.tif"), libjpeg9)["verdict"] == "differ"
    monkeypatch.setattr(geotiff, "JPEG_CHROMA_UPSAMPLING", "libjpeg9")
    assert gdal_check.check_file(fixture(f"{jpeg}.tif"), libjpeg9)["verdict"] == "match"

    def broken(*args, **kwargs):
        raise IndexError("list index out of range")
    monkeypatch.setattr(geotiff, "read_geotiff", broken)
    record = gdal_check.check_file(fixture("u16_4b_tiled_deflate_pixel.tif"), reference(exact))
    assert record["verdict"] == "geofm error" and record["error"] == "IndexError: list index out of range"


def test_files_are_found_by_their_first_bytes(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "scene.dat").write_bytes(open(fixture("u8_3b_striped_none_pixel.tif"), "rb").read())
    (tmp_path / "notes.tif").write_text("not an image")
    assert gdal_check.find_tiffs(str(tmp_path)) == [str(tmp_path / "sub" / "scene.dat")]


def stand_in_worker(connection, libjpeg9, jpeg_tolerance):
    """A worker that hangs on files named 'hang', dies on 'crash', and calls the rest a match."""
    connection.send("ready")
    while (path := connection.recv()) is not None:
        if path.endswith("hang"):
            time.sleep(3600)
        if path.endswith("crash"):
            os._exit(7)
        connection.send(dict(path=path, verdict="match"))


def test_a_file_that_hangs_or_kills_its_worker_costs_only_itself(monkeypatch):
    monkeypatch.setattr(gdal_check, "_worker", stand_in_worker)
    paths = ["a", "hang", "b", "crash", "c", "d"]
    # Time counts from a started worker's taking the file: the stand-ins answer at once, or never.
    records = {r["path"]: r for r in gdal_check.check_all(paths, workers=2, timeout=3, libjpeg9=False,
                                                          jpeg_tolerance=2)}
    assert sorted(records) == sorted(paths)
    assert records["hang"] == dict(path="hang", verdict="timeout", seconds=3)
    assert records["crash"] == dict(path="crash", verdict="crash", exitcode=7)
    assert all(records[p]["verdict"] == "match" for p in "abcd")


def test_main_without_rasterio_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "rasterio", None)  # import rasterio now fails
    assert gdal_check.main([str(tmp_path)]) == 2
    assert "pip install rasterio" in capsys.readouterr().err
