"""Passes over a data set's masks before training or splitting: each sample checked, classes or values counted, on threads."""

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm.auto import tqdm

from competition.errors import DataError
from competition.mask_values import label_pixel_counts, value_histogram

logger = logging.getLogger(__name__)

NAMED_PROBLEMS = 3  # broken samples named in the error; the rest are counted
MAX_THREADS = 8  # decoding scales to a few cores; more threads only add contention


def survey_threads() -> int:
    """Threads for a survey: Pillow and OpenCV decode with the GIL released, so threads use the idle cores before
    the first step (the loaders start after it)."""
    return max(1, min(MAX_THREADS, os.cpu_count() or 1))


def stored_value_histogram(read_stored, stems, threads: int | None = None) -> np.ndarray:
    """Pixels of each of the 256 stored values over the masks of ``stems``, each read once on threads by
    ``read_stored(stem)`` (the mask as stored, before values become classes): how a folder's values are recognised."""
    total = np.zeros(256, dtype=np.int64)
    with ThreadPoolExecutor(threads or survey_threads()) as pool:
        for histogram in pool.map(lambda stem: value_histogram(read_stored(stem)), stems):
            total += histogram
    return total


def in_data_folder(data, error: DataError) -> str:
    """The error's line, the file it begins with named relative to the data folder (``train/a.jpg: ...``)."""
    return str(error).removeprefix(f"{data.root}{os.sep}")


def checked_samples(
    data, image_ids: list[str], count: int, threads: int | None = None, progress: bool = True
) -> tuple[list[np.ndarray], list[str]]:
    """(the 256-value histograms of the first ``count`` masks, one line per broken sample): each sample of
    ``image_ids`` read once on threads and checked as the loader reads it (``check_sample``, or
    ``checked_mask_histogram`` where it is counted: each file decoded to its end). The one check of the samples
    that training runs first and that inspect_data lists, so the two agree. A problem names its file relative to
    the data folder."""

    def visit(index: int, image_id: str):
        try:
            if index < count:
                return data.checked_mask_histogram(image_id)
            data.check_sample(image_id)
            return None
        except DataError as error:
            return error

    bar = tqdm(total=len(image_ids), desc="check data", unit="img", disable=not progress, dynamic_ncols=True)
    results = []
    # On Ctrl-C map's iterator cancels the images not yet started: nothing is read after it.
    with bar, ThreadPoolExecutor(threads or survey_threads()) as pool:
        for result in pool.map(visit, range(len(image_ids)), image_ids):  # in the order of image_ids
            results.append(result)
            bar.update()
    problems = [in_data_folder(data, result) for result in results if isinstance(result, DataError)]
    return [result for result in results[:count] if not isinstance(result, DataError)], problems


def survey(
    data,
    image_ids: list[str],
    *,
    check: bool,
    count: int,
    threads: int | None = None,
    progress: bool = True,
) -> np.ndarray | None:
    """Each sample of ``image_ids`` read once: checked as the loader would read it (``check``, by
    ``checked_samples``; every broken one gathered into one DataError naming the first few), and the pixels of each
    class counted, the ignore index left out, in the masks of the first ``count`` images (``len(image_ids)`` for
    all; 0 for none). Returns those (count, classes) int64 counts, or None when ``count`` is 0. Unchecked, the
    first unreadable mask raises."""
    if not image_ids or not (check or count):
        return None
    if not check:
        with ThreadPoolExecutor(threads or survey_threads()) as pool:
            counted = tqdm(
                pool.map(data.class_pixel_counts, image_ids[:count]),
                total=count,
                desc="count classes",
                unit="img",
                disable=not progress,
                dynamic_ncols=True,
            )
            return np.stack(list(counted)).astype(np.int64)
    histograms, problems = checked_samples(data, image_ids, count, threads, progress)
    if problems:
        more = f" (and {len(problems) - NAMED_PROBLEMS} more)" if len(problems) > NAMED_PROBLEMS else ""
        raise DataError(
            f"{len(problems)} of {len(image_ids)} training samples are broken: "
            f"{' | '.join(problems[:NAMED_PROBLEMS])}{more}; in {data.root}: fix them, or pass --no-check to meet "
            "them in the loader"
        )
    logger.info("checked %d images and their masks, each file decoded to its end", len(image_ids))
    if not count:
        return None
    if data.multilabel:  # a pixel counts in every class whose bit it holds
        return label_pixel_counts(np.stack(histograms), data.num_classes)
    return np.stack(histograms)[:, : data.num_classes].astype(np.int64)
