"""The multilabel head (--head multilabel): targets, loss, per-channel probabilities and TTA, packed masks, the
writers, scores per class, the refusals, and a tiny folder data set end to end."""

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw

from infer import main as infer
from make_folds import main as make_folds
from train import main as train

LABELS = ("box", "disc", "dot")  # box and disc overlap; dot lies inside the box, in every other image
TRAIN_FLAGS = ["--encoder", "resnet18", "--encoder-weights", "none", "--workers", "0", "--quiet", "--batch-size", "4"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def label_scene(index: int, height: int = 64, width: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """(RGB image, packed mask): a red box (bit 0), a blue disc (bit 1) over part of it, a green dot (bit 2) in
    the box of every other image; a 1-pixel ignored (255) frame around the disc."""
    rng = np.random.default_rng(index)
    image = Image.new("RGB", (width, height), (150, 150, 150))
    layers = [Image.new("L", (width, height), 0) for _ in LABELS]
    x, y = int(rng.integers(4, width - 50)), int(rng.integers(4, height - 36))
    shapes = [
        ("rectangle", (x, y, x + 34, y + 26), (220, 40, 40)),
        ("ellipse", (x + 16, y + 8, x + 44, y + 32), (40, 60, 220)),
    ]
    if index % 2 == 0:
        shapes.append(("rectangle", (x + 3, y + 3, x + 10, y + 10), (40, 200, 60)))
    for layer, (kind, box, colour) in zip(layers, shapes):
        getattr(ImageDraw.Draw(image), kind)(box, fill=colour)
        getattr(ImageDraw.Draw(layer), kind)(box, fill=1)
    from competition.mask_values import pack_labels

    packed = pack_labels(np.stack([np.asarray(layer) for layer in layers]))
    disc = np.asarray(layers[1]).astype(bool)
    frame = np.zeros_like(disc)
    frame[1:-1, 1:-1] = disc[1:-1, 1:-1] & ~(disc[:-2, 1:-1] & disc[2:, 1:-1] & disc[1:-1, :-2] & disc[1:-1, 2:])
    packed[frame] = 255
    noisy = np.asarray(image).astype(np.int16) + rng.integers(-6, 7, size=(height, width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8), packed


def make_label_folders(root, count: int = 8, tests: int = 2, classes_file: bool = True):
    """images/ + masks/ (greyscale PNGs of packed bits), classes.txt (box, disc, dot), test/ and test_masks/."""
    for folder in ("images", "masks", "test", "test_masks"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for index in range(count + tests):
        image, packed = label_scene(index)
        name = f"scene{index // 2}_{index % 2 + 1}"
        images, masks = ("images", "masks") if index < count else ("test", "test_masks")
        Image.fromarray(image).save(root / images / f"{name}.png")
        Image.fromarray(packed, mode="L").save(root / masks / f"{name}.png")
    if classes_file:
        (root / "classes.txt").write_text("\n".join(LABELS) + "\n")
    return root


@pytest.mark.slow
def test_a_multilabel_folder_trains_and_predicts_packed_masks(tmp_path):
    root = make_label_folders(tmp_path / "data")
    folds = tmp_path / "folds.csv"
    head = ["--head", "multilabel"]
    make_folds(["--data-dir", str(root), "--n-folds", "2", "--group-regex", r"^(.+)_\d+$", "--out", str(folds), *head])
    run = tmp_path / "run"
    flags = ["--data-dir", str(root), "--folds-csv", str(folds), "--out", str(run), "--fold", "0", "--size", "64x96"]
    train([*flags, "--epochs", "2", "--lr", "2e-3", "--tensorboard", *head, *TRAIN_FLAGS])
    log = pd.read_csv(run / "fold0" / "log.csv")
    expected = {"val_dice", "val_miou"} | {f"{score}_{name}" for score in ("dice", "iou") for name in LABELS}
    assert expected <= set(log.columns) and log["val_dice"].between(0, 1).all()
    from tests.test_board import read_events

    events = read_events(run / "fold0")  # the board: per-class Dice and IoU, the best mean Dice, drawn images
    assert all(len(events.Scalars(f"{score}/{name}")) == 2 for score in ("dice", "iou") for name in LABELS)
    assert len(events.Scalars("best/val_dice")) == 2
    assert [tag for tag in events.Tags()["images"] if tag.startswith("images/")]
    checkpoint = torch.load(run / "fold0" / "best.pt", weights_only=True)
    assert checkpoint["config"]["head"] == "multilabel" and checkpoint["config"]["classes"] == ",".join(LABELS)
    masks = tmp_path / "masks"
    infer(["--tta", "--checkpoints", str(run), "--out", str(masks), "--overlays", "--workers", "0"])
    assert sorted(path.stem for path in masks.glob("*.png")) == ["scene4_1", "scene4_2"]
    with Image.open(masks / "scene4_1.png") as mask:
        values = np.asarray(mask)
        assert mask.mode == "L" and mask.size == (96, 64) and values.max() < 1 << len(LABELS)
    assert len(list((masks / "overlays").glob("*.png"))) == 2
    from competition.metrics import score_mask_folders

    scores = score_mask_folders(masks, root / "test_masks")  # head and classes from the record beside the masks
    assert scores["multilabel"] and list(scores["per_class"].index) == list(LABELS) and 0 <= scores["dice"] <= 1
    infer(["--checkpoints", str(run), "--image", str(root / "test" / "scene4_1.png"), "--out-dir", str(tmp_path)])
    with Image.open(tmp_path / "scene4_1_mask.png") as single:
        assert single.mode == "L" and np.asarray(single).max() < 1 << len(LABELS)
    infer(["--oof", "--checkpoints", str(run), "--out-dir", str(tmp_path / "oof"), "--workers", "0"])
    oof = pd.read_csv(tmp_path / "oof" / "oof.csv")
    assert {"dice", "dice_plain", *(f"dice_{name}" for name in LABELS)} <= set(oof.columns)
    rows = tmp_path / "rows.csv"
    infer(["--checkpoints", str(run), "--out", str(rows), "--format", "rle-csv", "--workers", "0"])
    names = pd.read_csv(rows)["ImageId_ClassId"].tolist()
    assert names == [f"scene4_{image}_{label}" for image in (1, 2) for label in (1, 2, 3)]


def test_loss_is_per_class_bce_plus_soft_dice_and_leaves_ignored_pixels_out():
    """Computed independently: for each image and class, BCE over the labelled pixels and 1 - soft Dice (smooth 1)
    over them; the loss is the mean BCE plus the mean Dice. Changing the logits of ignored pixels changes nothing."""
    from competition.losses import build_loss

    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(size=(2, 3, 5, 6)).astype(np.float32))
    targets = torch.from_numpy((rng.random((2, 3, 5, 6)) < 0.4).astype(np.float32))
    ignored = torch.from_numpy(rng.random((2, 5, 6)) < 0.2)
    targets[ignored.unsqueeze(1).expand_as(targets)] = 255
    loss = build_loss("bce_dice", num_classes=3, ignore_index=255, multilabel=True)(logits, targets)
    bce, dice = [], []
    for image in range(2):
        keep = ~ignored[image].numpy()
        for label in range(3):
            x = logits[image, label].numpy()[keep].astype(np.float64)
            t = targets[image, label].numpy()[keep].astype(np.float64)
            p = 1 / (1 + np.exp(-x))
            bce.append(np.mean(-(t * np.log(p) + (1 - t) * np.log(1 - p))))
            dice.append(1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1))
    assert loss.item() == pytest.approx(np.mean(bce) + np.mean(dice), rel=1e-5)
    moved = logits.clone()
    moved[ignored.unsqueeze(1).expand_as(moved)] += 7.0
    again = build_loss("bce_dice", num_classes=3, ignore_index=255, multilabel=True)(moved, targets)
    assert again.item() == pytest.approx(loss.item(), rel=1e-6)


@pytest.mark.parametrize("name", ["bce_dice", "ce", "dice", "focal", "tversky"])
def test_every_multilabel_loss_takes_two_overlapping_channels_in_float32(name):
    """K = 2 is never taken for binary (one channel) or softmax: each loss runs on (N, 2, H, W) float targets
    with ignored pixels, from bf16 logits, and its gradient at ignored pixels is zero."""
    from competition.losses import build_loss

    targets = torch.tensor([[[[1.0, 0.0], [255.0, 1.0]], [[1.0, 1.0], [255.0, 0.0]]]])
    logits = torch.randn(1, 2, 2, 2).to(torch.bfloat16).requires_grad_()
    loss = build_loss(name, num_classes=2, ignore_index=255, multilabel=True)(logits, targets)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.all(logits.grad[:, :, 1, 0] == 0)


def test_lovasz_and_softmax_settings_are_refused_for_multilabel_runs_in_one_line():
    from competition.config import TrainConfig, check_config
    from competition.errors import ConfigError

    cases = {
        "--loss lovasz has no multilabel form": {"loss": "lovasz"},
        "at most 7": {"classes": "a,b,c,d,e,f,g,h"},
        "--class-weights median": {"class_weights": "median"},
        "--monitor macro_f1": {"monitor": "macro_f1"},
        "leave --ignore-index at 255": {"ignore_index": 0},
    }
    for message, settings in cases.items():
        config = TrainConfig(head="multilabel", **{"classes": "a,b", **settings})
        with pytest.raises(ConfigError, match=message) as raised:
            check_config(config)
        assert "\n" not in str(raised.value)


def test_two_labels_are_not_taken_for_binary_or_softmax():
    """The audit: K = 2 multilabel has two sigmoid channels, Dice picks best.pt, the recipe adds no softmax class
    weights, and an ensemble gives a sigmoid per channel."""
    from competition.config import TrainConfig
    from competition.recipes import Situation, recipe
    from competition.run_folder import monitored

    config = TrainConfig(head="multilabel", classes="a,b")
    assert config.output_channels() == 2 and monitored(config)[0] == "val_dice"
    three = TrainConfig(head="multilabel", classes="a,b,c")
    assert monitored(three)[0] == "val_dice"
    assert "class_weights" not in recipe(Situation(False, True, 3, 100, multilabel=True))


def test_targets_are_float_channels_with_the_ignore_value_and_resized_to_the_nearest_pixel(tmp_path):
    from competition.data import SegmentationDataset
    from competition.layouts import open_data

    root = make_label_folders(tmp_path / "data", count=2, tests=0)
    data = open_data(root, head="multilabel")
    assert data.multilabel and data.classes == list(LABELS)
    _, targets = SegmentationDataset(data, ["scene0_1"], size=(32, 48))[0]
    packed = np.asarray(Image.open(root / "masks" / "scene0_1.png"))
    nearest = packed[np.arange(32) * 2][:, np.arange(48) * 2]  # INTER_NEAREST halving takes every other pixel
    assert targets.dtype == torch.float32 and tuple(targets.shape) == (3, 32, 48)
    assert set(torch.unique(targets).tolist()) <= {0.0, 1.0, 255.0}
    for label in range(3):
        expected = np.where(nearest == 255, 255, (nearest >> label) & 1).astype(np.float32)
        np.testing.assert_array_equal(targets[label].numpy(), expected)
    counts = data.class_pixel_counts("scene0_1")
    labelled = packed[packed != 255]
    assert counts.tolist() == [int(((labelled >> k) & 1).sum()) for k in range(3)]


def test_packed_masks_are_read_only_with_their_classes_named(tmp_path):
    from competition.errors import ConfigError, DataError
    from competition.layouts import open_data

    root = make_label_folders(tmp_path / "data", count=2, tests=0, classes_file=False)
    with pytest.raises(DataError, match="--head multilabel needs its classes named"):
        open_data(root, head="multilabel")
    with pytest.raises(DataError, match=r"scene0_1.png: mask value\(s\) \[5\] set bits of no class"):
        open_data(root, head="multilabel", classes="box,disc").read_mask("scene0_1")
    with pytest.raises(ConfigError, match="--head multilabel reads masks as bits"):
        open_data(root, head="multilabel", classes="box,disc,dot", mask_values="0,255")


def test_a_softmax_run_on_packed_masks_names_the_file_and_head_multilabel(tmp_path):
    from competition.errors import DataError
    from competition.layouts import open_data

    root = make_label_folders(tmp_path / "data", count=2, tests=0, classes_file=False)
    data = open_data(root, classes="background,box,disc")
    with pytest.raises(DataError) as raised:
        data.read_mask("scene0_1")
    message = str(raised.value)
    assert message.startswith(str(root / "masks" / "scene0_1.png")) and "--head multilabel" in message
    assert "\n" not in message


def test_carvana_and_other_one_class_per_pixel_layouts_refuse_head_multilabel(data_dir, tmp_path):
    from competition.errors import ConfigError
    from competition.layouts import open_data
    from tests.layout_fixtures import make_pet

    with pytest.raises(ConfigError, match="Carvana's data, one class"):
        open_data(data_dir, head="multilabel")
    with pytest.raises(ConfigError, match="read as the pet layout"):
        open_data(make_pet(tmp_path / "pet"), head="multilabel")


def test_probabilities_become_packed_masks_with_a_threshold_per_channel():
    from competition.prediction_stream import class_masks

    probabilities = torch.tensor([[[[0.9, 0.2]], [[0.6, 0.7]], [[0.1, 0.95]]]])  # (1, 3, 1, 2)
    np.testing.assert_array_equal(class_masks(probabilities, 0.5, multilabel=True), [[[3, 6]]])
    np.testing.assert_array_equal(class_masks(probabilities, [0.5, 0.65, 0.5], multilabel=True), [[[1, 6]]])
    np.testing.assert_array_equal(class_masks(probabilities, 0.5), [[[0, 2]]])  # softmax's argmax, unchanged


def test_tta_averages_sigmoid_probabilities_per_channel():
    """Two channels of a multilabel model are two sigmoids (a softmax would make them sum to one), and each view's
    probabilities are flipped back and averaged channel by channel."""
    from competition.prediction import predict_probabilities

    def model(images):
        x = images.float()
        return torch.cat([x[:, :1] / 50 - 2, x[:, 1:2] / 30 - 3], dim=1) * torch.linspace(0.5, 1.5, x.shape[-1])

    images = torch.randint(0, 256, (2, 3, 4, 6), dtype=torch.uint8)
    averaged = predict_probabilities(model, images, tta=("hflip",), multilabel=True)
    plain, flipped = torch.sigmoid(model(images)), torch.sigmoid(model(images.flip(-1))).flip(-1)
    torch.testing.assert_close(averaged, (plain + flipped) / 2)
    assert not torch.allclose(averaged.sum(1), torch.ones(2, 4, 6))


def test_label_rles_encode_each_class_bit_and_leave_the_ignore_value_out():
    from competition.rle import rle_decode
    from competition.submission import ClassRows, label_rles

    packed = np.array([[1, 3, 0], [255, 2, 6]], dtype=np.uint8)
    rles = label_rles(packed, 3, "row")
    for label, rle in enumerate(rles):
        expected = ((packed >> label) & 1).astype(bool) & (packed != 255)
        np.testing.assert_array_equal(rle_decode(rle, packed.shape).astype(bool), expected)
    assert rles == ["1 2", "2 1 5 2", "6 1"]
    assert label_rles(packed, 3, "column") == ["1 1 3 1", "3 2 6 1", "6 1"]  # read down the columns
    assert [name for name, _ in ClassRows(3, multilabel=True).rows("a", packed)] == ["a_1", "a_2", "a_3"]


def test_metrics_score_multilabel_folders_per_class_as_numpy_does(tmp_path, capsys):
    """Mean Dice over (image, class) pairs, ignored truth pixels left out, a class in neither mask scoring 1."""
    from competition.metrics import main as metrics
    from competition.metrics import score_mask_folders

    rng = np.random.default_rng(3)
    truth_dir, predicted_dir = tmp_path / "truth", tmp_path / "predicted"
    truth_dir.mkdir(), predicted_dir.mkdir()
    expected = []
    for index in range(4):
        truth = rng.integers(0, 4, (6, 7)).astype(np.uint8)  # class c (bit 2) absent from the truth
        truth[rng.random((6, 7)) < 0.1] = 255
        predicted = np.where(rng.random((6, 7)) < 0.7, truth, rng.integers(0, 4, (6, 7))).astype(np.uint8)
        predicted[predicted == 255] = 0
        Image.fromarray(truth, mode="L").save(truth_dir / f"m{index}.png")
        Image.fromarray(predicted, mode="L").save(predicted_dir / f"m{index}.png")
        keep = truth != 255
        row = []
        for label in range(3):
            p, t = ((predicted[keep] >> label) & 1) == 1, ((truth[keep] >> label) & 1) == 1
            row.append(1.0 if p.sum() + t.sum() == 0 else 2 * (p & t).sum() / (p.sum() + t.sum()))
        expected.append(row)
    scores = score_mask_folders(predicted_dir, truth_dir, ["a", "b", "c"], head="multilabel")
    assert scores["dice"] == pytest.approx(np.mean(expected))
    np.testing.assert_allclose(scores["per_class"]["dice"].to_numpy(), np.mean(expected, axis=0))
    assert scores["per_class"]["dice"]["c"] == 1.0  # in neither the truth nor the predictions: 1 per image
    metrics([str(predicted_dir), str(truth_dir), "--classes", "a,b,c", "--head", "multilabel"])
    assert f"mean Dice {np.mean(expected):.5f} over (image, class) pairs" in capsys.readouterr().out


def test_validation_scores_dice_and_iou_per_class(tmp_path):
    from competition.losses import build_loss
    from competition.training import evaluate_labels

    truth = torch.tensor([[[[1.0, 1.0], [0.0, 255.0]], [[0.0, 0.0], [0.0, 255.0]]]])  # (1, 2, 2, 2)
    logits = torch.tensor([[[[5.0, -5.0], [-5.0, 5.0]], [[-5.0, -5.0], [-5.0, 5.0]]]])

    def model(images):
        return logits.expand(len(images), -1, -1, -1)

    model.parameters = lambda: iter([torch.zeros(1)])
    model.eval = lambda: None
    loader = torch.utils.data.DataLoader([(torch.zeros(3, 2, 2, dtype=torch.uint8), truth[0])], batch_size=1)
    loss = build_loss("bce_dice", num_classes=2, ignore_index=255, multilabel=True)
    metrics = evaluate_labels(model, loader, loss, "fp32", ["a", "b"])
    # a: predicted {0}, truth {0, 1} over the 3 labelled pixels -> Dice 2/3, IoU 1/2; b: empty in both -> Dice 1
    assert metrics["dice_a"] == pytest.approx(2 / 3) and metrics["iou_a"] == pytest.approx(1 / 2)
    assert metrics["dice_b"] == 1.0 and np.isnan(metrics["iou_b"])
    assert metrics["val_dice"] == pytest.approx((2 / 3 + 1) / 2) and metrics["val_miou"] == pytest.approx(1 / 2)


def test_serving_a_multilabel_model_counts_and_encodes_each_class_bit():
    from competition.serve import class_summary

    packed = np.array([[1, 3, 0], [2, 2, 6]], dtype=np.uint8)
    summary = class_summary(packed, ["a", "b", "c"], True, multilabel=True)
    assert [entry["pixels"] for entry in summary] == [2, 4, 1]
    assert [entry["rle"] for entry in summary] == ["1 2", "2 1 4 3", "6 1"]


def test_bit_combinations_are_told_from_class_indices():
    from competition.mask_values import looks_packed

    assert looks_packed([0, 1, 2, 3, 5, 255]) and looks_packed([0, 1, 4, 5])
    assert not looks_packed(list(range(21)) + [255])  # VOC's indices and border
    assert not looks_packed([0, 1, 2, 4, 8])  # no pixel holds two classes


def test_binary_0_255_masks_read_as_multilabel_say_why_no_class_is_there():
    from competition.data_checks import absent_class_problems

    none_at_all = absent_class_problems(["thing"], np.array([0]), None, multilabel=True)
    assert "binary 0/255 masks hold no class there; train them with --head auto" in none_at_all[0]
    one_missing = absent_class_problems(["car", "glass"], np.array([5, 0]), None, multilabel=True)
    assert "--head auto" not in one_missing[0]  # bits are read: only a class is missing
    assert "--head auto" not in absent_class_problems(["background", "x"], np.array([0, 0]), None)[0]
