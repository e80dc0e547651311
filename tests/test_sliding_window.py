"""Sliding-window prediction: windows over the image, blended so that a per-pixel model gives the whole image's
probabilities to within float16's rounding, on disk when large, the mask written band by band; tile and overlap
refused in one line."""

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from competition import sliding_window
from competition.errors import ConfigError
from competition.sliding_window import (
    InMemory,
    blended_bands,
    check_tiling,
    npy_mask_writer,
    predict_mask,
    window_starts,
)


def per_pixel(windows: np.ndarray) -> np.ndarray:
    """A model that is a function of each pixel alone (a 1x1 convolution and a softmax): tiles cannot change it."""
    logits = windows.astype(np.float32) @ np.array([[0.03, -0.02], [-0.01, 0.02], [0.01, 0.0]], np.float32) - 1
    exp = np.exp(logits - logits.max(-1, keepdims=True))
    return np.moveaxis(exp / exp.sum(-1, keepdims=True), -1, 1)


def foreground(windows: np.ndarray) -> np.ndarray:
    return per_pixel(windows)[:, 1:]


@pytest.fixture
def image():
    return np.random.default_rng(1).integers(0, 256, (300, 517, 3), np.uint8)


@pytest.mark.parametrize("weighting", ["gaussian", "ramp", "uniform"])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
@pytest.mark.parametrize("memory_limit", [2**30, 0], ids=["in-memory", "on-disk"])
def test_tiles_give_the_whole_image_probabilities_within_float16_rounding(
    tmp_path, image, weighting, overlap, memory_limit
):
    whole = np.moveaxis(per_pixel(image[None])[0], 0, -1)
    bands = list(
        blended_bands(
            InMemory(image),
            per_pixel,
            128,
            overlap,
            weighting,
            batch_size=3,
            work_dir=tmp_path,
            memory_limit=memory_limit,
        )
    )
    tops = [top for top, _ in bands]
    assert (
        tops[0] == 0 and tops == sorted(tops) and len(bands) == len(window_starts(300, 128, round(128 * (1 - overlap))))
    )
    blended = np.concatenate([band for _, band in bands])
    # float16 carries a row's sums to the next row of windows, rounding by at most 2**-12 each time; with an overlap
    # up to 1/2 (and the last window flush with the edge) a row meets at most three rows of windows: two carries
    assert blended.shape == whole.shape and np.abs(blended - whole).max() <= 2 * 2**-12
    assert list(tmp_path.iterdir()) == []  # the accumulator's file is gone


def test_the_accumulator_of_a_large_image_is_a_file_mapped_band_by_band(tmp_path, image):
    seen = []
    for _ in blended_bands(InMemory(image), foreground, 64, 0.5, work_dir=tmp_path, memory_limit=1000):
        seen.append([(path.name, path.stat().st_size) for path in tmp_path.iterdir()])
    assert all(len(files) == 1 and files[0][1] == 300 * 517 * 2 for files in seen)  # float16, one class
    assert seen[0][0][0].startswith("accumulator-") and list(tmp_path.iterdir()) == []


def test_the_mask_equals_the_whole_image_mask_and_is_written_band_by_band(tmp_path, image):
    whole = foreground(image[None])[0, 0]
    with npy_mask_writer(tmp_path / "mask.npy", 300, 517) as write:
        windows = predict_mask(InMemory(image), foreground, write, 96, 0.25, work_dir=tmp_path, memory_limit=0)
    mask = np.load(tmp_path / "mask.npy")
    assert windows == len(window_starts(300, 96, 72)) * len(window_starts(517, 96, 72))
    sure = np.abs(whole - 0.5) > 2 * 2**-12  # pixels whose side of the threshold rounding cannot change
    assert sure.mean() > 0.99 and (mask[sure] == (whole[sure] > 0.5)).all()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mask.npy"]


def test_several_classes_take_the_argmax(image):
    whole = per_pixel(image[None])[0].argmax(0)
    bands = []
    predict_mask(InMemory(image), per_pixel, lambda top, band: bands.append(band), 64, 0.5)
    mask = np.concatenate(bands)
    assert (mask == whole).mean() > 0.99


def test_an_image_smaller_than_the_tile_is_padded(image):
    small = image[:40, :70]
    seen = []

    def predict(windows):
        seen.append(windows.shape)
        return foreground(windows)

    (top, band), *rest = blended_bands(InMemory(small), predict, 128, 0.25)
    assert seen == [(1, 128, 128, 3)] and top == 0 and not rest
    np.testing.assert_allclose(band[..., 0], foreground(small[None])[0, 0], atol=1e-6)


def test_windows_cover_every_pixel_and_the_last_is_flush_with_the_edge():
    assert window_starts(300, 128, 96) == [0, 96, 172]
    assert window_starts(128, 128, 96) == [0] and window_starts(50, 128, 96) == [0]
    assert window_starts(1024, 256, 256) == [0, 256, 512, 768]


def test_a_failed_mask_leaves_no_file(tmp_path, image):
    def broken(windows):
        raise RuntimeError("the model failed")

    with pytest.raises(RuntimeError), npy_mask_writer(tmp_path / "mask.npy", 300, 517) as write:
        predict_mask(InMemory(image), broken, write, 64, 0.25, work_dir=tmp_path, memory_limit=0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "tile, overlap, message",
    [
        (100, 0.25, "--tile 100: must be a positive multiple of 32, e.g. 96"),
        (0, 0.25, "--tile 0: must be a positive multiple of 32, e.g. 32"),
        (256, 1.0, "--tile-overlap 1.0: must be at least 0 and below 1"),
        (256, 1.5, "--tile-overlap 1.5: must be at least 0 and below 1"),
        (256, -0.1, "--tile-overlap -0.1: must be at least 0 and below 1"),
    ],
)
def test_a_tile_or_overlap_that_cannot_be_used_is_one_line(tile, overlap, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")) as error:
        check_tiling(tile, overlap)
    assert "\n" not in str(error.value)


def test_an_unknown_weighting_is_one_line():
    with pytest.raises(ConfigError, match="--tile-weighting 'cosine': choose one of gaussian, ramp, uniform"):
        sliding_window.weight_profile(64, "cosine")


@pytest.mark.slow
def test_the_slides_bench_measures_each_size_in_its_own_process(tmp_path, capsys):
    from bench import slides_bench

    slides_bench.main(["--sizes", "1024,2048", "--tile", "256", "--window", "512", "--work", str(tmp_path)])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| 1024x1024", "| 2048x2048"))]
    assert len(rows) == 4, rows  # the sliding window's table, then infer.py's, a row per size each
    rows = rows[:2]
    assert "| 25 |" in rows[0] and "| 121 |" in rows[1]  # windows of 256 every 192 pixels
    assert all(float(row.split("|")[7]) > 0.99 for row in rows)  # Dice of the per-pixel model against the truth
    assert "one 512x512 window of the 2048x2048 tiled TIFF" in out
    seams = {
        line.split("|")[1].strip(): float(line.split("|")[3])
        for line in out.splitlines()
        if line.startswith("|") and ", overlap " in line
    }
    assert seams["gaussian, overlap 0.25"] > 0.99 > seams["uniform, overlap 0.0"]  # blended: no seam to speak of
    assert sorted(path.name for path in tmp_path.iterdir()) == []  # slides, masks and accumulators removed


@pytest.mark.parametrize("flags", [["--tile", "1000"], ["--tile-overlap", "1"], ["--sizes", "4k"]])
def test_the_slides_bench_refuses_in_one_line(tmp_path, capsys, flags):
    from bench import slides_bench

    with pytest.raises(SystemExit) as stop:
        slides_bench.main([*flags, "--work", str(tmp_path)])
    assert stop.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_no_room_for_the_accumulator_is_one_line_and_leaves_nothing(tmp_path, image, monkeypatch):
    import errno
    import os

    from competition.errors import DiskFullError

    def full(descriptor, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(DiskFullError, match=r"no room left for the sliding window's accumulator \(310.2 kB"):
        list(blended_bands(InMemory(image), foreground, 64, 0.25, work_dir=tmp_path, memory_limit=0))
    assert list(tmp_path.iterdir()) == []


class _PerPixel(torch.nn.Module):
    """A 1x1 convolution of the 0-1 scaled image: each pixel's logit from its own colour alone."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 1, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images.float() / 255 * 8 - 4)


def test_a_fold_ensemble_with_tta_through_the_window_gives_its_whole_image_probabilities(tmp_path, image):
    from competition.config import TrainConfig
    from competition.inference import Ensemble, Member
    from competition.slide_inference import window_predictor

    members = [Member(tmp_path / f"{seed}.pt", _PerPixel(seed), TrainConfig(size="full"), None) for seed in (0, 1)]
    ensemble = Ensemble(members, ("hflip",))
    whole = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
    with torch.inference_mode():
        expected = ensemble.probabilities({"full": whole}, image.shape[:2])[0, 0].numpy()
    bands = list(blended_bands(InMemory(image), window_predictor(ensemble), 96, 0.25, batch_size=4))
    blended = np.concatenate([band for _, band in bands])[..., 0]
    assert blended.shape == expected.shape and np.abs(blended - expected).max() <= 2 * 2**-12 + 1e-6
    assert 0.1 < (expected > 0.5).mean() < 0.9  # the models are not constant: the windows carry information


@settings(max_examples=40, deadline=None)
@given(
    head=st.sampled_from(["binary", "multilabel", "softmax"]),
    classes=st.integers(2, 4),
    rows=st.integers(1, 12),
    width=st.integers(1, 12),
    threshold=st.floats(0.05, 0.95),
    seed=st.integers(0, 2**16),
)
def test_bands_are_labelled_as_whole_images_are_by_every_head(head, classes, rows, width, threshold, seed):
    from competition.postprocess import ClassRule, PostProcess
    from competition.prediction_stream import class_masks
    from competition.slide_inference import band_labelling

    channels = 1 if head == "binary" else classes
    band = np.random.default_rng(seed).random((rows, width, channels), dtype=np.float32)
    whole = torch.from_numpy(np.moveaxis(band, -1, 0)[None].copy())
    labels = band_labelling(threshold, head == "multilabel")(band)
    np.testing.assert_array_equal(labels, class_masks(whole, threshold, head == "multilabel")[0])
    limits = [None if head == "softmax" else threshold + 0.01 * k for k in range(channels)]
    rules = PostProcess(head, tuple(ClassRule(f"c{k}", limit, 3, 0) for k, limit in enumerate(limits)))
    thresholds_alone = dataclasses.replace(rules, rules=tuple(ClassRule(r.name, r.threshold) for r in rules.rules))
    tuned = band_labelling(threshold, head == "multilabel", rules)(band)
    np.testing.assert_array_equal(tuned, thresholds_alone.mask(whole[0].numpy()))
    np.testing.assert_array_equal(rules.clean(tuned), rules.mask(whole[0].numpy()))
