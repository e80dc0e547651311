"""Slides larger than memory: tiled TIFFs read window by window (only the tiles a window touches), other images
decoded once into the cache, every unreadable file in one line; the synthetic slide data set."""

import pickle
import sys

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from competition import slides, synthetic
from competition.errors import ConfigError, DataError, OutputError
from competition.rle import rle_decode, rle_encode
from competition.slides import open_slide

WINDOWS = [(0, 0, 64, 64), (37, 250, 300, 123), (500, 600, 100, 100), (0, 0, 600, 700)]


@pytest.fixture
def image():
    return np.random.default_rng(0).integers(0, 256, (600, 700, 3), np.uint8)


@pytest.mark.parametrize(
    "layout",
    ["rgb", "planar", "grey", "grey16", "rgba", "pyramid"],
)
def test_tiled_tiff_windows_are_the_image_read_in_place(tmp_path, image, layout):
    path, expected = tmp_path / "slide.tiff", image
    if layout == "rgb":
        tifffile.imwrite(path, image, tile=(128, 128), compression="zlib")
    elif layout == "planar":
        tifffile.imwrite(path, np.moveaxis(image, 2, 0), tile=(128, 128), planarconfig="separate", photometric="rgb")
    elif layout == "grey":
        tifffile.imwrite(path, image[..., 0], tile=(64, 128))
        expected = np.repeat(image[..., :1], 3, axis=2)
    elif layout == "grey16":
        tifffile.imwrite(path, image[..., 0].astype(np.uint16) * 257, tile=(128, 64))
        expected = np.repeat(image[..., :1], 3, axis=2)
    elif layout == "rgba":
        tifffile.imwrite(path, np.dstack([image, image[..., :1]]), tile=(128, 128), photometric="rgb", extrasamples=[2])
    else:  # level 0 of a pyramid, its reduced level in a SubIFD (as HuBMAP's and OME's slides)
        with tifffile.TiffWriter(path) as writer:
            writer.write(image, tile=(128, 128), subifds=1, photometric="rgb")
            writer.write(image[::2, ::2], tile=(128, 128), subfiletype=1, photometric="rgb")
    cache = tmp_path / "cache"
    with open_slide(path, cache) as slide:
        assert slide.shape == (600, 700, 3) and slide.tiled
        for y, x, height, width in WINDOWS:
            window = slide.read(y, x, height, width)
            assert window.dtype == np.uint8 and window.shape == (height, width, 3)
            np.testing.assert_array_equal(window, expected[y : y + height, x : x + width])
    assert not cache.exists()  # nothing decoded into a cache


def test_a_window_decodes_only_the_tiles_it_touches(tmp_path, image, monkeypatch):
    tifffile.imwrite(tmp_path / "slide.tiff", image, tile=(128, 128), compression="zlib")
    decoded = []
    page_decode = slides._TiffTiles._decoded

    def counting(self, wanted):
        for segment, position in page_decode(self, wanted):
            decoded.append(position[2:4])
            yield segment, position

    monkeypatch.setattr(slides._TiffTiles, "_decoded", counting)
    slide = open_slide(tmp_path / "slide.tiff", tmp_path / "cache")
    slide.read(130, 260, 100, 100)  # inside the tile at (128, 256)
    assert decoded == [(128, 256)]
    decoded.clear()
    slide.read(120, 250, 20, 20)  # across the corner of four tiles
    assert sorted(decoded) == [(0, 128), (0, 256), (128, 128), (128, 256)]


def test_a_slide_pickled_or_forked_opens_its_file_again(tmp_path, image):
    tifffile.imwrite(tmp_path / "slide.tiff", image, tile=(128, 128))
    slide = open_slide(tmp_path / "slide.tiff", tmp_path / "cache")
    slide.read(0, 0, 8, 8)
    copy = pickle.loads(pickle.dumps(slide))  # as a DataLoader worker gets it
    np.testing.assert_array_equal(copy.read(100, 100, 50, 60), image[100:150, 100:160])
    slide._opened_in = -1  # as in a forked child: another pid than the one that opened the file
    np.testing.assert_array_equal(slide.read(1, 2, 3, 4), image[1:4, 2:6])


@pytest.mark.parametrize("kind", ["strips", "png", "jpeg"])
def test_other_images_are_decoded_once_into_the_cache(tmp_path, image, kind, monkeypatch, caplog):
    if kind == "strips":
        path = tmp_path / "slide.tif"
        tifffile.imwrite(path, image, rowsperstrip=16, compression="zlib")
        monkeypatch.setattr(slides, "CACHE_BAND_ROWS", 100)  # several bands, the last one short
    else:
        path = tmp_path / f"slide.{kind}"
        Image.fromarray(image).save(path, quality=95)
    expected = np.asarray(Image.open(path).convert("RGB"))
    cache = tmp_path / "cache"
    with caplog.at_level("INFO", logger="competition"):
        slide = open_slide(path, cache)
    assert not slide.tiled and slide.shape == (600, 700, 3) and "decoding it once" in caplog.text
    assert [file.name for file in cache.iterdir()] == [slide.cached.name]  # no temporary file left
    for y, x, height, width in WINDOWS:
        np.testing.assert_array_equal(slide.read(y, x, height, width), expected[y : y + height, x : x + width])
    monkeypatch.setattr(slides, "_decode_whole", None)  # a second open decodes nothing
    monkeypatch.setattr(slides, "_copy_bands", None)
    assert open_slide(path, cache).cached == slide.cached


def test_a_changed_file_is_decoded_again(tmp_path, image):
    path = tmp_path / "slide.png"
    Image.fromarray(image).save(path)
    first = open_slide(path, tmp_path / "cache").cached
    Image.fromarray(image[::-1]).save(path)
    second = open_slide(path, tmp_path / "cache")
    assert second.cached != first
    np.testing.assert_array_equal(second.read(0, 0, 600, 700), image[::-1])


def test_too_big_to_cache_on_the_free_disk_is_one_line_saying_what_is_needed(tmp_path, image, monkeypatch, capsys):
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, image)  # in strips
    monkeypatch.setattr(slides.shutil, "disk_usage", lambda folder: type("Usage", (), {"free": 1_000_000}))
    with pytest.raises(SystemExit) as stop:
        slides.main([str(path), "--cache", str(tmp_path / "cache")])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and error.count("\n") == 1
    assert f"{path}: not a tiled TIFF" in error and "needs 68.4 MB free there and has 1.0 MB" in error
    assert list((tmp_path / "cache").iterdir()) == []


def _truncated(path, image):
    tifffile.imwrite(path, image, tile=(128, 128))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_tile(path, image):
    tifffile.imwrite(path, image, tile=(128, 128), compression="zlib")
    data = bytearray(path.read_bytes())
    data[4000:5000] = bytes(1000)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda path, image: path.write_text("not an image at all"), "not a readable TIFF (not a TIFF file"),
        (_truncated, "not a readable TIFF (corrupted tile"),
        (_corrupt_tile, "not a readable TIFF ("),
        (lambda path, image: None, "slide.tiff: not found"),
    ],
    ids=["text", "truncated", "corrupt-tile", "missing"],
)
def test_an_unreadable_tiff_is_one_line_naming_it(tmp_path, image, make, expected, capsys):
    path = tmp_path / "slide.tiff"
    make(path, image)
    with pytest.raises(DataError) as error:
        open_slide(path, tmp_path / "cache").read(0, 0, 600, 700)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_an_image_that_does_not_decode_is_one_line_through_the_command(tmp_path, capsys):
    (tmp_path / "slide.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(SystemExit) as stop:
        slides.main([str(tmp_path / "slide.png"), "--cache", str(tmp_path / "cache")])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and error.count("\n") == 1 and "slide.png: the image does not decode" in error
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


def test_tiles_of_a_codec_not_installed_are_one_line(tmp_path, image, monkeypatch):
    tifffile.imwrite(tmp_path / "slide.tiff", image, tile=(128, 128), compression="zlib")
    monkeypatch.setattr(tifffile.TIFF, "DECOMPRESSORS", {1: None})  # as if deflate needed a package not here
    with pytest.raises(DataError, match="pixels are compressed as ADOBE_DEFLATE, which needs the imagecodecs package"):
        open_slide(tmp_path / "slide.tiff", tmp_path / "cache")


def test_without_tifffile_a_tiff_is_one_line_naming_the_requirements(tmp_path, image, monkeypatch):
    tifffile.imwrite(tmp_path / "slide.tiff", image, tile=(128, 128))
    monkeypatch.setitem(sys.modules, "tifffile", None)
    with pytest.raises(ConfigError, match="pip install -r requirements-slides.txt"):
        open_slide(tmp_path / "slide.tiff", tmp_path / "cache")


def test_the_cache_folder_unwritable_is_one_line(tmp_path, image):
    Image.fromarray(image).save(tmp_path / "slide.png")
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        open_slide(tmp_path / "slide.png", tmp_path / "file" / "cache")


def test_synthetic_slides_are_tiled_tiffs_with_their_column_major_rle(tmp_path):
    out = synthetic.generate_slides(tmp_path / "slides", size=1024, count=2, test_count=1, seed=3)
    train, truth = (pd.read_csv(out / name, keep_default_na=False) for name in ("train.csv", "test_masks.csv"))
    assert list(train.columns) == ["id", "encoding"] and len(train) == 2 and len(truth) == 1
    assert pd.read_csv(out / "sample_submission.csv").columns.tolist() == ["id", "predicted"]
    seeds = np.random.SeedSequence(3).generate_state(4)
    naming = np.random.default_rng(seeds[-1])
    ids = [naming.bytes(5).hex()[:9] for _ in range(3)]
    for slide_id, seed, folder in zip(ids, seeds[:3], ["train", "train", "test"]):
        plan = synthetic.plan_slide(1024, int(seed))
        mask = synthetic.slide_mask_window(plan, 0, 0, 1024, 1024)
        table = train if folder == "train" else truth
        encoding = table.set_index("id").loc[slide_id, "encoding"]
        assert encoding == rle_encode(mask.T)  # HuBMAP's order: down each column
        np.testing.assert_array_equal(rle_decode(encoding, (1024, 1024)).T, mask)
        runs = slides.RunsMask(encoding, (1024, 1024), "column")
        np.testing.assert_array_equal(runs.read(100, 300, 500, 600), mask[100:600, 300:900])
        with open_slide(out / folder / f"{slide_id}.tiff", tmp_path / "cache") as slide:
            assert slide.tiled and slide.shape == (1024, 1024, 3)
            pixels = slide.read(0, 0, 1024, 1024)
        np.testing.assert_array_equal(pixels[256:512, 512:768], synthetic.slide_window(plan, 256, 512, 256, 256))
        inside = pixels[mask == 1].astype(int)
        assert mask.sum() > 0 and (inside[:, 1] < inside[:, 0] - 40).mean() > 0.95  # purple discs: green low
        assert (pixels[mask == 0].mean(axis=0) > 200).all()  # mostly white glass and pink tissue around them


def test_synthetic_slides_command_and_its_refusals(tmp_path, capsys):
    synthetic.main(["--slides", "--out", str(tmp_path / "s"), "--slide-size", "1024", "--slide-count", "1"])
    assert "wrote 1 training and 1 test slides (1024x1024, tiled TIFF)" in capsys.readouterr().out
    assert sorted(path.name for path in (tmp_path / "s").iterdir()) == [
        "sample_submission.csv",
        "test",
        "test_masks.csv",
        "train",
        "train.csv",
    ]
    for flags in (["--slide-size", "1000"], ["--parts"], ["--slide-count", "0"]):
        with pytest.raises(SystemExit) as stop:
            synthetic.main(["--slides", "--out", str(tmp_path / "t"), *flags])
        assert stop.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_no_room_left_for_the_cache_is_one_line_and_leaves_nothing(tmp_path, image, monkeypatch):
    import errno
    import os

    Image.fromarray(image).save(tmp_path / "slide.png")

    def full(descriptor, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OutputError, match="slide.png: no room left in .* to decode it once"):
        open_slide(tmp_path / "slide.png", tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize("order", ["column", "row"])
def test_a_mask_kept_as_runs_reads_any_window(order):
    from competition.slides import RunsMask

    rng = np.random.default_rng(4)
    mask = (rng.random((90, 130)) < 0.2).astype(np.uint8)
    mask[:, 7] = 1  # runs across the end of a column (and, row-major, long runs across rows)
    mask[20, :] = 1
    runs = RunsMask(rle_encode(mask.T if order == "column" else mask), (90, 130), order)
    for y, x, height, width in [(0, 0, 90, 130), (10, 5, 30, 40), (89, 129, 1, 1), (0, 7, 90, 1), (20, 0, 1, 130)]:
        np.testing.assert_array_equal(runs.read(y, x, height, width), mask[y : y + height, x : x + width])


def test_a_mask_of_another_size_than_its_slide_is_one_line():
    from competition.slides import RunsMask

    encoding = rle_encode(np.ones((100, 100), np.uint8))
    with pytest.raises(DataError, match=r"train.csv, id abc: RLE has a run past the end of the image .* 90x100"):
        RunsMask(encoding, (100, 90), source="train.csv, id abc")


def _random_windows(rng: np.random.Generator, shape: tuple[int, int], count: int) -> list[tuple[int, int, int, int]]:
    """Windows of any size and place inside ``shape``: the whole, single pixels, strips and the rest."""
    windows = [(0, 0, *shape), (shape[0] - 1, shape[1] - 1, 1, 1)]
    for _ in range(count):
        y, x = rng.integers(shape[0]), rng.integers(shape[1])
        windows.append((int(y), int(x), int(rng.integers(1, shape[0] - y + 1)), int(rng.integers(1, shape[1] - x + 1))))
    return windows


@pytest.fixture
def stored_mask():
    """A 600 x 700 mask of stored values: 0/255 blobs, some 128 (read below as the ignore index)."""
    rng = np.random.default_rng(5)
    mask = np.where(rng.random((600, 700)) < 0.3, 255, 0).astype(np.uint8)
    mask[100:180, 200:420] = 128
    return mask


def _as_classes(values: np.ndarray, source: str) -> np.ndarray:
    """A layout's rule for the test: 0 background, 255 foreground (1), 128 ignored (255), anything else refused."""
    if not np.isin(values, (0, 128, 255)).all():
        raise DataError(f"{source}: unknown mask values")
    return np.select([values == 255, values == 128], [1, 255], 0).astype(np.uint8)


def test_a_tiled_tiff_mask_is_read_window_by_window_through_the_layouts_rule(tmp_path, stored_mask, monkeypatch):
    path = tmp_path / "mask.tiff"
    tifffile.imwrite(path, stored_mask, tile=(128, 128), compression="zlib")
    decode_whole = pytest.fail  # a tiled one-channel TIFF is never decoded whole
    mask = slides.open_mask(path, tmp_path / "cache", decode_whole, _as_classes, "rules")
    assert mask.shape == (600, 700) and mask.source == str(path) and mask.cached is None
    expected = _as_classes(stored_mask, "whole")
    for y, x, height, width in _random_windows(np.random.default_rng(6), (600, 700), 40):
        np.testing.assert_array_equal(mask.read(y, x, height, width), expected[y : y + height, x : x + width])
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(mask)).read(37, 250, 300, 123), expected[37:337, 250:373])
    assert not (tmp_path / "cache").exists()
    tifffile.imwrite(path, np.full((600, 700), 7, np.uint8), tile=(128, 128))
    with pytest.raises(DataError, match="mask.tiff: unknown mask values"):
        slides.open_mask(path, tmp_path / "cache", decode_whole, _as_classes, "rules").read(0, 0, 64, 64)


@pytest.mark.parametrize("kind", ["png", "gif", "strips", "rgb-tiled"])
def test_other_masks_are_decoded_once_by_the_layouts_rule_into_the_cache(tmp_path, stored_mask, kind):
    path = tmp_path / f"mask.{'tiff' if kind in ('strips', 'rgb-tiled') else kind}"
    if kind in ("png", "gif"):
        Image.fromarray(stored_mask).save(path)
    elif kind == "strips":
        tifffile.imwrite(path, stored_mask, rowsperstrip=64)
    else:  # three channels: a colour mask, read by the layout's colour table from the whole file
        tifffile.imwrite(path, np.dstack([stored_mask] * 3), tile=(128, 128), photometric="rgb")
    decodes = []

    def decode_whole() -> np.ndarray:
        decodes.append(path)
        return _as_classes(stored_mask, str(path))

    mask = slides.open_mask(path, tmp_path / "cache", decode_whole, _as_classes, "rules")
    assert decodes == [path] and mask.shape == (600, 700) and mask.cached.parent == tmp_path / "cache"
    expected = _as_classes(stored_mask, "whole")
    for y, x, height, width in _random_windows(np.random.default_rng(7), (600, 700), 40):
        np.testing.assert_array_equal(mask.read(y, x, height, width), expected[y : y + height, x : x + width])
    assert slides.open_mask(path, tmp_path / "cache", decode_whole, _as_classes, "rules").cached == mask.cached
    assert decodes == [path]  # read from the cache the second time
    other_rules = slides.open_mask(path, tmp_path / "cache", decode_whole, _as_classes, "other rules")
    assert other_rules.cached != mask.cached and len(decodes) == 2  # other classes, another cache file


def test_a_mask_that_decodes_to_another_size_than_its_header_is_one_line_and_leaves_no_cache(tmp_path, stored_mask):
    path = tmp_path / "mask.png"
    Image.fromarray(stored_mask).save(path)
    with pytest.raises(DataError, match=r"mask.png: the mask decodes to 70x60, its header says 700x600"):
        slides.open_mask(path, tmp_path / "cache", lambda: stored_mask[:60, :70], _as_classes, "rules")
    assert list((tmp_path / "cache").glob("*.npy")) == []


@pytest.mark.parametrize("suffix", [".tiff", ".png"])
def test_an_images_size_comes_from_its_header_without_a_decode(tmp_path, image, suffix, monkeypatch):
    path = tmp_path / f"big{suffix}"
    if suffix == ".tiff":
        tifffile.imwrite(path, image, tile=(128, 128))
    else:
        Image.fromarray(image).save(path)
    monkeypatch.setattr(Image.Image, "load", lambda *_: pytest.fail("decoded"))
    monkeypatch.setattr(tifffile.TiffPage, "asarray", lambda *_, **__: pytest.fail("decoded"))
    assert slides.header_shape(path) == (600, 700)
    monkeypatch.undo()  # Pillow's plugins load images of their own when first imported
    (tmp_path / "cut.png").write_bytes(b"\x89PNG\r\n")
    with pytest.raises(DataError, match="cut.png: the image does not decode"):
        slides.header_shape(tmp_path / "cut.png")


def test_a_mask_past_pillows_pixel_limit_is_decoded_for_tiles_and_said_in_one_line_elsewhere(tmp_path, monkeypatch):
    from competition.data import decode_mask

    path = tmp_path / "mask.png"
    Image.fromarray(np.zeros((100, 120), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow raises past twice its limit: 12,000 pixels do
    with pytest.raises(DataError, match=r"mask.png: the mask is larger than Pillow decodes whole .* --tile"):
        decode_mask(path.read_bytes(), str(path))

    def decode_whole() -> np.ndarray:  # the data layer's own read, as the layouts give it to open_mask
        return decode_mask(path.read_bytes(), str(path))

    mask = slides.open_mask(path, tmp_path / "cache", decode_whole, _as_classes, "rules")
    assert mask.read(0, 0, 100, 120).shape == (100, 120) and Image.MAX_IMAGE_PIXELS == 1000
