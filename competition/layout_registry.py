"""The registry of data layouts: each layout's name -> its class, tried in order to recognise a data folder."""

from collections.abc import Callable
from pathlib import Path

from competition.errors import DataError

# name -> layout class, in the order detection tries them; competition.layouts fills it, one line a layout. A class
# has ``detect(root) -> bool`` (static), ``open(root, test_folder, options)`` (a class method: the data object) and
# the facts training, folds, inference and inspect_data ask: see competition.segmentation_data.SegmentationData.
LAYOUTS: dict[str, type] = {}
LAYOUT_HELP = (
    "Expected one of: Carvana (train/ + train_masks/ or train_masks.csv, or their zips); image/mask folders (images/ + masks/, or "
    "VOC's JPEGImages/ + SegmentationClass/ or SegmentationClassPNG/, masks named as their images); labelme JSON "
    "files beside their images; Oxford-IIIT Pet (images/ + annotations/trimaps/); masks as a table of RLE rows per "
    "image and class (--masks-csv FILE). Force one with --layout"
)


def layout_choices() -> tuple[str, ...]:
    """The values --layout takes: auto, then each layout's name."""
    return ("auto", *sorted(LAYOUTS))


def detect_layout(root: str | Path, found_hint: Callable[[Path], str] | None = None) -> str:
    """The layout a data folder holds, from its folder names (the same on every copy of a data set): the first
    registered layout whose ``detect`` holds. When none does, the error says what ``found_hint(root)`` says (the
    folders of images there and the flags that would read them)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found. {LAYOUT_HELP}")
    for name, layout in LAYOUTS.items():
        if layout.detect(root):
            return name
    hint = known_data_set_hint(root) or (found_hint(root) if found_hint else "")
    raise DataError(f"{root}: no data layout recognised.{hint} {LAYOUT_HELP}")


def known_data_set_hint(root: Path) -> str:
    """A sentence naming the settings of a data set recognised by its folders, when reading it needs them."""
    if (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir():
        return " It looks like Cityscapes as downloaded (leftImg8bit/, gtFine/): pass --config configs/cityscapes.toml."
    return ""
