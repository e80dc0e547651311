"""Colour-coded masks: both table formats and their refusals, decoding (exact, unknown, snapped, JPEG), the cache."""

import io
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from competition.colors import MaskCache, decode_color_mask, read_color_mask, read_color_table
from competition.errors import DataError

# Two colours share "red thing" (one class), white is labelme's __ignore__ (the ignore index, not a class).
TABLE = "name,r,g,b\nbackground,0,0,0\nred thing,255,0,0\ngreen,0,255,0\nred thing,200,0,0\n__ignore__,255,255,255\n"
BLACK, RED, GREEN, DARK_RED, WHITE = (0, 0, 0), (255, 0, 0), (0, 255, 0), (200, 0, 0), (255, 255, 255)


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "class_dict.csv"
    path.write_text(TABLE)
    return read_color_table(path)


def _png(rgb: np.ndarray, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_csv_table_with_header_bom_and_spaces_after_commas(tmp_path):
    path = tmp_path / "class_dict.csv"
    path.write_bytes("\ufeffname, r, g, b\nSky, 128, 128, 128\nRoad shoulder, 128, 64, 128\n".encode())
    table = read_color_table(path)
    assert table.names == ["Sky", "Road shoulder"]
    np.testing.assert_array_equal(table.colors, [[128, 128, 128], [128, 64, 128]])
    np.testing.assert_array_equal(table.classes, [0, 1])
    assert table.colors.dtype == np.uint8 and table.classes.dtype == np.uint8 and table.path == str(path)


def test_csv_table_without_header(tmp_path):
    path = tmp_path / "colors.csv"
    path.write_text("void,0,0,0\nbuilding,70,70,70\n")
    table = read_color_table(path)
    assert table.names == ["void", "building"]
    np.testing.assert_array_equal(table.colors, [[0, 0, 0], [70, 70, 70]])


def test_camvid_label_colors_text_with_comments_and_names_with_spaces(tmp_path):
    path = tmp_path / "label_colors.txt"
    path.write_text(
        "# CamVid\n\n64 128 64\tAnimal\n192 0 128\tArchway\n  # indented comment\n128 0 192\tLane Mkgs Driv\n"
    )
    table = read_color_table(path)
    assert table.names == ["Animal", "Archway", "Lane Mkgs Driv"]
    np.testing.assert_array_equal(table.colors, [[64, 128, 64], [192, 0, 128], [128, 0, 192]])
    np.testing.assert_array_equal(table.classes, [0, 1, 2])


def test_two_colours_share_a_class_and_ignore_row_maps_to_the_ignore_index(tmp_path):
    path = tmp_path / "class_dict.csv"
    path.write_text(TABLE)
    table = read_color_table(path, ignore_index=99)
    assert table.names == ["background", "red thing", "green"]  # __ignore__ is no class; "red thing" listed once
    np.testing.assert_array_equal(table.classes, [0, 1, 2, 1, 99])


def test_key_follows_the_content_not_the_path(tmp_path, table):
    copy = tmp_path / "copy.csv"
    copy.write_text(TABLE)
    changed = tmp_path / "changed.csv"
    changed.write_text(TABLE.replace("200,0,0", "201,0,0"))
    assert read_color_table(copy).key == table.key
    assert read_color_table(changed).key != table.key
    assert read_color_table(copy, ignore_index=99).key != table.key  # the ignore rows decode to another value


@pytest.mark.parametrize(
    "text, expected",
    [
        ("background,0,0,0\ncar,64,0\n", "line 2 'car,64,0' is neither"),
        ("name,r,g,b\nbackground,0,0,0\nthis is not a colour\n", "line 3"),
        ("background,0,0,0\ncar,64,0,256\n", "line 2 'car,64,0,256' has a value outside 0..255"),
        ("0 0 0 background\n-1 0 0 car\n", "line 2 '-1 0 0 car' has a value outside 0..255"),
        ("background,0,0,0\ncar,1,2,3\n\nbus,1,2,3\n", "line 4 gives the colour (1, 2, 3) of line 2 again"),
        ("background,0,0,0\n__ignore__,255,255,255\n", "1 class(es) in the colour table"),
        ("", "0 class(es)"),
    ],
    ids=["short-row", "not-a-row", "above-255", "negative", "colour-twice", "one-class", "empty"],
)
def test_table_errors_name_the_file_and_the_line(tmp_path, text, expected):
    path = tmp_path / "table.csv"
    path.write_text(text)
    with pytest.raises(DataError) as error:
        read_color_table(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message


def test_unreadable_table(tmp_path):
    with pytest.raises(DataError, match="cannot be read"):
        read_color_table(tmp_path / "absent.csv")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00background,0,0,0\n")
    with pytest.raises(DataError, match=r"binary\.csv: the colour table cannot be read"):
        read_color_table(binary)


def test_more_classes_than_the_ignore_index_allows(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("a,0,0,0\nb,1,1,1\nc,2,2,2\n")
    with pytest.raises(DataError, match="3 classes reach the ignore index 2"):
        read_color_table(path, ignore_index=2)


def test_decode_hand_made_mask(table):
    rgb = np.array([[BLACK, RED, GREEN], [DARK_RED, WHITE, BLACK]], dtype=np.uint8)
    indices = decode_color_mask(rgb, table, "m.png", ignore_index=255)
    np.testing.assert_array_equal(indices, [[0, 1, 2], [1, 255, 0]])
    assert indices.dtype == np.uint8 and indices.shape == (2, 3)


def _with_unknown_colours() -> np.ndarray:
    rgb = np.zeros((3, 4, 3), dtype=np.uint8)
    rgb[1, 3] = (10, 20, 30)  # first in row-major order: x=3, y=1
    rgb[2, 0] = (40, 50, 60)  # first in column-major order, which must not be the one named
    rgb[0, 1] = GREEN
    return rgb


def test_unknown_colour_error_names_the_first_pixel_its_colour_the_table_and_the_fixes(table):
    with pytest.raises(DataError) as error:
        decode_color_mask(_with_unknown_colours(), table, "masks/a.png", ignore_index=255)
    message = str(error.value)
    assert message.startswith("masks/a.png: ") and "\n" not in message
    assert "x=3, y=1" in message and "(10, 20, 30)" in message and "(40, 50, 60)" not in message
    assert table.path in message and "add it to the table" in message and "--unknown-colors ignore" in message


def test_unknown_colours_ignored(table):
    indices = decode_color_mask(_with_unknown_colours(), table, "a.png", ignore_index=255, unknown="ignore")
    expected = np.zeros((3, 4), dtype=np.uint8)
    expected[1, 3] = expected[2, 0] = 255
    expected[0, 1] = 2
    np.testing.assert_array_equal(indices, expected)


def test_snap_maps_noisy_colours_to_the_nearest_table_colour(table):
    rgb = np.array([[(250, 3, 2), (20, 230, 10), (3, 3, 3)], [(205, 4, 0), (240, 250, 245), (10, 20, 30)]], np.uint8)
    indices = decode_color_mask(rgb, table, "a.png", ignore_index=255, snap=True)  # unknown="error" never fires
    np.testing.assert_array_equal(indices, [[1, 2, 0], [1, 255, 0]])


def test_jpeg_colour_mask_snaps_back_to_its_indices(table):
    blocks = np.array([[0, 1, 2, 0, 2, 1], [2, 0, 1, 1, 0, 2], [1, 2, 0, 2, 1, 0], [0, 0, 2, 1, 2, 1]])
    rows = np.kron(blocks, np.ones((13, 13), dtype=int))  # 52x78: edges off JPEG's 8x8 grid, where it rings most
    rgb = np.array([BLACK, RED, GREEN], dtype=np.uint8)[rows]
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=75)
    data = buffer.getvalue()
    with pytest.raises(DataError, match="not in the colour table"):  # JPEG's colours are not the table's
        read_color_mask(data, "a.jpg", table, ignore_index=255)
    indices = read_color_mask(data, "a.jpg", table, ignore_index=255, snap=True)
    assert (indices == rows).mean() >= 0.99


def test_read_color_mask_from_palette_and_rgba_files(table):
    rgb = np.array([[BLACK, RED], [GREEN, DARK_RED]], dtype=np.uint8)
    expected = [[0, 1], [2, 1]]
    palette = Image.fromarray(rgb).quantize(colors=4)
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    assert Image.open(io.BytesIO(buffer.getvalue())).mode == "P"
    np.testing.assert_array_equal(read_color_mask(buffer.getvalue(), "p.png", table, 255), expected)
    rgba = np.concatenate([rgb, np.full((2, 2, 1), 7, np.uint8)], axis=2)  # a faint alpha, dropped
    np.testing.assert_array_equal(read_color_mask(_png(rgba, "RGBA"), "rgba.png", table, 255), expected)


def test_read_color_mask_refuses_corrupt_and_16_bit_files(table):
    with pytest.raises(DataError, match=r"bad\.png: the mask does not decode"):
        read_color_mask(b"not a png", "bad.png", table, 255)
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((2, 2), dtype=np.uint16)).save(buffer, format="PNG")
    with pytest.raises(DataError, match=r"deep\.png: the mask is I;16"):
        read_color_mask(buffer.getvalue(), "deep.png", table, 255)


class _CountingDecode:
    """A decode callable that counts its calls, the way a test sees whether the cache answered."""

    def __init__(self, mask: np.ndarray):
        self.mask, self.calls = mask, 0

    def __call__(self) -> np.ndarray:
        self.calls += 1
        return self.mask


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "masks" / "a.png"
    path.parent.mkdir()
    path.write_bytes(b"first version")
    return path


MASK = np.array([[0, 1, 2], [255, 1, 0]], dtype=np.uint8)


def test_cache_decodes_once(tmp_path, source):
    folder = tmp_path / "cache" / "colors"
    cache, decode = MaskCache(folder, "settings"), _CountingDecode(MASK)
    assert not folder.exists()  # created only when something is stored
    np.testing.assert_array_equal(cache.get(source, decode), MASK)
    again = cache.get(source, decode)
    assert decode.calls == 1 and again.dtype == np.uint8
    np.testing.assert_array_equal(again, MASK)
    assert [path.suffix for path in folder.iterdir()] == [".png"]  # no temporary file left behind
    with Image.open(next(folder.iterdir())) as image:
        assert image.mode == "L"


def test_cache_decodes_a_changed_source_again(tmp_path, source):
    cache, decode = MaskCache(tmp_path / "cache", "settings"), _CountingDecode(MASK)
    cache.get(source, decode)
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # same size, new time
    cache.get(source, decode)
    assert decode.calls == 2
    source.write_bytes(b"second, longer version")
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # new size, the time as before
    cache.get(source, decode)
    assert decode.calls == 3


def test_cache_settings_key_is_part_of_the_entry(tmp_path, source):
    decode = _CountingDecode(MASK)
    first, second = MaskCache(tmp_path / "cache", "snap"), MaskCache(tmp_path / "cache", "exact")
    first.get(source, decode)
    second.get(source, decode)
    assert decode.calls == 2 and first.entry(source) != second.entry(source)
    first.get(source, decode)
    second.get(source, decode)
    assert decode.calls == 2


def test_cache_corrupt_entry_is_decoded_again_and_rewritten(tmp_path, source):
    cache, decode = MaskCache(tmp_path / "cache", "settings"), _CountingDecode(MASK)
    cache.get(source, decode)
    entry = cache.entry(source)
    entry.write_bytes(entry.read_bytes()[:40])  # truncated, as by a full disk
    np.testing.assert_array_equal(cache.get(source, decode), MASK)
    assert decode.calls == 2
    np.testing.assert_array_equal(cache.get(source, decode), MASK)
    assert decode.calls == 2


@pytest.fixture(scope="module")
def shared_table(tmp_path_factory):
    path = tmp_path_factory.mktemp("table") / "class_dict.csv"
    path.write_text(TABLE)
    return read_color_table(path)


@settings(max_examples=60, deadline=None)
@given(rows=arrays(np.intp, st.tuples(st.integers(1, 12), st.integers(1, 12)), elements=st.integers(0, 4)))
def test_decoding_an_image_built_from_table_colours_gives_its_classes(shared_table, rows):
    rgb = shared_table.colors[rows]
    expected = shared_table.classes[rows]
    np.testing.assert_array_equal(decode_color_mask(rgb, shared_table, "p.png", 255), expected)
    np.testing.assert_array_equal(decode_color_mask(rgb, shared_table, "p.png", 255, snap=True), expected)
