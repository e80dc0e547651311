"""Prediction with fold ensembles: checkpoints, a streaming test-set pipeline to submission.csv, out-of-fold scoring."""

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from competition.config import TrainConfig, config_from
from competition.data import CarvanaData, DataError, image_id_of, resize_image
from competition.files import atomic_output
from competition.folds import read_folds
from competition.metrics import dice_per_image
from competition.models import build_model
from competition.prediction import average_views, predict_probabilities, view_probabilities
from competition.rle import rle_encode
from competition.submission import SubmissionWriter, validate_submission


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


@dataclass
class Member:
    """One fold model of the ensemble and the settings it was trained with."""

    path: Path
    model: torch.nn.Module
    config: TrainConfig
    image_shape: tuple[int, int] | None

    @property
    def size_key(self) -> str:
        size = self.config.input_size()
        return "full" if size is None else f"{size[0]}x{size[1]}"

    def model_input(self, images: dict[str, torch.Tensor]) -> torch.Tensor:
        """This member's batch from a loader's images at every size, in its memory format."""
        batch = images[self.size_key]
        return batch.contiguous(memory_format=torch.channels_last) if self.config.channels_last else batch


def find_checkpoints(paths: list[str | Path]) -> list[Path]:
    """Checkpoint files: each path is a ``best.pt`` file or a run folder holding ``fold*/best.pt``."""
    found = []
    for path in map(Path, paths):
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            folds = sorted(path.glob("fold*/best.pt")) or sorted(path.glob("best.pt"))
            if not folds:
                raise CheckpointError(f"{path}: no fold*/best.pt inside; train with `python train.py --out {path}`")
            found += folds
        else:
            raise CheckpointError(f"{path}: no such checkpoint file or run folder")
    return found


def load_member(path: Path, device: torch.device) -> Member:
    """A model rebuilt from its checkpoint alone (``weights_only``: an untrusted file cannot run code)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - truncated, not a zip, not a pickle: all mean "unreadable"
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(error).__name__}: {error}); "
            "it is corrupt or incomplete, copy or train it again"
        ) from None
    if not isinstance(checkpoint, dict) or not {"model", "config"} <= set(checkpoint):
        raise CheckpointError(f"{path}: not a checkpoint of this repository (no model weights and config inside)")
    try:
        config = config_from(checkpoint["config"], str(path))
    except ValueError as error:
        raise CheckpointError(str(error)) from None
    model = build_model(config.arch, config.encoder, "none")
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        raise CheckpointError(
            f"{path}: its weights do not fit {config.arch}-{config.encoder}, the model its config names "
            f"({str(error).splitlines()[0]}); the file was altered or comes from another code version"
        ) from None
    model = model.to(device).eval()
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    shape = checkpoint.get("image_shape")
    return Member(path, model, config, tuple(shape) if shape else None)


class Ensemble:
    """Fold models averaged in probability space, each fed the input size it was trained on."""

    def __init__(self, members: list[Member], tta: tuple[str, ...] = (), precision: str = "fp32"):
        if not members:
            raise CheckpointError("no checkpoints to predict with")
        self.members, self.tta, self.precision = members, tta, precision

    @property
    def input_sizes(self) -> dict[str, tuple[int, int] | None]:
        return {member.size_key: member.config.input_size() for member in self.members}

    def probabilities(self, images: dict[str, torch.Tensor], output_size: tuple[int, int]) -> torch.Tensor:
        total = None
        for member in self.members:
            probabilities = predict_probabilities(
                member.model, member.model_input(images), output_size, self.tta, self.precision
            )
            total = probabilities if total is None else total + probabilities
        return total / len(self.members)


class PredictionImages(torch.utils.data.Dataset):
    """Images at each input size the ensemble needs, their full size, and (for scoring) the mask.

    A failure is returned, not raised, so that it reaches the user as one message rather than
    as a DataLoader worker's traceback.
    """

    def __init__(
        self,
        data: CarvanaData,
        image_ids: list[str],
        split: str,
        sizes: dict[str, tuple[int, int] | None],
        expected_shape: tuple[int, int] | None = None,
        with_masks: bool = False,
    ):
        self.data, self.image_ids, self.split, self.sizes = data, image_ids, split, sizes
        self.expected_shape, self.with_masks = expected_shape, with_masks
        reduced = [size for size in sizes.values() if size is not None]
        # Decode at a reduced DCT scale only when every consumer is at least that small.
        self.reduce_to = max(reduced) if reduced and None not in sizes.values() else None

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict:
        image_id = self.image_ids[index]
        try:
            image, shape = self.data.read_image_and_shape(image_id, self.split, self.reduce_to)
            if self.expected_shape is not None and shape != self.expected_shape:
                raise DataError(
                    f"{self.data.image_path(image_id, self.split)}: image is {shape[1]}x{shape[0]}, but the models "
                    f"were trained on {self.expected_shape[1]}x{self.expected_shape[0]} images; predict it with "
                    "models trained on images of its size"
                )
            sample = {"index": index, "shape": torch.tensor(shape), "images": {}}
            for key, size in self.sizes.items():
                resized = image if size is None else resize_image(image, size)
                sample["images"][key] = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))
            if self.with_masks:
                sample["mask"] = torch.from_numpy(self.data.read_mask(image_id, shape)).unsqueeze(0)
            return sample
        except DataError as error:
            return {"error": str(error)}


def _collate(samples: list[dict]) -> dict:
    for sample in samples:
        if "error" in sample:
            return sample
    return torch.utils.data.default_collate(samples)


def _loader(dataset, batch_size: int, workers: int, device: torch.device):
    workers = min(workers, os.cpu_count() or 1)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )


def _batches(loader, device: torch.device):
    for batch in loader:
        if "error" in batch:
            raise DataError(batch["error"])
        images = {key: value.to(device, non_blocking=True) for key, value in batch["images"].items()}
        yield batch, images


def _expected_shape(ensemble: Ensemble) -> tuple[int, int] | None:
    shapes = {member.image_shape for member in ensemble.members if member.image_shape}
    if len(shapes) > 1:
        raise CheckpointError(f"the checkpoints were trained on images of different sizes: {sorted(shapes)}")
    return shapes.pop() if shapes else None


def write_submission(
    ensemble: Ensemble,
    data: CarvanaData,
    out: str | Path,
    threshold: float = 0.5,
    batch_size: int = 4,
    workers: int = 4,
    resume: bool = False,
    progress: bool = True,
) -> pd.DataFrame:
    """Predict every test image and write ``img,rle_mask`` rows in sample_submission order.

    A streaming pipeline with bounded memory: loader workers decode and resize, the device
    predicts a batch and thresholds it, and a thread pool RLE-encodes (numba releases the GIL)
    while the next batch is on the device. Returns the validated rows.
    """
    device = next(ensemble.members[0].model.parameters()).device
    test_ids = data.test_ids()
    if not test_ids:
        raise DataError(f"{data.root}: no test images (test/ or test.zip is empty or missing)")
    try:
        order = [image_id_of(img) for img in data.read_csv("sample_submission.csv", ["img"])["img"]]
    except DataError:
        order = test_ids  # no sample_submission.csv: every test image, sorted
    absent = sorted(set(order) - set(test_ids))
    if absent:
        raise DataError(
            f"{data.root}: sample_submission.csv lists {len(absent)} image(s) with no file in test/, e.g. {absent[:3]}"
        )
    writer = SubmissionWriter(out, resume)
    done = set(writer.done)
    todo = [image_id for image_id in order if f"{image_id}.jpg" not in done]
    expected = _expected_shape(ensemble)
    dataset = PredictionImages(data, todo, "test", ensemble.input_sizes, expected)
    started = time.perf_counter()
    bar = tqdm(
        total=len(order),
        initial=len(order) - len(todo),
        unit="img",
        desc="predict",
        disable=not progress,
        dynamic_ncols=True,
    )
    with ThreadPoolExecutor(max_workers=max(1, workers)) as encoders:
        pending = []
        try:
            for batch, images in _batches(_loader(dataset, batch_size, workers, device), device):
                shape = tuple(batch["shape"][0].tolist())
                masks = (ensemble.probabilities(images, shape) > threshold).squeeze(1).to(torch.uint8).cpu().numpy()
                names = [f"{todo[i]}.jpg" for i in batch["index"].tolist()]
                pending.append((names, [encoders.submit(rle_encode, mask) for mask in masks]))
                while len(pending) > 2:  # bounded: at most three batches of masks in memory
                    _write_done(writer, pending.pop(0), bar)
        finally:
            while pending:  # also when the loop stopped early: rows already predicted are kept for --resume
                _write_done(writer, pending.pop(0), bar)
            bar.close()
            writer.handle.flush()
    path = writer.close()
    seconds = time.perf_counter() - started
    shape = expected or data.image_shape(order[0], "test")
    rows = validate_submission(path, [f"{image_id}.jpg" for image_id in order], shape)
    print(
        f"{path}: {len(rows)} rows, mean mask area {rows['area'].mean():.1%}, {seconds:.1f} s "
        f"({len(todo) / max(seconds, 1e-9):.1f} img/s), validated"
    )
    return rows


def _write_done(writer: SubmissionWriter, item, bar) -> None:
    names, futures = item
    writer.write([(name, future.result()) for name, future in zip(names, futures)])
    bar.update(len(names))


@torch.no_grad()
def out_of_fold(
    members: list[Member],
    data: CarvanaData,
    folds_csv: str | Path,
    tta: tuple[str, ...],
    precision: str,
    batch_size: int = 4,
    workers: int = 4,
    thresholds: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7),
) -> pd.DataFrame:
    """Each fold model scored on its own held-out fold at full resolution: one row per image with
    its Dice without TTA at 0.5 (``dice_plain``) and with TTA at each threshold (``dice_0.50``...)."""
    folds = read_folds(folds_csv)
    rows = []
    for member in members:
        fold = member.config.fold
        image_ids = [image_id_of(img) for img in folds.loc[folds["fold"] == fold, "img"]]
        if not image_ids:
            raise DataError(f"{folds_csv}: fold {fold} of {member.path} has no images")
        dataset = PredictionImages(data, image_ids, "train", Ensemble([member]).input_sizes, with_masks=True)
        device = next(member.model.parameters()).device
        for batch, images in _batches(_loader(dataset, batch_size, workers, device), device):
            masks = batch["mask"].to(device)
            shape = tuple(masks.shape[-2:])
            # One pass over the views serves both scores: the identity alone, and all views averaged.
            views = view_probabilities(member.model, member.model_input(images), tta, precision)
            plain_probabilities = average_views(views[:1], shape)
            probabilities = average_views(views, shape) if tta else plain_probabilities
            scores = {"dice_plain": dice_per_image(plain_probabilities > 0.5, masks).tolist()}
            for threshold in thresholds:
                scores[f"dice_{threshold:.2f}"] = dice_per_image(probabilities > threshold, masks).tolist()
            for position, index in enumerate(batch["index"].tolist()):
                rows.append(
                    {
                        "img": f"{image_ids[index]}.jpg",
                        "fold": fold,
                        **{key: values[position] for key, values in scores.items()},
                    }
                )
    return pd.DataFrame(rows)


def overlay(image: np.ndarray, predicted: np.ndarray, truth: np.ndarray | None = None) -> np.ndarray:
    """The photo with the predicted outline in red and, when given, the true outline in green."""
    canvas = image.copy()
    thickness = max(1, image.shape[1] // 640)
    for mask, colour in ((truth, (0, 200, 0)), (predicted, (230, 30, 30))):
        if mask is not None:
            contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(canvas, contours, -1, colour, thickness)
    return canvas


@torch.no_grad()
def predict_image(ensemble: Ensemble, image: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """uint8 0/1 mask of one RGB image."""
    device = next(ensemble.members[0].model.parameters()).device
    images = {}
    for key, size in ensemble.input_sizes.items():
        resized = image if size is None else resize_image(image, size)
        images[key] = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))[None].to(device)
    probabilities = ensemble.probabilities(images, image.shape[:2])
    return (probabilities[0, 0] > threshold).to(torch.uint8).cpu().numpy()


def export_onnx(member: Member, path: str | Path, tolerance: float = 1e-3) -> float:
    """Export one fold model to ONNX (uint8 images of its input size in, logits out, any batch size)
    and check that onnxruntime reproduces PyTorch; returns the largest absolute difference."""
    import onnxruntime

    path = Path(path)
    size = member.config.input_size() or member.image_shape
    if size is None:
        raise CheckpointError(f"{member.path}: records no image size to export at")
    model = member.model.float().to("cpu").eval()
    images = torch.randint(0, 256, (2, 3, *size), dtype=torch.uint8)
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
        fresh = torch.randint(0, 256, (3, 3, *size), dtype=torch.uint8)
        with torch.no_grad():
            expected = model(fresh).numpy()
        difference = float(np.abs(session.run(None, {"images": fresh.numpy()})[0] - expected).max())
        if not difference <= tolerance * max(1.0, float(np.abs(expected).max())):
            raise CheckpointError(f"{member.path}: onnxruntime differs from PyTorch by {difference:.2e}; not exported")
    return difference
