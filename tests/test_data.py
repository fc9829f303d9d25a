"""Tests for data.py: read_image, statistics, normalisation, datasets, sampler, scene splits.

The GeoTIFF reader itself (geotiff.py) is tested in test_geotiff.py, whose GDAL-written
fixtures (tests/fixtures) these tests share.
"""

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import data
import geotiff
import train
from test_geotiff import ARRAYS, FIXTURES, make_tile_sparse, truncated_copy


# --- read_image --------------------------------------------------------------------------------


def test_read_image_jpeg_png_and_tiff(tmp_path):
    rgb = ARRAYS["u8_3b"].transpose(1, 2, 0)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(np.array([[1, 60000]], dtype=np.uint16)).save(tmp_path / "u16.png")
    np.testing.assert_array_equal(data.read_image(tmp_path / "a.png"), ARRAYS["u8_3b"])
    gray = data.read_image(tmp_path / "gray.png")
    np.testing.assert_array_equal(gray, ARRAYS["u8_3b"][:1])
    assert gray.flags.writeable and data.read_image(tmp_path / "a.png").flags.writeable
    jpeg = data.read_image(tmp_path / "a.jpg")
    assert jpeg.shape == (3, 48, 64) and np.abs(jpeg.astype(int) - ARRAYS["u8_3b"]).mean() < 3
    assert data.read_image(tmp_path / "u16.png").tolist() == [[[1, 60000]]]
    np.testing.assert_array_equal(data.read_image(FIXTURES / "u16_13b_tiled_deflate_band.tif"), ARRAYS["u16_13b"])


def test_one_reader_for_png_and_geotiff_windows_and_bands(tmp_path):
    # The same pixels as PNG and as GeoTIFF: the same info, windows and band selections.
    Image.fromarray(ARRAYS["u8_3b"].transpose(1, 2, 0)).save(tmp_path / "a.png")
    tifffile.imwrite(tmp_path / "a.tif", ARRAYS["u8_3b"], photometric="rgb", planarconfig="separate")
    for name in ("a.png", "a.tif"):
        with data.open_image(tmp_path / name) as image:
            info = image.info
            assert (info.bands, info.height, info.width, info.dtype, info.nodata) == (3, 48, 64, np.uint8, None)
            np.testing.assert_array_equal(image.read((5, 7, 10, 20), [2, 0]), ARRAYS["u8_3b"][[2, 0], 5:15, 7:27])
            with pytest.raises(data.DataError, match=f"{name}: window .* is not inside the 48x64 image"):
                image.read((40, 0, 10, 10))
            with pytest.raises(data.DataError, match=f"{name}: band indices \\[3\\] out of range"):
                image.read(bands=[3])
    with pytest.raises(data.DataError, match="missing.png: no such file"):
        data.read_image(tmp_path / "missing.png")


def test_read_image_bad_input_names_the_file(tmp_path):
    text = tmp_path / "notes.tif"
    text.write_text("not an image at all\n")
    with pytest.raises(data.CorruptImageError, match=f"{text}: not an image"):
        data.read_image(text)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(data.CorruptImageError, match=f"{empty}: empty"):
        data.read_image(empty)
    cut_jpeg = tmp_path / "cut.jpg"
    Image.fromarray(ARRAYS["u8_3b"].transpose(1, 2, 0)).save(tmp_path / "whole.jpg")
    cut_jpeg.write_bytes((tmp_path / "whole.jpg").read_bytes()[:400])
    with pytest.raises(data.CorruptImageError, match=str(cut_jpeg)):
        data.read_image(cut_jpeg)


# --- statistics and normalisation ----------------------------------------------------------------


def test_stats_are_nodata_aware_and_cli_writes_them(tmp_path, capsys):
    paths = [FIXTURES / "i16_3b_nodata_tiled_zstd_pixel.tif", FIXTURES / "i16_3b_nodata_striped_deflate_band.tif"]
    manifest = tmp_path / "manifest.txt"
    manifest.write_text("# two copies of the same pixels\n" + "\n".join(os.path.relpath(p, tmp_path) for p in paths) + "\n")
    assert data.main(["stats", str(manifest), "--out", str(tmp_path / "stats.json")]) == 0
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert "2/2 files" in capsys.readouterr().err  # progress output
    source = ARRAYS["i16_3b_nodata"].astype(float)
    for b in range(3):
        valid = source[b][source[b] != -9999]
        assert stats["pixels"][b] == 2 * valid.size
        np.testing.assert_allclose([stats["mean"][b], stats["std"][b]], [valid.mean(), valid.std()], rtol=1e-9)
        assert (stats["min"][b], stats["max"][b]) == (valid.min(), valid.max())
    assert stats["nodata"] == -9999 and data.load_stats(tmp_path / "stats.json") == (stats["mean"], stats["std"])


def test_stats_cli_errors_are_one_line(tmp_path, capsys):
    assert data.main(["stats", str(FIXTURES), "--out", str(tmp_path / "s.json"), "--max-files", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --max-files must be positive, got 0"
    assert data.main(["stats", str(tmp_path / "missing"), "--out", str(tmp_path / "s.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "missing" in err and "Traceback" not in err
    assert not (tmp_path / "s.json").exists()


def test_manifest_comments_are_whole_lines_and_paths_may_hold_hashes(tmp_path):
    (tmp_path / "run #2").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / "run #2" / "a#1.png")
    manifest = tmp_path / "list.txt"
    manifest.write_text("# the chips\n   # indented comment\n\nrun #2/a#1.png\n")
    assert data.list_images(manifest) == [str(tmp_path / "run #2" / "a#1.png")]


def test_stats_and_normalizer_agree_on_float_nodata(tmp_path):
    # GDAL writes the nodata tag as decimal text; 0.1 is not exactly a float32, so the pixels
    # equal to it must be compared in the file's dtype, as the Normalizer does.
    pixels = np.array([[0.1, 1.0, 3.0]], np.float32)
    tifffile.imwrite(tmp_path / "f.tif", pixels, extratags=[(geotiff.GDAL_NODATA_TAG, "s", 0, "0.1", True)])
    stats = data.compute_stats([str(tmp_path / "f.tif")], progress=False)
    assert stats["pixels"] == [2] and stats["mean"] == [2.0] and stats["min"] == [1.0]
    image, nodata = data.read_image(tmp_path / "f.tif"), data.geotiff_info(tmp_path / "f.tif").nodata
    normalized = data.Normalizer(write_stats(tmp_path / "s.json", [2.0], [1.0]))(image, "f.tif", 1, None, nodata)
    assert normalized.tolist() == [[[0.0, -1.0, 1.0]]]


def test_load_stats_rejects_bad_files(tmp_path):
    for name, mean, std, bad in [("zero", [1.0, 2.0], [1.0, 0.0], "band 1 has std 0.0"),
                                 ("negative", [1.0, 2.0], [-1.0, 3.0], "band 0 has std -1.0"),
                                 ("nan_std", [1.0, 2.0], [1.0, float("nan")], "band 1 has std nan"),
                                 ("inf_mean", [float("inf"), 2.0], [1.0, 1.0], "band 0 has mean inf")]:
        (tmp_path / f"{name}.json").write_text(json.dumps({"mean": mean, "std": std}))  # NaN written as JSON's NaN
        with pytest.raises(ValueError, match=f"{name}.json: {bad}.*python data.py stats"):
            data.load_stats(tmp_path / f"{name}.json")
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(data.DataError, match="junk.json: not a statistics file.*python data.py stats"):
        data.load_stats(tmp_path / "junk.json")


def write_stats(path, mean, std):
    path.write_text(json.dumps({"mean": mean, "std": std}))
    return str(path)


def test_normalisation_nodata_nan_and_imagenet_fallback(tmp_path):
    stats = write_stats(tmp_path / "s.json", [10.0, 20.0, 30.0], [2.0, 4.0, 5.0])
    normalize = data.Normalizer(stats)
    pixels = np.array([[[12, -9999]], [[20, 28]], [[35, 30]]], dtype=np.int16)
    x = normalize(pixels, "a.tif", 3, None, nodata=-9999)
    assert x.dtype == torch.float32 and x.tolist() == [[[1.0, 0.0]], [[0.0, 2.0]], [[1.0, 0.0]]]
    floats = np.array([[[np.nan, 14.0]]], dtype=np.float32)
    assert data.Normalizer(write_stats(tmp_path / "f.json", [10.0], [2.0]))(floats, "f.tif", 1, None, None).tolist() == [[[0.0, 2.0]]]
    rgb = np.full((3, 1, 1), 255, np.uint8)
    expected = [(1 - m) / s for m, s in zip(data.IMAGENET_MEAN, data.IMAGENET_STD)]
    np.testing.assert_allclose(data.Normalizer()(rgb, "x.jpg", 3, None, None).flatten(), expected, rtol=1e-6)
    with pytest.raises(data.DataError, match="b.tif: uint16 with 4 bands needs per-band statistics.*python data.py stats"):
        data.Normalizer()(np.zeros((4, 1, 1), np.uint16), "b.tif", 4, None, None)
    assert normalize.band_stats("a.tif", 3, [2], np.int16)[0].tolist() == [30.0]  # stats index the file's bands


def test_a_file_of_another_dtype_than_the_stats_warns_once_per_dtype(tmp_path):
    for i in range(2):
        tifffile.imwrite(tmp_path / f"u16_{i}.tif", np.full((1, 8, 8), 1000 + i, np.uint16))
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps(data.compute_stats(str(tmp_path), progress=False)))
    for i in range(2):  # 8-bit quicklooks among the 16-bit scenes
        tifffile.imwrite(tmp_path / f"u8_{i}.tif", np.full((1, 8, 8), 200, np.uint8))
    dataset = data.PretrainDataset(sorted(map(str, tmp_path.glob("*.tif"))), data.PretrainDataConfig(img_size=8, stats=str(stats)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(len(dataset)):
            dataset[i]
    assert [str(w.message) for w in caught] == [f"{tmp_path / 'u8_0.tif'} is uint8 but the statistics in {stats} are of "
                                                "uint16 files; normalising it with them anyway. If its values have "
                                                "another scale, convert it or keep it apart, with statistics of its own"]


# --- pretraining dataset -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    stats = data.make_demo_chips(folder, n=12, size=64, bands=4)
    return folder, stats


def test_demo_chips_are_multiband_geotiffs_with_structure(demo):
    folder, stats = demo
    paths = data.list_images(folder)
    assert len(paths) == 12 and json.loads(Path(stats).read_text())["bands"] == 4
    info = data.geotiff_info(paths[0])
    assert info.tiled and info.compression == "ADOBE_DEFLATE" and info.dtype == np.uint16 and info.bands == 4
    with tifffile.TiffFile(paths[0]) as tif:
        assert tif.pages[0].geotiff_tags["GTModelTypeGeoKey"] == 1  # projected, i.e. a real GeoTIFF
    chip = data.read_geotiff(paths[0]).astype(float)
    neighbours = np.corrcoef(chip[:, :, 1:].ravel(), chip[:, :, :-1].ravel())[0, 1]
    assert neighbours > 0.8  # spatially smooth, not white noise
    assert len({round(c, 2) for c in np.corrcoef(chip.reshape(4, -1))[0, 1:]}) > 1  # bands differ


def test_pretrain_dataset_shapes_determinism_and_epochs(demo):
    folder, stats = demo
    dataset = data.PretrainDataset(folder, data.PretrainDataConfig(img_size=32, stats=stats, in_chans=4), seed=3)
    x = dataset[5]
    assert x.shape == (4, 32, 32) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert -1 < x.mean() < 1 and 0.2 < x.std() < 3  # normalised
    assert torch.equal(dataset[5], x)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[5], x)
    again = data.PretrainDataset(str(folder), data.PretrainDataConfig(img_size=32, stats=stats), seed=3)
    again.set_epoch(1)
    assert torch.equal(again[5], dataset[5])  # same (seed, epoch, index) -> same augmentation
    selected = data.PretrainDataset(folder, data.PretrainDataConfig(img_size=16, stats=stats, bands=[3, 0], in_chans=2))
    assert selected[0].shape == (2, 16, 16)


def test_uint8_images_take_the_fast_resize_and_match_float(tmp_path):
    Image.fromarray(ARRAYS["u8_3b"].transpose(1, 2, 0)).save(tmp_path / "rgb.png")
    cfg = data.PretrainDataConfig(img_size=40, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3))  # whole 48x64 image
    dataset = data.PretrainDataset([str(tmp_path / "rgb.png")], cfg)
    x = dataset[0]
    assert x.shape == (3, 40, 40) and x.dtype == torch.float32 and x.is_contiguous()
    rng = dataset.rng(0)  # replay the dataset's draws: the (whole-image) box, then the flip/rotation
    assert dataset.draw_box(rng, 48, 64) == (0, 0, 48, 64)
    pixels = data.random_dihedral(ARRAYS["u8_3b"], rng)
    in_float = data.resize(data.Normalizer()(pixels, "rgb.png", 3, None, None), 40, 40)
    assert not torch.equal(x, in_float)  # it did take the uint8 path, which rounds
    assert (x - in_float).abs().max() < 3 / (255 * 0.224)  # but by a few uint8 levels, no more
    assert (x - in_float).abs().mean() < 0.5 / (255 * 0.224)


def test_pretrain_dataset_rejects_wrong_band_count(demo, tmp_path):
    folder, stats = demo
    manifest = tmp_path / "list.txt"
    odd = FIXTURES / "u16_13b_tiled_deflate_band.tif"
    manifest.write_text(f"{data.list_images(folder)[0]}\n{odd}\n")
    dataset = data.PretrainDataset(manifest, data.PretrainDataConfig(img_size=16, stats=stats, in_chans=4))
    assert dataset[0].shape == (4, 16, 16)
    with pytest.raises(data.DataError, match=f"{odd} has 13 bands .* in_chans=4"):
        dataset[1]


def test_band_selection_errors_name_the_setting(demo, tmp_path):
    folder, stats = demo
    for bands in ([], ()):  # e.g. train.py --bands "" or a config's empty list
        with pytest.raises(data.DataError, match=r"bands=\[\] selects no bands.*at least one 0-based band index"):
            data.check_band_count("a.tif", 4, bands, None)
        with pytest.raises(data.DataError, match=r"bands=\[\] selects no bands"):  # before any file is read
            data.PretrainDataset(folder, data.PretrainDataConfig(img_size=16, stats=stats, bands=bands))
    with pytest.raises(data.DataError, match=r"bands=\[2, -1\]: .*0-based, the first band is 0.*negative"):
        data.check_band_count("a.tif", 4, [2, -1], None)
    for bands in ("3,2,1", [1.5], 3, [True], {2, 1}):
        with pytest.raises(data.DataError, match="bands=.*must be a list of 0-based band indices"):
            data.check_band_count("a.tif", 4, bands, None)
    with pytest.raises(data.DataError, match=r"a.tif has 4 bands but the config selects bands=\[1, 4\].* 0..3"):
        data.check_band_count("a.tif", 4, [1, 4], None)
    assert issubclass(data.DataError, ValueError)  # what train.py and eval.py report as a message, no traceback


def test_repeated_bands_are_a_valid_selection(demo):
    # Repeating a band is deliberate (a grey band as the three channels of an RGB model), not a typo to reject.
    folder, stats = demo
    x = data.PretrainDataset(folder, data.PretrainDataConfig(img_size=16, stats=stats, bands=[1, 1, 0], in_chans=3))[0]
    assert x.shape == (3, 16, 16) and torch.equal(x[0], x[1]) and not torch.equal(x[0], x[2])


def test_nodata_no_pixel_can_hold_marks_nothing_in_stats_normalizer_and_dataset(tmp_path):
    # -9999 is no uint16 pixel (GDAL then masks nothing either); 55537 is what -9999 wraps to in uint16.
    pixels = np.array([[0, 55537, 100, 65535]], np.uint16)
    tifffile.imwrite(tmp_path / "u16.tif", pixels, extratags=[(geotiff.GDAL_NODATA_TAG, "s", 0, "-9999", True)])
    stats = data.compute_stats([str(tmp_path / "u16.tif")], progress=False)
    assert stats["pixels"] == [4] and stats["nodata"] == -9999 and stats["min"] == [0.0]
    image, nodata = data.read_image(tmp_path / "u16.tif"), data.geotiff_info(tmp_path / "u16.tif").nodata
    normalized = data.Normalizer(write_stats(tmp_path / "s.json", [0.0], [1.0]))(image, "u16.tif", 1, None, nodata)
    assert normalized.tolist() == [[[0.0, 55537.0, 100.0, 65535.0]]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float16 cannot hold 70000: no overflow warning from comparing with it
        halves = np.array([[[1.0, np.inf, 65504.0]]], np.float16)
        assert data.Normalizer(write_stats(tmp_path / "h.json", [1.0], [1.0]))(halves, "h.tif", 1, None, 70000.0).tolist() == [[[0.0, 0.0, 65503.0]]]
    # An 8-bit file whose nodata (300) marks nothing is loaded exactly as one without the tag.
    rgb = ARRAYS["u8_3b"]
    tifffile.imwrite(tmp_path / "plain.tif", rgb, photometric="rgb", planarconfig="separate")
    tifffile.imwrite(tmp_path / "tagged.tif", rgb, photometric="rgb", planarconfig="separate",
                     extratags=[(geotiff.GDAL_NODATA_TAG, "s", 0, "300", True)])
    cfg = data.PretrainDataConfig(img_size=24)
    assert torch.equal(data.PretrainDataset([str(tmp_path / "tagged.tif")], cfg)[0],
                       data.PretrainDataset([str(tmp_path / "plain.tif")], cfg)[0])
    # A sparse tile would be filled with the nodata value, which does not exist: an error, even in skip mode.
    sparse = tmp_path / "sparse.tif"
    tifffile.imwrite(sparse, np.ones((1, 32, 32), np.uint16), tile=(16, 16),
                     extratags=[(geotiff.GDAL_NODATA_TAG, "s", 0, "-9999", True)])
    make_tile_sparse(sparse, 0)
    cfg = data.PretrainDataConfig(img_size=16, stats=write_stats(tmp_path / "s1.json", [1.0], [1.0]), skip_corrupt=True)
    with pytest.raises(data.DataError, match=f"{sparse}: tile 0 .*GDAL_NODATA tag -9999"):
        data.PretrainDataset([str(sparse)], cfg)[0]
    with pytest.raises(data.DataError, match=f"{sparse}: tile 0 .*GDAL_NODATA tag -9999"):
        data.compute_stats([str(sparse)], progress=False)


def test_big_scene_is_read_through_small_windows(tmp_path, monkeypatch):
    scene = np.random.default_rng(0).integers(0, 1000, (2, 1024, 1024), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "scene.tif", scene, planarconfig="separate", photometric="minisblack", tile=(128, 128))
    windows = []
    read = data.GeoTiff.read
    monkeypatch.setattr(data.GeoTiff, "read", lambda self, window=None, bands=None: windows.append(window) or read(self, window, bands))
    cfg = data.PretrainDataConfig(img_size=32, stats=write_stats(tmp_path / "s.json", [500.0, 500.0], [300.0, 300.0]), crop_size=200)
    dataset = data.PretrainDataset([str(tmp_path / "scene.tif")], cfg)
    assert dataset[0].shape == (2, 32, 32)
    assert len(windows) == 1 and windows[0][2] <= 200 and windows[0][3] <= 200


def test_nodata_and_nan_become_zero_in_dataset(tmp_path):
    pixels = np.full((1, 40, 40), 7.0, np.float32)
    pixels[0, :, :20] = np.nan
    tifffile.imwrite(tmp_path / "half_nan.tif", pixels)
    cfg = data.PretrainDataConfig(img_size=40, stats=write_stats(tmp_path / "s.json", [3.0], [2.0]), scale=(1.0, 1.0), ratio=(1, 1))
    x = data.PretrainDataset([str(tmp_path / "half_nan.tif")], cfg)[0]  # the whole image, rotated or flipped
    assert sorted(x.unique().tolist()) == [0.0, 2.0] and (x == 0).sum() == 800


def test_corrupt_files_error_by_default_and_skip_mode_counts(demo, tmp_path, capsys):
    folder, stats = demo
    good = data.list_images(folder)[:3]
    bad = truncated_copy(tmp_path, keep=0.3)
    paths = good[:1] + [str(bad)] + good[1:]
    with pytest.raises(data.CorruptImageError, match=str(bad)):
        data.PretrainDataset(paths, data.PretrainDataConfig(img_size=16, stats=stats))[1]
    skipping = data.PretrainDataset(paths, data.PretrainDataConfig(img_size=16, stats=stats, skip_corrupt=True))
    assert all(skipping[i].shape == (4, 16, 16) for i in range(len(paths)))
    assert skipping.num_skipped == 1 and str(bad) in capsys.readouterr().err
    skipping.set_epoch(1)
    assert "skipped 1 corrupt" in capsys.readouterr().err and skipping.num_skipped == 0


def test_loader_workers_see_set_epoch_and_match_in_process(demo):
    folder, stats = demo
    dataset = data.PretrainDataset(folder, data.PretrainDataConfig(img_size=16, stats=stats))
    sampler = data.ResumableDistributedSampler(len(dataset), 0, 1, seed=1)
    loader = data.make_loader(dataset, batch_size=4, sampler=sampler, workers=2)
    assert loader.persistent_workers and loader.prefetch_factor == 4
    for epoch in range(2):  # the second epoch runs in workers started during the first
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        batches = list(loader)
        expected = torch.stack([dataset[i] for i in sampler.epoch_order(epoch)])
        assert torch.equal(torch.cat(batches), expected)
    assert data.make_loader(dataset, 4, sampler, workers=0).num_workers == 0


def test_random_resized_box_stays_inside_and_in_scale():
    rng = np.random.default_rng(0)
    for height, width in [(100, 100), (37, 300), (300, 37), (1, 1)]:
        for _ in range(50):
            top, left, h, w = data.random_resized_box(rng, height, width, (0.2, 1.0))
            assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
            if (height, width) == (100, 100):
                assert 0.18 <= h * w / 10000 <= 1 and 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05


def test_synthetic_dataset_is_deterministic():
    dataset, twin = data.SyntheticDataset(10, 3, 8, seed=1), data.SyntheticDataset(10, 3, 8, seed=1)
    assert len(dataset) == 10 and dataset[2].shape == (3, 8, 8)
    assert torch.equal(dataset[2], twin[2])  # built apart, the same tensors
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence((1, 2)).generate_state(1)[0]))
    assert torch.equal(dataset[2], torch.randn(3, 8, 8, generator=generator))  # item 2 of seed 1, by hand
    assert not torch.equal(dataset[2], dataset[3])
    assert not torch.equal(dataset[2], data.SyntheticDataset(10, 3, 8, seed=2)[2])


# --- sampler -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n, world", [(103, 4), (64, 8), (5, 1)])
def test_sampler_ranks_disjoint_and_complete(n, world):
    shards = [list(data.ResumableDistributedSampler(n, r, world, seed=7)) for r in range(world)]
    everything = [i for shard in shards for i in shard]
    assert len(everything) == len(set(everything)) == (n // world) * world  # disjoint, tail dropped
    assert all(len(s) == n // world == len(data.ResumableDistributedSampler(n, 0, world)) for s in shards)
    padded = [list(data.ResumableDistributedSampler(n, r, world, drop_last=False)) for r in range(world)]
    assert set(i for shard in padded for i in shard) == set(range(n))  # every sample, padded by wrapping


def test_sampler_epochs_and_exact_resume():
    sampler = data.ResumableDistributedSampler(50, 1, 2, seed=3)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.set_epoch(5)
    assert sorted(list(sampler)) != full and len(full) == 25
    expected = torch.randperm(50, generator=torch.Generator().manual_seed(3 + 4)).tolist()[1:50:2]
    assert full == expected  # permutation from torch.Generator(seed + epoch)
    resumed = data.ResumableDistributedSampler(50, 1, 2, seed=3)
    resumed.load_state_dict({"epoch": 4, "index": 10})
    resumed.set_epoch(4)  # a training loop calls this again on resume; it must keep the position
    assert list(resumed) == full[10:]
    partial = data.ResumableDistributedSampler(50, 1, 2, seed=3)
    partial.set_epoch(4)
    iterator = iter(partial)
    first = [next(iterator) for _ in range(7)]
    assert partial.state_dict() == {"epoch": 4, "index": 7} and first == full[:7]
    again = data.ResumableDistributedSampler(50, 1, 2, seed=3)
    again.load_state_dict(partial.state_dict())
    assert list(again) == full[7:]
    with pytest.raises(ValueError, match="index 26"):
        again.load_state_dict({"epoch": 4, "index": 26})


# --- many crops per scene ----------------------------------------------------------------------


def write_scenes(folder, count=2, size=300):
    """`count` 4-band uint16 scenes, tiled, with a nodata (0) block in the top-left corner; and stats.json."""
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(100, 5000, (4, size, size), dtype=np.uint16)
        pixels[:, :100, :150] = 0
        tifffile.imwrite(folder / f"scene_{i}.tif", pixels, photometric="minisblack", planarconfig="separate",
                         tile=(64, 64), compression="zlib", extratags=[(geotiff.GDAL_NODATA_TAG, "s", 0, "0", True)])
    (folder / "stats.json").write_text(json.dumps(data.compute_stats(str(folder), progress=False)))
    return str(folder), str(folder / "stats.json")


def test_scenes_give_chips_per_scene_crops_per_epoch(tmp_path, monkeypatch):
    folder, stats = write_scenes(tmp_path / "scenes")
    cfg = data.PretrainDataConfig(img_size=32, stats=stats, crop_size=64, chips_per_scene=5)
    dataset = data.PretrainDataset(folder, cfg, seed=1)
    assert len(dataset) == 2 * 5
    reads = []
    read = data.GeoTiff.read
    monkeypatch.setattr(data.GeoTiff, "read", lambda self, window=None, bands=None:
                        reads.append((os.path.basename(self.path), window)) or read(self, window, bands))
    items, scenes = [], []
    for i in range(len(dataset)):
        reads.clear()
        items.append(dataset[i])
        scenes.append({name for name, _ in reads})
        assert all(h <= 64 and w <= 64 for _, (_, _, h, w) in reads)  # inside a crop_size window
    assert scenes == [{"scene_0.tif"}] * 5 + [{"scene_1.tif"}] * 5  # item i is scene i // 5
    assert all(x.shape == (4, 32, 32) for x in items)
    assert len({x.numpy().tobytes() for x in items}) == 10  # every crop its own window
    monkeypatch.undo()
    twin = data.PretrainDataset(folder, cfg, seed=1)
    assert all(torch.equal(twin[i], items[i]) for i in (0, 7))  # the same (seed, epoch, index), the same crop
    twin.set_epoch(1)
    assert not torch.equal(twin[0], items[0])
    # Through the sampler and the loader: an epoch is 10 crops, all of them, split over ranks.
    shards = [list(data.ResumableDistributedSampler(len(dataset), rank, 2, seed=1)) for rank in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(10))
    sampler = data.ResumableDistributedSampler(len(dataset), 0, 1, seed=1)
    batches = list(data.make_loader(dataset, batch_size=5, sampler=sampler, workers=0))
    assert len(batches) == 2
    assert torch.equal(torch.cat(batches), torch.stack([items[i] for i in sampler.epoch_order(0)]))


def test_nodata_heavy_crops_are_drawn_again(tmp_path):
    # Half of the scene is nodata. Each crop is its whole 64x64 window (scale 1, ratio 1, no resize),
    # so the zeros of an item count the nodata pixels of the window it kept.
    scene = np.full((1, 64, 256), 1000, np.uint16)
    scene[:, :, :128] = 0
    tifffile.imwrite(tmp_path / "half.tif", scene, extratags=[(geotiff.GDAL_NODATA_TAG, "s", 0, "0", True)])
    stats = write_stats(tmp_path / "s.json", [0.0], [1.0])
    n = 60

    def zero_fractions(max_nodata):
        cfg = data.PretrainDataConfig(img_size=64, crop_size=64, scale=(1, 1), ratio=(1, 1), stats=stats,
                                      chips_per_scene=n, max_nodata=max_nodata)
        dataset = data.PretrainDataset([str(tmp_path / "half.tif")], cfg, seed=2)
        return dataset, [float((dataset[i] == 0).float().mean()) for i in range(n)]

    _, unfiltered = zero_fractions(1.0)
    dataset, kept = zero_fractions(0.25)
    expected = []  # by hand: redraw while more than a quarter of the window's written pixels are nodata
    for i in range(n):
        rng = dataset.rng(i)
        for _ in range(data.WINDOW_DRAWS):
            top, left, h, w = dataset.draw_box(rng, 64, 256)
            fraction = float((scene[:, top:top + h, left:left + w] == 0).mean())
            if fraction <= 0.25:
                break
        expected.append(fraction)
    assert kept == expected
    assert sum(f > 0.25 for f in unfiltered) > n / 3  # without the check, many crops are mostly nodata
    assert sum(f > 0.25 for f in kept) <= 2  # with it, only those whose 8 draws all failed (~2.5% each)
    with pytest.raises(data.DataError, match=r"max_nodata=1.5 \(train.py --max-nodata\)"):
        data.PretrainDataConfig(max_nodata=1.5)
    with pytest.raises(data.DataError, match=r"chips_per_scene=0 \(train.py --chips-per-scene\)"):
        data.PretrainDataConfig(chips_per_scene=0)


def test_training_on_scenes_resumes_bit_exactly(tmp_path):
    folder, _ = write_scenes(tmp_path / "scenes")  # stats.json inside: found by train.py
    tiny = ["--model", "vit_tiny", "--img-size", "32", "--decoder-embed-dim", "32", "--decoder-depth", "1",
            "--decoder-num-heads", "4", "--batch-size", "8", "--steps", "10", "--warmup-steps", "2", "--workers", "0",
            "--log-every", "1", "--data", folder, "--chips-per-scene", "8", "--crop-size", "128"]

    def metrics(out):
        with open(out / "metrics.jsonl") as f:
            return [(r["step"], r["epoch"], r["loss"], r["grad_norm"]) for r in map(json.loads, f)]

    assert train.main([*tiny, "--out", str(tmp_path / "reference")]) == 0
    reference = metrics(tmp_path / "reference")
    # 2 scenes x 8 crops = 16 per epoch, 2 steps of 8: ten steps are five epochs.
    assert [(step, epoch) for step, epoch, *_ in reference] == [(s, s / 2) for s in range(1, 11)]
    run = tmp_path / "run"
    assert train.main([*tiny, "--out", str(run), "--max-steps-per-run", "5"]) == 0  # stops mid-epoch
    assert train.main([*tiny, "--out", str(run), "--resume"]) == 0
    assert metrics(run) == reference  # loss and grad norm of every step, bit for bit
