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


def read_split_list(path: Path) -> list[tuple[str, str, str]]:
    """(id, image, mask) of each line of a split list: the id is the first word's stem (VOC's ``train.txt`` holds
    ids alone; Oxford-IIIT Pet's ``trainval.txt`` adds class numbers after it); image and mask are the first and
    second words when they name files (SegNet's ``/SegNet/CamVid/train/x.png /SegNet/CamVid/trainannot/x.png``),
    else ""."""
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise DataError(f"{path}: cannot read the split list ({error.strerror}); check --split") from None
    entries = []
    for words in (line.split() for line in lines if line.strip() and not line.lstrip().startswith("#")):
        image = words[0] if _names_a_file(words[0]) else ""
        mask = words[1] if image and len(words) > 1 and _names_a_file(words[1]) else ""
        entries.append((Path(words[0].replace("\\", "/")).stem, image, mask))
    if not entries:
        raise DataError(f"{path}: the split list holds no ids (one a line)")
    return entries


def _names_a_file(word: str) -> bool:
    """Whether a list's word is a file name (``x.png``, a path), not an id or a number (``2007_000032``, ``1``)."""
    suffix = Path(word).suffix[1:]
    return suffix.isalnum() and not suffix.isdigit()


def read_id_list(path: Path) -> list[str]:
    """The ids of a split list, one a line: see read_split_list."""
    return [image_id for image_id, _, _ in read_split_list(path)]


def lists_pair_files(root: Path, parts: dict[str, str]) -> bool:
    """Whether the split's lists name each image and its mask (two files a line) rather than ids: a line of two
    files whose image is found in the data folder by its path (else the lines' stems are ids, paired by the layout's
    own folders, as a list of ``x.png x.png`` beside ``images/`` and ``masks/`` always was)."""
    for spec in parts.values():
        for _, image, mask in read_split_list(resolve(root, spec)):
            if mask:
                return _listed_file(root, image) is not None
    return False


def _tails(text: str) -> list[Path]:
    """A listed path's tails, longest first: ``/SegNet/CamVid/train/x.png`` -> ``SegNet/CamVid/train/x.png``, ...,
    ``x.png`` (a list written on Windows, ``C:\\SegNet\\...``, likewise)."""
    parts = [part for part in text.replace("\\", "/").split("/") if part and not part.endswith(":")]
    return [Path(*parts[start:]) for start in range(len(parts))]


def _listed_file(root: Path, text: str) -> Path | None:
    path = Path(text)
    candidates = ([path] if path.is_absolute() else []) + [root / tail for tail in _tails(text)]
    return next((candidate for candidate in candidates if candidate.is_file()), None)


def find_listed_file(root: Path, text: str, listing: Path, kind: str) -> Path:
    """The file a list's path names: the path itself when it is there, else the data folder's file of the same name
    under the same folders, the longest tail of the path found (``/SegNet/CamVid/train/x.png``: ``CamVid/train/x.png``,
    then ``train/x.png``, then ``x.png``), since lists are often written on another machine."""
    found = _listed_file(root, text)
    tails = _tails(text)
    if found is None:
        tried = ", ".join(str(tail) for tail in tails[-3:])
        raise DataError(
            f"{listing}: {kind} {text} not found in {root} as {tried}; a listed path is looked up by its file name "
            "and the folders above it inside --data-dir"
        )
    return found


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
