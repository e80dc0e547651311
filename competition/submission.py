"""Submission files: rows written to a temporary file and renamed when complete, resumable, validated."""

import os
from pathlib import Path

import numpy as np
import pandas as pd

from competition.data import DataError
from competition.files import partial_path
from competition.rle import RLEError, rle_runs

HEADER = "img,rle_mask\n"


class SubmissionWriter:
    """Appends ``img,rle_mask`` rows to ``<path>.partial``; ``close`` renames it to ``path``.

    With ``resume`` the rows of an interrupted run are kept (a torn last line is dropped) and
    ``done`` holds their image names, so that the caller skips them.
    """

    def __init__(self, path: str | Path, resume: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.partial = partial_path(self.path)
        self.done: list[str] = []
        if resume and self.partial.exists():
            text = self.partial.read_text()
            complete = text[: text.rfind("\n") + 1] if text.startswith(HEADER) else HEADER
            self.done = [line.split(",", 1)[0] for line in complete.splitlines()[1:]]
            self.partial.write_text(complete)
            self.handle = open(self.partial, "a")  # noqa: SIM115 - the writer holds it until close()
        else:
            self.handle = open(self.partial, "w")  # noqa: SIM115 - the writer holds it until close()
            self.handle.write(HEADER)

    def write(self, rows: list[tuple[str, str]]) -> None:
        self.handle.write("".join(f"{img},{rle}\n" for img, rle in rows))

    def close(self) -> Path:
        self.handle.close()
        os.replace(self.partial, self.path)
        return self.path


def validate_submission(path: str | Path, expected_images: list[str], shape: tuple[int, int]) -> pd.DataFrame:
    """Check the header, that every expected image appears exactly once, and that every RLE
    decodes within an image of ``shape``. Returns the rows with each mask's area fraction."""
    path = Path(path)
    with open(path) as handle:
        if handle.readline() != HEADER:
            raise DataError(f"{path}: the header must be {HEADER.strip()!r}")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    duplicated = frame["img"][frame["img"].duplicated()].tolist()
    if duplicated:
        raise DataError(f"{path}: {len(duplicated)} image(s) appear twice, e.g. {duplicated[:3]}")
    missing = sorted(set(expected_images) - set(frame["img"]))
    extra = sorted(set(frame["img"]) - set(expected_images))
    if missing or extra:
        raise DataError(
            f"{path}: {len(missing)} test image(s) missing (e.g. {missing[:3]}), "
            f"{len(extra)} unknown (e.g. {extra[:3]})"
        )
    n_pixels = shape[0] * shape[1]
    areas = []
    for img, rle in zip(frame["img"], frame["rle_mask"]):
        try:
            starts, ends = rle_runs(rle, n_pixels)
        except RLEError as error:
            raise DataError(f"{path}: row {img}: {error}") from None
        areas.append(int((ends - starts).sum()) / n_pixels)
    frame["area"] = np.asarray(areas)
    return frame
