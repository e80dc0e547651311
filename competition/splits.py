"""Official splits: ``--split train=A,val=B,test=C``, each part a list of ids or an image folder and its masks."""

from pathlib import Path

from competition.errors import ConfigError, DataError

SPLIT_NAMES = ("train", "val", "test")  # a misspelt one must not train on test images unnoticed
SPLIT_EXAMPLES = "e.g. train=ImageSets/Segmentation/train.txt,val=ImageSets/Segmentation/val.txt or train=train,val=val"
# Mask folders tried beside a split's image folder ``A`` when none is named: CamVid's ``Aannot``, then common names.
MASK_FOLDER_SUFFIXES = ("annot", "_masks", "_labels", "_annot")


def parse_split(text: str) -> dict[str, str]:
    """``train=a,val=b`` -> {"train": "a", "val": "b"}: names unique, every part named, ``val`` and ``test``
    the names the folds and infer.py read."""
    parts: dict[str, str] = {}
    for item in (item.strip() for item in text.split(",") if item.strip()):
        name, sep, spec = item.partition("=")
        name, spec = name.strip(), spec.strip()
        if not sep or not name or not spec:
            raise ConfigError(f"--split {text!r}: each part is NAME=LIST.txt or NAME=IMAGES[:MASKS], {SPLIT_EXAMPLES}")
        if name not in SPLIT_NAMES:
            raise ConfigError(
                f"--split {text!r}: split {name!r} is none of {', '.join(SPLIT_NAMES)} (train: fold 1, val: fold 0, "
                "test: infer.py's images); name each part so"
            )
        if name in parts:
            raise ConfigError(f"--split {text!r}: split {name!r} named twice")
        parts[name] = spec
    if not parts:
        raise ConfigError(f"--split {text!r}: name at least one split, {SPLIT_EXAMPLES}")
    kinds = {is_id_list(spec) for spec in parts.values()}
    if len(kinds) > 1:
        raise ConfigError(f"--split {text!r}: give either id lists (.txt) for every split or folders for every split")
    return parts


def is_id_list(spec: str) -> bool:
    """Whether a split part names a list of ids (a ``.txt`` file) rather than an image folder."""
    return spec.lower().endswith(".txt")


def resolve(root: Path, text: str) -> Path:
    """A path given relative to the data folder (or absolute)."""
    path = Path(text).expanduser()
    return path if path.is_absolute() else root / path


def read_id_list(path: Path) -> list[str]:
    """The ids of a split list, one a line (VOC's ``ImageSets/Segmentation/train.txt``); only the first word
    of a line counts, as a file's stem (Oxford-IIIT Pet's ``trainval.txt`` adds class numbers after the id)."""
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise DataError(f"{path}: cannot read the split list ({error.strerror}); check --split") from None
    ids = [Path(line.split()[0]).stem for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not ids:
        raise DataError(f"{path}: the split list holds no ids (one a line)")
    return ids


def split_folders(root: Path, name: str, spec: str, masks: str) -> tuple[Path, Path | None]:
    """(image folder, mask folder or None) of a folder split ``IMAGES[:MASKS]``. Without ``:MASKS`` the masks
    are ``--masks``/<the image folder's name> (ADE20K: annotations/training), or a sibling named like CamVid's
    ``trainannot``; a test split may have none."""
    image_text, _, mask_text = spec.partition(":")
    images = resolve(root, image_text)
    if not images.is_dir():
        raise DataError(f"--split {name}={spec}: image folder {images} not found")
    if mask_text:
        mask_folder = resolve(root, mask_text)
        if not mask_folder.is_dir():
            raise DataError(f"--split {name}={spec}: mask folder {mask_folder} not found")
        return images, mask_folder
    candidates = ([resolve(root, masks) / images.name] if masks else []) + [
        images.with_name(images.name + suffix) for suffix in MASK_FOLDER_SUFFIXES
    ]
    found = next((folder for folder in candidates if folder.is_dir()), None)
    if found is None and name != "test":
        tried = ", ".join(str(folder) for folder in candidates)
        raise DataError(f"--split {name}={spec}: no mask folder ({tried}); name it as {name}={image_text}:MASK_FOLDER")
    return images, found
