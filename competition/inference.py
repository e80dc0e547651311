"""Prediction with fold ensembles: checkpoints to models, the test set through the stream into a writer on this
process's device, one image, ONNX."""

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from competition.averaging import AVERAGED_NAME, SWA_NAME
from competition.checkpoints import checkpoint_config, load_checkpoint
from competition.clock import Deadline
from competition.config import TrainConfig
from competition.data import as_rgb, decode_image, resize_image, to_chw
from competition.errors import CheckpointError, DataError
from competition.files import atomic_output
from competition.models import build_model
from competition.postprocess import PostProcess, find_file, head_of, predicted_classes, read_postprocess
from competition.prediction import average_views, model_input, predict_probabilities, prepare_model, view_probabilities
from competition.prediction_stream import class_masks, expected_shape, image_batches, predict_into
from competition.slides import header_shape
from competition.submission import predicted_by
from competition.writers import (
    Output,
    colour_overlay,
    disk_full_is_one_line,
    encode_mask_png,
    label_overlay,
    overlay,
    palette,
    save_png,
)

__all__ = [
    "CheckpointError",
    "Ensemble",
    "Member",
    "OnnxModel",
    "find_checkpoints",
    "load_member",
    "predict_images",
    "write_submission",
]

logger = logging.getLogger(__name__)


@dataclass
class Member:
    """One fold model of the ensemble and the settings it was trained with."""

    path: Path
    model: torch.nn.Module
    config: TrainConfig
    image_shape: tuple[int, int] | None
    forward: torch.nn.Module | None = None  # what predicts: the compiled model, or the model itself

    def __post_init__(self):
        if self.forward is None:
            self.forward = self.model

    @property
    def size_key(self) -> str:
        size = self.config.input_size()
        return "full" if size is None else f"{size[0]}x{size[1]}"

    def model_input(self, images: dict[str, torch.Tensor]) -> torch.Tensor:
        """This member's batch from a loader's images at every size, in its memory format."""
        return model_input(images[self.size_key], self.config.channels_last)


# infer.py --weights -> the file of each fold folder, and the train.py flag that makes it.
WEIGHTS_FILES = {
    "best": ("best.pt", ""),
    "averaged": (AVERAGED_NAME, "--average-top K (e.g. --average-top 3)"),
    "swa": (SWA_NAME, "--swa-epochs N (e.g. --swa-epochs 3)"),
}


def find_checkpoints(paths: list[str | Path], weights: str = "best") -> list[Path]:
    """Checkpoint files: each path is a checkpoint file or a run folder holding ``fold*/best.pt`` (or a fold
    folder holding ``best.pt``); of each fold folder, the file of ``weights`` (a key of WEIGHTS_FILES)."""
    name, made_by = WEIGHTS_FILES[weights]
    found = []
    for path in map(Path, paths):
        if path.is_file():
            if weights != "best":
                raise CheckpointError(
                    f"--weights {weights} picks {name} in run folders, and {path} is a checkpoint file: give its run "
                    "folder, or leave --weights out"
                )
            found.append(path)
        elif path.is_dir():
            folds = sorted(best.parent for best in path.glob("fold*/best.pt")) or (
                [path] if (path / "best.pt").is_file() else []
            )
            if not folds:
                raise CheckpointError(f"{path}: no fold*/best.pt inside; train with `python train.py --out {path}`")
            for fold in folds:
                if not (fold / name).is_file():
                    raise CheckpointError(
                        f"{fold}: no {name} (--weights {weights}); train.py writes it with {made_by}: train the "
                        "fold again with it, or leave --weights out"
                    )
            found += [fold / name for fold in folds]
        else:
            raise CheckpointError(f"{path}: no such checkpoint file or run folder")
    return found


def load_member(path: str | Path, device: torch.device, compile: bool = False) -> Member:
    """A model rebuilt from its checkpoint alone (``weights_only``: an untrusted file cannot run code),
    on ``device`` in the memory format it was trained in, compiled with ``compile``."""
    checkpoint = load_checkpoint(path)
    config = checkpoint_config(checkpoint, path)
    model = build_model(
        config.arch, config.encoder, "none", classes=config.output_channels(), in_channels=config.in_channels
    )
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise CheckpointError(
            f"{path}: its weights do not fit {config.arch}-{config.encoder}, the model its config names "
            f"({str(error).splitlines()[0]}); the file was altered or comes from another code version"
        ) from None
    model, forward = prepare_model(model.eval(), device, config.channels_last, compile)
    shape = checkpoint.get("image_shape")
    return Member(Path(path), model, config, tuple(shape) if shape else None, forward)


class Ensemble:
    """Fold models averaged in probability space, each fed the input size it was trained on."""

    def __init__(self, members: list[Member], tta: tuple[str, ...] = (), precision: str = "fp32"):
        if not members:
            raise CheckpointError("no checkpoints to predict with")
        classes = {tuple(member.config.class_names()) for member in members}
        if len(classes) > 1:
            raise CheckpointError(
                f"the checkpoints were trained on different classes ({' | '.join(map(','.join, sorted(classes)))}): "
                "an ensemble averages one set of classes"
            )
        heads = {member.config.multilabel() for member in members}
        if len(heads) > 1:
            raise CheckpointError(
                "the checkpoints mix --head multilabel (a sigmoid per class) with one-class-per-pixel heads: an "
                "ensemble averages one kind of probabilities"
            )
        channels = {member.config.in_channels for member in members}
        if len(channels) > 1:
            raise CheckpointError(
                "the checkpoints take different image channels (in_channels "
                f"{' and '.join(map(str, sorted(channels)))}): an ensemble reads each image one way"
            )
        self.members, self.tta, self.precision = members, tta, precision

    @property
    def multilabel(self) -> bool:
        """Whether the members have one sigmoid channel per class (--head multilabel): masks are packed bits."""
        return self.members[0].config.multilabel()

    @property
    def in_channels(self) -> int:
        """The image channels every member takes: 3 (RGB) or 1 (grey)."""
        return self.members[0].config.in_channels

    @property
    def device(self) -> torch.device:
        return next(self.members[0].model.parameters()).device

    @property
    def input_sizes(self) -> dict[str, tuple[int, int] | None]:
        return {member.size_key: member.config.input_size() for member in self.members}

    def probabilities(self, images: dict[str, torch.Tensor], output_size: tuple[int, int]) -> torch.Tensor:
        total = None
        for member in self.members:
            probabilities = predict_probabilities(
                member.forward, member.model_input(images), output_size, self.tta, self.precision, self.multilabel
            )
            total = probabilities if total is None else total + probabilities
        return total / len(self.members)

    def plain_and_augmented(
        self, images: dict[str, torch.Tensor], output_size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the identity view alone, the identity and every TTA view), each averaged over the members:
        one pass over the views serves both."""
        plain = augmented = 0
        for member in self.members:
            views = view_probabilities(
                member.forward, member.model_input(images), self.tta, self.precision, self.multilabel
            )
            identity = average_views(views[:1], output_size)
            plain = plain + identity
            augmented = augmented + (average_views(views, output_size) if self.tta else identity)
        return plain / len(self.members), augmented / len(self.members)


def fold_ensembles(members: list[Member], tta: tuple[str, ...], precision: str) -> dict[int, Ensemble]:
    """The members grouped by the fold they held out (several run folders may share folds), by fold."""
    folds = sorted({member.config.fold for member in members})
    return {
        fold: Ensemble([member for member in members if member.config.fold == fold], tta, precision) for fold in folds
    }


def prediction_record(checkpoints: list[str | Path], tta: tuple[str, ...], threshold: float, config) -> dict:
    """What predictions are made with (``predicted_by``), and the settings of the models (``config``) that say how
    to read their classes: written beside the predictions, so that a score needs no flags."""
    return predicted_by(checkpoints, tta, threshold) | {"config": dataclasses.asdict(config)}


def tuned_postprocess(paths: list[Path], tta: tuple[str, ...], config) -> tuple[PostProcess | None, Path]:
    """(the rules of the checkpoints' postprocess.json, read for their classes and for these checkpoints (one line
    when tuned for others), or None when there is none; where it is looked for)."""
    path = find_file(paths)
    if not path.is_file():
        return None, path
    current = predicted_by(paths, tta, 0.5)
    rules = read_postprocess(path, head_of(config), predicted_classes(config), current["checkpoints"], current["tta"])
    return rules, path


def output_record(record: dict, output: Output) -> dict:
    """``record`` with the output's format, sample submission (its contents' hash) and post-processing rules,
    which --resume must find unchanged too."""
    written = {"format": output.format, "rle_order": output.rle_order, "overlays": output.overlays}
    if output.sample_submission is not None:
        contents = Path(output.sample_submission).read_bytes()
        written["sample_submission"] = {
            "path": output.sample_submission,
            "sha256": hashlib.sha256(contents).hexdigest(),
        }
    if output.postprocess is not None:
        written["postprocess"] = dataclasses.asdict(output.postprocess)
    if output.tiling is not None:
        tiling = output.tiling
        written["tiling"] = {"tile": tiling.tile, "overlap": tiling.overlap, "weighting": tiling.weighting}
    return record | {"output": written}


def validation_shape(expected: tuple[int, int] | None, data, order: list[str], tiled: bool = False):
    """The size each row's RLE must fit: the one size of the data's images (the models' ``expected``, else the first
    test image's), else each image's own; of slides (``tiled``: predicted by the sliding window), from each file's
    header (``slides.header_shape``)."""
    if tiled:
        return lambda image_id: header_shape(data.image_path(image_id, "test"))
    if data.fixed_image_size:
        return expected or data.image_shape(order[0], "test")
    return lambda image_id: data.image_shape(image_id, "test")


def write_predictions(
    ensemble: Ensemble,
    data,
    output: Output,
    threshold: float = 0.5,
    batch_size: int = 4,
    workers: int = 4,
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    deadline: Deadline | None = None,
):
    """Predict every test image on this process's device into ``output``'s writer; returns what its ``finish``
    returns (the validated rows of a CSV, the number of masks of a folder). A finished output is replaced only
    with ``overwrite``; with ``resume`` what an interrupted run wrote (on one device or several) is kept when it
    was predicted by the same checkpoints and settings. When ``deadline`` leaves no time for the next batch, it
    stops there, what was written kept for ``--resume``, and returns None."""
    writer = output.writer()
    order = writer.order(data)
    if writer.keep_finished(resume, overwrite):
        logger.info("%s: already complete (--resume); nothing to predict, --overwrite predicts it again", output.path)
        shape = validation_shape(expected_shape(ensemble, data), data, order, output.tiling is not None)
        return writer.finish(order, data, shape, finished=True)
    paths = [member.path for member in ensemble.members]
    record = output_record(prediction_record(paths, ensemble.tta, threshold, ensemble.members[0].config), output)
    sinks = []
    with disk_full_is_one_line(writer, len(order), sinks):
        done = writer.begin(record, order, resume, overwrite)
        todo = [image_id for image_id in order if image_id not in done]
        fixed = expected_shape(ensemble, data) is not None
        batches = image_batches(data, todo, "test", batch_size, fixed or output.tiling is not None)
        sinks.append(writer.sink(writer.target(), data, resume))
        predicted, seconds, finished = predict_into(
            ensemble, data, batches, sinks[0], threshold, workers, progress, deadline=deadline, total=len(order),
            postprocess=output.postprocess, tiling=output.tiling,
        )  # fmt: skip
        sinks[0].close(finished)
        if not finished:
            log_stopped(output.path, writer.written(), len(order), deadline, predicted)
            return None
        shape = validation_shape(expected_shape(ensemble, data), data, order, output.tiling is not None)
        result = writer.finish(order, data, shape, in_order=fixed and not done)
    log_written(writer.summary(result), predicted, seconds)
    return result


def write_submission(ensemble: Ensemble, data, out: str | Path, threshold: float = 0.5, **settings):
    """Carvana's submission: one ``img,rle_mask`` row per test image, in sample_submission order (see
    ``write_predictions``); the validated rows, or None when stopped by the deadline."""
    return write_predictions(ensemble, data, Output("rle", str(out), 2), threshold, **settings)


def log_written(summary: str, predicted: int, seconds: float) -> None:
    logger.info(
        "%s, %d predicted in %.1f s (%.1f img/s), validated",
        summary,
        predicted,
        seconds,
        predicted / max(seconds, 1e-9),
    )


def log_stopped(out: str | Path, written: int, total: int, deadline: Deadline, predicted: int | None = None) -> None:
    """What the time limit stopped, as it happened: before a batch it left no time for, or passed before the first
    batch or during the last one (``predicted``: the images this run predicted; None when not known)."""
    limit = deadline.describe()
    if deadline.remaining() > 0:
        how = f"stopped by the {limit} at a batch boundary"
    elif predicted == 0:
        how = f"the {limit} had passed before the first batch"
    else:
        how = f"the {limit} was passed{' during the last batch' if predicted else ''}"
    logger.warning(
        "%s: %s: %d of the %d test images are written and kept, no submission yet; run the same command with "
        "--resume to finish",
        out,
        how,
        written,
        total,
    )


@torch.no_grad()
def predict_images(
    ensemble: "Ensemble | OnnxModel",
    images: list[np.ndarray],
    threshold: float = 0.5,
    postprocess: PostProcess | None = None,
) -> np.ndarray:
    """uint8 masks (N, H, W) of (H, W, in_channels) images of one size, predicted as one batch: 0/1 for a binary
    model, class indices for a multi-class one (``postprocess``: by its per-class rules instead of ``threshold``).
    Each model sees the images resized to its input size (a full-size model pads them to a multiple of 32 and crops
    its logits back)."""
    batches = {}
    for key, size in ensemble.input_sizes.items():
        resized = [image if size is None else resize_image(image, size) for image in images]
        batches[key] = torch.stack([to_chw(image) for image in resized]).to(ensemble.device)
    probabilities = ensemble.probabilities(batches, images[0].shape[:2])
    if postprocess is not None:
        return np.stack([postprocess.mask(image) for image in probabilities.cpu().numpy()])
    return class_masks(probabilities, threshold, ensemble.multilabel)


def predict_image(
    ensemble: "Ensemble | OnnxModel", image: np.ndarray, threshold: float = 0.5, postprocess: PostProcess | None = None
) -> np.ndarray:
    """uint8 mask of one (H, W, in_channels) image (see ``predict_images``)."""
    return predict_images(ensemble, [image], threshold, postprocess)[0]


class OnnxModel:
    """A fold model exported by ``export_onnx``, run by onnxruntime on the CPU, with the interface of an
    ``Ensemble`` that ``predict_images`` uses: the same resizing in, the same probabilities and masks out."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # noqa: BLE001 - onnxruntime's own classes: each gets one line
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise CheckpointError(
                f"{path}: not an ONNX model onnxruntime can run ({first_line}); export one with "
                "`python infer.py --export-onnx FILE --checkpoints RUN/fold0/best.pt`"
            ) from None
        images, logits = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.input_name, (_, self.in_channels, height, width) = images.name, images.shape
        self.size = (height, width) if isinstance(height, int) and isinstance(width, int) else None
        self.output_channels = logits.shape[1]
        self.device = torch.device("cpu")
        self.tta = ()
        self.multilabel = False  # an ONNX file records no head: its channels are read as binary or softmax

    @property
    def input_sizes(self) -> dict[str, tuple[int, int] | None]:
        return {"onnx": self.size}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: images.numpy()})[0])

    def probabilities(self, images: dict[str, torch.Tensor], output_size: tuple[int, int]) -> torch.Tensor:
        return predict_probabilities(self.forward, images["onnx"], output_size, multilabel=self.multilabel)


def predict_image_file(
    ensemble: Ensemble,
    path: str | Path,
    out_dir: str | Path,
    threshold: float = 0.5,
    postprocess: PostProcess | None = None,
) -> np.ndarray:
    """One JPEG -> ``<stem>_mask.png`` (0/255) and ``<stem>_overlay.png`` in ``out_dir``; returns the 0/1 mask
    (``postprocess``: made by its per-class rules instead of ``threshold``)."""
    path, out_dir = Path(path), Path(out_dir)
    try:
        payload = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read the image ({error.strerror})") from None
    image = decode_image(payload, str(path), channels=ensemble.in_channels)
    mask = predict_image(ensemble, image, threshold, postprocess)
    out_dir.mkdir(parents=True, exist_ok=True)
    mask_path, overlay_path = out_dir / f"{path.stem}_mask.png", out_dir / f"{path.stem}_overlay.png"
    classes = ensemble.members[0].config.num_classes()
    if ensemble.multilabel:  # packed bits (bit k: class k) as a greyscale PNG, each class tinted in the overlay
        save_png(mask, mask_path)
        save_png(label_overlay(as_rgb(image), mask, classes), overlay_path)
        logger.info("%s: packed multilabel mask (bit k: class k) -> %s, %s", path, mask_path, overlay_path)
        return mask
    if classes > 2:  # class indices in a palette PNG, each class tinted in the overlay
        with atomic_output(mask_path) as partial:
            partial.write_bytes(encode_mask_png(mask, palette(classes)))
        save_png(colour_overlay(as_rgb(image), mask, palette(classes)), overlay_path)
        logger.info("%s: classes %s -> %s, %s", path, sorted(np.unique(mask).tolist()), mask_path, overlay_path)
        return mask
    save_png(mask * 255, mask_path)
    save_png(overlay(image, mask), overlay_path)
    logger.info("%s: car covers %.1f%% -> %s, %s", path, 100 * mask.mean(), mask_path, overlay_path)
    return mask


def export_onnx(member: Member, path: str | Path, tolerance: float = 1e-3) -> float:
    """Export one fold model to ONNX (uint8 images of its input size in, logits out, any batch size)
    and check that onnxruntime reproduces PyTorch; returns the largest absolute difference."""
    import onnxruntime

    path = Path(path)
    size = member.config.input_size() or member.image_shape
    if size is None:
        raise CheckpointError(f"{member.path}: records no image size to export at")
    model = member.model.float().to("cpu").eval()
    channels = member.config.in_channels
    images = torch.randint(0, 256, (2, channels, *size), dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as partial:
        torch.onnx.export(
            model,
            (images,),
            partial,
            dynamo=False,
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
        )
        session = onnxruntime.InferenceSession(str(partial), providers=["CPUExecutionProvider"])
        fresh = torch.randint(0, 256, (3, channels, *size), dtype=torch.uint8)
        with torch.no_grad():
            expected = model(fresh).numpy()
        difference = float(np.abs(session.run(None, {"images": fresh.numpy()})[0] - expected).max())
        if not difference <= tolerance * max(1.0, float(np.abs(expected).max())):
            raise CheckpointError(f"{member.path}: onnxruntime differs from PyTorch by {difference:.2e}; not exported")
    return difference
