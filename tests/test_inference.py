import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import infer
from competition import errors, inference
from competition.carvana import CarvanaData
from competition.data import DataError
from competition.errors import ConfigError, ProjectError
from competition.inference import CheckpointError, Ensemble, Member, find_checkpoints, load_member, write_submission
from competition.metrics import score_submission
from competition.models import build_model
from competition.prediction import TTA, predict_probabilities
from competition.prediction_stream import PredictionPace
from competition.submission import HEADER, predicted_by, start_rows, submission_order, validate_submission
from competition.synthetic import encode_jpeg
from tests.conftest import HEIGHT, WIDTH, ManualDeadline


def random_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("Unet", "resnet18").eval()


def test_hflip_tta_makes_a_flip_symmetric_image_give_a_flip_symmetric_mask():
    model = random_model()
    half = torch.randint(0, 256, (1, 3, 64, 48), dtype=torch.uint8)
    image = torch.cat([half, half.flip(-1)], dim=-1)
    with_tta = predict_probabilities(model, image, tta=("hflip",))
    assert torch.allclose(with_tta, with_tta.flip(-1), atol=1e-6)
    assert torch.equal(with_tta > 0.5, (with_tta > 0.5).flip(-1))
    without = predict_probabilities(model, image)
    assert not torch.allclose(without, without.flip(-1), atol=1e-4), "a random model is not symmetric by itself"


def test_tta_inverts_each_view_before_averaging():
    model = random_model(1)
    image = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)
    plain = predict_probabilities(model, image)
    flipped = predict_probabilities(model, image.flip(-1)).flip(-1)
    assert torch.allclose(predict_probabilities(model, image, tta=("hflip",)), (plain + flipped) / 2, atol=1e-6)
    upsampled = predict_probabilities(model, image, output_size=(128, 192))
    assert upsampled.shape == (2, 1, 128, 192) and 0 <= upsampled.min() and upsampled.max() <= 1


def test_averaging_two_identical_checkpoints_equals_one(trained_run):
    member = load_member(trained_run / "fold0" / "best.pt", torch.device("cpu"))
    images = {member.size_key: torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)}
    one = Ensemble([member], ("hflip",)).probabilities(images, (HEIGHT, WIDTH))
    two = Ensemble([member, member], ("hflip",)).probabilities(images, (HEIGHT, WIDTH))
    assert torch.allclose(one, two, atol=1e-6)
    other = load_member(trained_run / "fold1" / "best.pt", torch.device("cpu"))
    assert not torch.allclose(one, Ensemble([member, other]).probabilities(images, (HEIGHT, WIDTH)))


@pytest.mark.slow
def test_submission_is_valid_ordered_and_scores_well(trained_run, data_dir, tmp_path):
    members = [load_member(path, torch.device("cpu")) for path in find_checkpoints([trained_run])]
    assert [m.config.fold for m in members] == [0, 1]
    out = tmp_path / "submission.csv"
    rows = write_submission(Ensemble(members, ("hflip",)), CarvanaData(data_dir), out, workers=0, progress=False)
    submission = pd.read_csv(out, keep_default_na=False)
    sample = pd.read_csv(data_dir / "sample_submission.csv")
    assert list(submission.columns) == ["img", "rle_mask"] and submission["img"].tolist() == sample["img"].tolist()
    assert len(rows) == len(sample) and not (tmp_path / "submission.csv.partial").exists()
    truth = pd.read_csv(data_dir / "test_masks.csv", keep_default_na=False)
    assert score_submission(submission, truth, (HEIGHT, WIDTH)).mean() > 0.8


@pytest.mark.slow
def test_resume_keeps_written_rows_and_gives_the_same_file(trained_run, data_dir, tmp_path, capsys):
    common = ["--checkpoints", str(trained_run), "--data-dir", str(data_dir), "--workers", "0", "--tta"]
    infer.main([*common, "--out", str(tmp_path / "full.csv")])
    full = (tmp_path / "full.csv").read_text()
    lines = full.splitlines(keepends=True)
    (tmp_path / "resumed.csv.partial").write_text("".join(lines[:6]) + lines[6][:9])  # torn mid-row
    infer.main([*common, "--out", str(tmp_path / "resumed.csv"), "--resume"])
    assert (tmp_path / "resumed.csv").read_text() == full
    assert "validated" in capsys.readouterr().out


def test_out_of_fold_report_and_overlays(trained_run, data_dir, tmp_path, capsys):
    infer.main(
        [
            "--oof",
            "--tta",
            "--checkpoints",
            str(trained_run),
            "--data-dir",
            str(data_dir),
            "--workers",
            "0",
            "--out-dir",
            str(tmp_path),
            "--worst",
            "3",
        ]
    )
    printed = capsys.readouterr().out
    assert "best threshold" in printed and "Dice (TTA hflip)" in printed
    scores = pd.read_csv(tmp_path / "oof.csv")
    assert len(scores) == 32 and set(scores["fold"]) == {0, 1} and scores["dice_0.50"].mean() > 0.8
    assert len(list(tmp_path.glob("worst*.png"))) == 3


def test_single_image_prediction(trained_run, data_dir, tmp_path):
    image = next((data_dir / "test").iterdir())
    infer.main(["--image", str(image), "--checkpoints", str(trained_run), "--out-dir", str(tmp_path)])
    mask = np.asarray(Image.open(tmp_path / f"{image.stem}_mask.png"))
    assert mask.shape == (HEIGHT, WIDTH) and 0.05 < (mask > 0).mean() < 0.8
    assert (tmp_path / f"{image.stem}_overlay.png").exists()


def test_single_image_prediction_applies_the_tuned_post_processing(tmp_path, caplog):
    from competition.postprocess import ClassRule, PostProcess, write_postprocess
    from tests.test_serve import photo, untrained_run

    caplog.set_level(logging.INFO, logger="competition")
    run, image = untrained_run(tmp_path / "run"), tmp_path / "car.png"
    Image.fromarray(photo()).save(image)
    checkpoints = predicted_by(find_checkpoints([run]), (), 0.5)["checkpoints"]
    everything = PostProcess("binary", (ClassRule("car", 1e-9, 0, 0),))  # every pixel above the threshold
    write_postprocess(run / "postprocess.json", everything, {"images": 1, "tta": []}, checkpoints)
    argv = ["--image", str(image), "--checkpoints", str(run), "--workers", "0"]
    infer.main([*argv, "--out-dir", str(tmp_path / "tuned")])
    assert f"{run / 'postprocess.json'}: post-processing applied" in caplog.text
    assert (np.asarray(Image.open(tmp_path / "tuned" / "car_mask.png")) == 255).all()
    infer.main([*argv, "--out-dir", str(tmp_path / "plain"), "--no-postprocess"])
    assert not (np.asarray(Image.open(tmp_path / "plain" / "car_mask.png")) == 255).all()


def run_infer(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        infer.main(argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in error
    return error


def test_out_of_device_memory_keeps_the_written_rows_for_resume(trained_run, data_dir, tmp_path, capsys, monkeypatch):
    real = Ensemble.probabilities
    calls = {"n": 0}

    def runs_out_on_the_third_batch(self, images, output_size):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB.\nallocator report")
        return real(self, images, output_size)

    monkeypatch.setattr(Ensemble, "probabilities", runs_out_on_the_third_batch)
    out = tmp_path / "submission.csv"
    common = ["--checkpoints", str(trained_run), "--data-dir", str(data_dir), "--workers", "0", "--out", str(out)]
    error = run_infer([*common, "--batch-size", "2"], capsys)
    assert "Tried to allocate 8.00 GiB. (a batch of 2 test images): lower --batch-size (now 2)" in error
    assert "allocator report" not in error and "lower --batch-size" in error.splitlines()[-1]  # after the bar
    assert not out.exists() and len((tmp_path / "submission.csv.partial").read_text().splitlines()) == 1 + 2 * 2
    monkeypatch.undo()
    infer.main([*common, "--resume"])
    validate_submission(out, pd.read_csv(data_dir / "sample_submission.csv")["img"].tolist(), (HEIGHT, WIDTH))


def test_corrupt_checkpoint(trained_run, tmp_path, capsys):
    payload = (trained_run / "fold0" / "best.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(payload[: len(payload) // 2])
    assert "truncated.pt: not a readable checkpoint" in run_infer(
        ["--checkpoints", str(tmp_path / "truncated.pt")], capsys
    )
    (tmp_path / "garbage.pt").write_bytes(b"\x00" * 100)
    garbage = run_infer(["--checkpoints", str(tmp_path / "garbage.pt")], capsys)
    assert "garbage.pt: not a PyTorch checkpoint (it begins b'\\x00\\x00" in garbage
    torch.save({"weights": {}}, tmp_path / "foreign.pt")
    assert "not a checkpoint of this repository" in run_infer(["--checkpoints", str(tmp_path / "foreign.pt")], capsys)
    assert "no such checkpoint" in run_infer(["--checkpoints", str(tmp_path / "nowhere")], capsys)


def test_checkpoint_of_another_architecture(trained_run, tmp_path):
    checkpoint = torch.load(trained_run / "fold0" / "best.pt", weights_only=True)
    checkpoint["config"]["arch"] = "FPN"
    torch.save(checkpoint, tmp_path / "relabelled.pt")
    with pytest.raises(CheckpointError, match="relabelled.pt: its weights do not fit FPN-resnet18"):
        load_member(tmp_path / "relabelled.pt", torch.device("cpu"))


def test_empty_test_folder_and_image_of_unexpected_size(trained_run, data_dir, tmp_path):
    member = load_member(trained_run / "fold0" / "best.pt", torch.device("cpu"))
    data = shutil.copytree(data_dir, tmp_path / "data")
    victim = sorted((data / "test").iterdir())[3]
    victim.write_bytes(encode_jpeg(np.zeros((HEIGHT + 32, WIDTH, 3), np.uint8), 90))
    with pytest.raises(
        DataError,
        match=rf"{victim.name}: image is {WIDTH}x{HEIGHT + 32}, but the models were trained "
        rf"on {WIDTH}x{HEIGHT}",
    ):
        write_submission(Ensemble([member]), CarvanaData(data), tmp_path / "s.csv", workers=0, progress=False)
    assert not (tmp_path / "s.csv").exists()
    for path in (data / "test").iterdir():
        path.unlink()
    with pytest.raises(DataError, match="no test images"):
        write_submission(Ensemble([member]), CarvanaData(data), tmp_path / "s.csv", workers=0, progress=False)


def test_validation_catches_broken_submissions(tmp_path):
    path = tmp_path / "s.csv"
    expected = ["a_01.jpg", "a_02.jpg"]
    path.write_text("img,rle_mask\na_01.jpg,1 2\na_02.jpg,\n")
    assert validate_submission(path, expected, (2, 2))["area"].tolist() == [0.5, 0.0]
    for text, problem in [
        ("image,mask\na_01.jpg,1 2\na_02.jpg,\n", "header"),
        ("img,rle_mask\na_01.jpg,1 2\na_01.jpg,\na_02.jpg,\n", "s.csv: row 3 repeats a_01.jpg of row 2; each image"),
        ("img,rle_mask\na_01.jpg,1 2\na_02.jpg,\nb_01.jpg,\n", r"s.csv: row 4: b_01.jpg is not in the test set$"),
        ("img,rle_mask\na_01.jpg,1 2\n", r"s.csv: no row for 1 of the 2 images of the test set, e.g. \['a_02.jpg'\]"),
        ("img,rle_mask\na_01.jpg,1 9\na_02.jpg,\n", r"s.csv: row 2 \(a_01.jpg\): RLE has a run past the end"),
    ]:
        path.write_text(text)
        with pytest.raises(DataError, match=problem):
            validate_submission(path, expected, (2, 2))


def test_member_size_key_follows_its_config(trained_run):
    member = load_member(trained_run / "fold0" / "best.pt", torch.device("cpu"))
    assert isinstance(member, Member) and member.size_key == "64x96" and member.image_shape == (HEIGHT, WIDTH)


class Pointwise(torch.nn.Module):
    """A model that commutes with flips and resizing: its logit depends on each pixel's colour alone."""

    def forward(self, images):
        return (images.float() / 255 - 0.5).sum(1, keepdim=True) * 4


@pytest.mark.parametrize(
    "name, tolerance", [("vflip", 1e-6), ("hflip", 1e-6), ("scale0.875", 0.02), ("scale1.125", 0.02)]
)
def test_every_tta_view_maps_back_onto_the_input_pixels(name, tolerance):
    rows, columns = torch.meshgrid(torch.linspace(0, 3, 64), torch.linspace(0, 5, 96), indexing="ij")
    smooth = ((torch.sin(rows) * torch.cos(columns) + 1) * 127).to(torch.uint8)  # no detail lost by resizing
    image = torch.stack([smooth, smooth.flip(-1), smooth.flip(-2)])[None]
    plain = predict_probabilities(Pointwise(), image)
    augmented = predict_probabilities(Pointwise(), image, tta=(name,))
    assert augmented.shape == plain.shape
    assert (augmented - plain).abs().max() < tolerance
    shifted = predict_probabilities(Pointwise(), image.roll(8, -1))
    assert (shifted - plain).abs().max() > 10 * tolerance, "the test must be able to fail"


@pytest.mark.slow
def test_export_onnx_matches_pytorch(trained_run, tmp_path, capsys):
    import onnxruntime

    out = tmp_path / "fold0.onnx"
    infer.main(["--export-onnx", str(out), "--checkpoints", str(trained_run / "fold0" / "best.pt")])
    assert "onnxruntime matches PyTorch" in capsys.readouterr().out
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    member = load_member(trained_run / "fold0" / "best.pt", torch.device("cpu"))
    images = torch.randint(0, 256, (5, 3, 64, 96), dtype=torch.uint8)
    with torch.no_grad():
        expected = member.model(images).numpy()
    assert np.abs(session.run(None, {"images": images.numpy()})[0] - expected).max() < 1e-3
    exported = out.read_bytes()
    error = one_line(run_infer(["--export-onnx", str(out), "--checkpoints", str(trained_run)], capsys))
    assert f"--export-onnx {out}: the file exists; pass --overwrite to replace it" in error
    assert out.read_bytes() == exported
    out.write_bytes(b"an older export")
    infer.main(["--export-onnx", str(out), "--checkpoints", str(trained_run / "fold0" / "best.pt"), "--overwrite"])
    onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])  # the model again, not the old file


@settings(max_examples=50, deadline=None)
@given(st.integers(8, 64), st.integers(8, 64), st.floats(0, 1), st.sampled_from(sorted(TTA)), st.sampled_from([-1, -2]))
def test_each_tta_view_and_its_inverse_keep_pixel_values(height, width, value, name, axis):
    """Flips: the view is the flipped image and the inverse restores it exactly. Scales: the view is
    floor(side x scale) pixels; a constant comes back as the same constant, and a linear ramp comes back
    within 1.25 of its per-pixel step, while the ramp shifted by 3 pixels is further off than that."""
    forward, inverse = TTA[name]
    constant = torch.full((2, 1, height, width), value)
    along = width if axis == -1 else height
    ramp = torch.linspace(0, 1, along).reshape((1, along) if axis == -1 else (along, 1)).expand(1, 1, height, width)
    step = 1 / (along - 1)
    if "flip" in name:
        flipped_axis = -1 if name == "hflip" else -2
        assert torch.equal(forward(ramp), ramp.flip(flipped_axis))
        for image in (constant, ramp):
            assert torch.equal(inverse(forward(image), (height, width)), image)
        return
    scale = float(name.removeprefix("scale"))
    assert forward(ramp).shape[-2:] == (int(height * scale), int(width * scale))
    assert torch.allclose(inverse(forward(constant), (height, width)), constant, atol=1e-6)
    restored = inverse(forward(ramp), (height, width))
    assert restored.shape == ramp.shape
    assert (restored - ramp).abs().max() <= 1.25 * step
    assert (restored - (ramp - 3 * step)).abs().max() > 1.25 * step, "the tolerance must catch a misaligned inverse"


class RunsCode:
    """A pickle that runs a shell command when unpickled, as a malicious checkpoint would."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_a_checkpoint_that_would_run_code_is_refused_unread(tmp_path, capsys):
    witness = tmp_path / "PWNED"
    torch.save({"model": RunsCode(f"touch {witness}"), "config": {}}, tmp_path / "evil.pt")
    error = run_infer(["--checkpoints", str(tmp_path / "evil.pt"), "--out", str(tmp_path / "s.csv")], capsys)
    assert "evil.pt: not a weights file of this project" in error and "refused unread" in error
    assert error.count("\n") == 1 and "Weights only load failed" not in error and "WeightsUnpickler" not in error
    assert not witness.exists()


@pytest.mark.slow
def test_load_member_prepares_the_model_as_trained(trained_run):
    assert issubclass(CheckpointError, ProjectError) and CheckpointError is errors.CheckpointError
    member = load_member(trained_run / "fold0" / "best.pt", torch.device("cpu"))
    weights = next(p for p in member.model.parameters() if p.dim() == 4)
    assert member.config.channels_last and weights.is_contiguous(memory_format=torch.channels_last)
    assert member.forward is member.model
    batch = member.model_input({"64x96": torch.zeros(2, 3, 64, 96, dtype=torch.uint8)})
    assert batch.is_contiguous(memory_format=torch.channels_last)
    compiled = load_member(trained_run / "fold0" / "best.pt", torch.device("cpu"), compile=True)
    assert compiled.forward is not compiled.model and isinstance(compiled.forward, torch._dynamo.OptimizedModule)
    assert compiled.forward._orig_mod is compiled.model


def one_line(error: str) -> str:
    assert error.count("\n") == 1, error
    return error


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.2", "nan"])
def test_threshold_outside_zero_one_is_refused(value, tmp_path, capsys):
    error = one_line(run_infer(["--threshold", value, "--checkpoints", str(tmp_path / "nowhere")], capsys))
    assert f"--threshold {float(value)}: a probability strictly between 0 and 1" in error


def test_batch_size_and_workers_are_checked(tmp_path, capsys):
    nowhere = ["--checkpoints", str(tmp_path / "nowhere")]
    assert "--batch-size 0: must be at least 1" in one_line(run_infer(["--batch-size", "0", *nowhere], capsys))
    assert "--workers -1: must be at least 0" in one_line(run_infer(["--workers", "-1", *nowhere], capsys))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--worst", "3"], "--worst belongs to --oof, not to the test submission"),
        (["--folds-csv", "f.csv"], "--folds-csv belongs to --oof, not to the test submission"),
        (["--out-dir", "d"], "--out-dir belongs to --oof and --image, not to the test submission"),
        (["--oof", "--resume"], "--resume belongs to the test submission, not to --oof"),
        (["--image", "a.jpg", "--out", "s.csv"], "--out belongs to the test submission and --oof, not to --image"),
        (
            ["--image", "a.jpg", "--overwrite"],
            "--overwrite belongs to the test submission, --oof and --export-onnx, not to --image",
        ),
        (
            ["--export-onnx", "m.onnx", "--tta"],
            "--export-onnx writes the model alone (its logits for one view): leave out --tta, which",
        ),
        (
            ["--export-onnx", "m.onnx", "--tta-transforms", "vflip"],
            "leave out --tta-transforms, which infer.py applies",
        ),
        (["--export-onnx", "m.onnx", "--threshold", "0.4"], "leave out --threshold, which infer.py applies"),
        (["--image", "a.jpg", "--worst", "2"], "--worst belongs to --oof, not to --image"),
        (["--export-onnx", "m.onnx", "--out-dir", "d"], "--out-dir belongs to --oof and --image, not to --export-onnx"),
        (["--resume", "--overwrite"], "--resume keeps the rows already written and --overwrite starts again"),
    ],
)
def test_each_mode_refuses_the_flags_of_another(argv, message, tmp_path, capsys):
    error = one_line(run_infer([*argv, "--checkpoints", str(tmp_path / "nowhere")], capsys))
    assert message in error


@pytest.mark.parametrize("argv", [["--oof", "--image", "a.jpg"], ["--image", "a.jpg", "--export-onnx", "m.onnx"]])
def test_modes_are_mutually_exclusive(argv, tmp_path, capsys):
    assert "not allowed with argument" in run_infer([*argv, "--checkpoints", str(tmp_path / "nowhere")], capsys)


def test_tta_transforms_are_checked_at_the_door_and_imply_tta(trained_run, data_dir, tmp_path, capsys, monkeypatch):
    loaded = []
    monkeypatch.setattr(infer, "load_member", lambda *args: loaded.append(args))
    error = one_line(run_infer(["--tta-transforms", "hflip,bogus", "--checkpoints", str(trained_run)], capsys))
    assert "--tta-transforms: unknown ['bogus']; choose from hflip" in error and not loaded
    monkeypatch.undo()
    image = min((data_dir / "test").iterdir())
    argv = ["--image", str(image), "--checkpoints", str(trained_run), "--out-dir", str(tmp_path)]
    infer.main([*argv, "--tta-transforms", "hflip,vflip"])
    printed = capsys.readouterr().out
    assert "--tta-transforms hflip,vflip implies --tta" in printed and "TTA hflip+vflip" in printed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
@pytest.mark.parametrize(
    "device, message",
    [("cuda", "--device cuda: no CUDA device here"), ("cuda:x", "--device 'cuda:x' is not a device name")],
)
def test_unusable_device_is_one_line(device, message, trained_run, capsys):
    assert message in one_line(run_infer(["--device", device, "--checkpoints", str(trained_run)], capsys))


def test_sample_submission_is_followed_or_refused_never_skipped(trained_run, data_copy, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="competition")
    member = load_member(trained_run / "fold0" / "best.pt", torch.device("cpu"))
    sample = data_copy / "sample_submission.csv"
    lines = sample.read_text().splitlines(keepends=True)
    test_ids = sorted(path.stem for path in (data_copy / "test").iterdir())
    for text, problem in [
        ("image,mask\n" + "".join(lines[1:]), "sample_submission.csv: the header is 'image,mask', not 'img,rle_mask'"),
        ("".join(lines[:5]) + "a,b,c,d\n" + "".join(lines[5:]), "sample_submission.csv: not a readable CSV"),
        ("".join(lines) + lines[3], rf"1 image\(s\) listed twice, e.g. \['{lines[3].split('.')[0]}'\]"),
        (
            "".join(lines[:-3]),
            (
                rf"3 of the {len(test_ids)} test images are not listed in it, e.g. \[.*\]; restore the "
                "competition's full sample_submission.csv, or remove it to predict every test image in sorted order"
            ),
        ),
        ("".join(lines) + "nowhere_01.jpg,1 1\n", r"lists 1 image\(s\) with no file in test/"),
    ]:
        sample.write_text(text)
        with pytest.raises(DataError, match=problem) as raised:
            write_submission(Ensemble([member]), CarvanaData(data_copy), tmp_path / "s.csv", workers=0, progress=False)
        assert "\n" not in str(raised.value)
    assert not (tmp_path / "s.csv").exists() and not (tmp_path / "s.csv.partial").exists()
    sample.unlink()
    assert submission_order(CarvanaData(data_copy)) == test_ids
    assert f"no sample_submission.csv: predicting all {len(test_ids)} test images in sorted order" in caplog.text


def test_a_finished_submission_is_never_overwritten_unasked(trained_run, data_dir, tmp_path, capsys):
    out = tmp_path / "submission.csv"
    out.write_text("finished\n")
    common = ["--checkpoints", str(trained_run), "--data-dir", str(data_dir), "--workers", "0", "--out", str(out)]
    assert f"{out} exists; pass --overwrite to replace it" in one_line(run_infer(common, capsys))
    infer.main([*common, "--resume"])
    assert "is complete; nothing to predict" in capsys.readouterr().out and out.read_text() == "finished\n"
    infer.main([*common, "--overwrite"])
    assert "validated" in capsys.readouterr().out
    validate_submission(out, pd.read_csv(data_dir / "sample_submission.csv")["img"].tolist(), (HEIGHT, WIDTH))
    with pytest.raises(ConfigError, match="exists; pass --overwrite"):
        write_submission(Ensemble([load_member(trained_run / "fold0" / "best.pt", "cpu")]), CarvanaData(data_dir), out)


def oof(run_dirs, data_dir, out_dir, *more):
    checkpoints = [str(run_dir) for run_dir in run_dirs]
    infer.main(["--oof", "--checkpoints", *checkpoints, "--data-dir", str(data_dir), "--workers", "0", "--out-dir"]
               + [str(out_dir), *more])  # fmt: skip
    return pd.read_csv(out_dir / "oof.csv")


@pytest.mark.slow
def test_out_of_fold_scores_each_image_once_when_run_folders_share_folds(trained_run, data_dir, tmp_path):
    once = oof([trained_run], data_dir, tmp_path / "once", "--worst", "0")
    twice = oof([trained_run, trained_run], data_dir, tmp_path / "twice", "--worst", "0")
    assert len(once) == len(twice) == 32 and twice["img"].is_unique
    pd.testing.assert_frame_equal(once, twice, atol=1e-6)


def test_out_of_fold_ranks_and_draws_at_the_chosen_threshold_and_writes_atomically(
    trained_run, data_dir, tmp_path, monkeypatch
):
    drawn = []
    real = inference.predict_image

    def recording(ensemble, image, threshold=0.5):
        drawn.append(threshold)
        return real(ensemble, image, threshold)

    monkeypatch.setattr(inference, "predict_image", recording)
    scores = oof([trained_run], data_dir, tmp_path, "--threshold", "0.55", "--worst", "2")
    assert drawn == [0.55, 0.55] and {"dice_0.50", "dice_0.55"} <= set(scores.columns)
    worst = scores.nsmallest(2, "dice_0.55")
    expected = [f"worst{rank:02d}_{img[:-4]}_dice{dice:.4f}.png" for rank, (img, dice) in
                enumerate(zip(worst["img"], worst["dice_0.55"]), start=1)]  # fmt: skip
    assert sorted(path.name for path in tmp_path.glob("worst*.png")) == expected
    written = (tmp_path / "oof.csv").read_text()

    def torn_write(frame, path, **options):
        Path(path).write_text("img,fold\n")
        raise OSError("No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", torn_write)
    with pytest.raises(OSError, match="No space left"):
        oof([trained_run], data_dir, tmp_path, "--worst", "0")
    assert (tmp_path / "oof.csv").read_text() == written and not list(tmp_path.glob("*.partial"))


def test_project_errors_are_one_line_and_anything_else_keeps_its_traceback(tmp_path, capsys, monkeypatch):
    nowhere = ["--checkpoints", str(tmp_path / "nowhere")]
    assert "nowhere: no such checkpoint file or run folder" in one_line(run_infer(nowhere, capsys))
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        infer.main([*nowhere, "--debug"])

    def bug(*args):
        raise ValueError("a bug, not a user's mistake")

    monkeypatch.setattr(infer, "find_checkpoints", bug)
    with pytest.raises(ValueError, match="a bug"):
        infer.main(nowhere)


def test_quiet_silences_information(trained_run, data_dir, tmp_path, capsys):
    image = min((data_dir / "test").iterdir())
    infer.main(["--image", str(image), "--checkpoints", str(trained_run), "--out-dir", str(tmp_path), "--quiet"])
    assert capsys.readouterr().out == "" and (tmp_path / f"{image.stem}_mask.png").exists()


def test_rows_left_by_an_interrupted_run_are_kept_unless_asked(tmp_path):
    from competition.errors import ConfigError
    from competition.submission import keep_finished

    out = tmp_path / "submission.csv"
    (tmp_path / "submission.csv.partial").write_text("img,rle_mask\na_01.jpg,1 2\n")
    with pytest.raises(ConfigError, match="interrupted run left 1 predicted rows; pass --resume .* or --overwrite"):
        keep_finished(out, resume=False, overwrite=False)
    assert keep_finished(out, resume=True, overwrite=False) is False
    assert keep_finished(out, resume=False, overwrite=True) is False


def test_time_limit_stops_at_a_batch_boundary_and_resume_finishes_the_same_file(
    trained_run, data_dir, tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.INFO, logger="competition")
    deadline = thirty_seconds_a_batch(monkeypatch)
    members = [load_member(path, torch.device("cpu")) for path in find_checkpoints([trained_run])]
    out = tmp_path / "submission.csv"
    settings = {"workers": 0, "progress": False, "deadline": deadline}
    assert write_submission(Ensemble(members, ("hflip",)), CarvanaData(data_dir), out, **settings) is None
    # batches at 0, 30 and 60 s; the next, 30 s long, would end past 95 s
    assert not out.exists() and len((tmp_path / "submission.csv.partial").read_text().splitlines()) == 1 + 3 * 4
    assert caplog.text.count("projected") == 1, "once, after a minute"
    assert (
        "predict: projected 3m00s for the 24 image(s) left x 2 model(s) x 2 view(s) (from 0.1 img/s over 1m00s); "
        "time limit 1m35s, 35s left: it does not fit, about 4 of them do" in caplog.text
    )
    assert (
        f"{out}: stopped by the time limit 1m35s at a batch boundary: 12 of the 32 test images are written and kept, "
        "no submission yet; run the same command with --resume to finish" in caplog.text
    )
    monkeypatch.undo()
    common = ["--checkpoints", str(trained_run), "--data-dir", str(data_dir), "--workers", "0", "--tta"]
    infer.main([*common, "--out", str(out), "--resume"])
    infer.main([*common, "--out", str(tmp_path / "uninterrupted.csv")])
    assert out.read_bytes() == (tmp_path / "uninterrupted.csv").read_bytes()


def test_a_time_limit_already_spent_exits_3_with_the_rows_kept(trained_run, data_dir, tmp_path, capsys):
    common = ["--checkpoints", str(trained_run), "--data-dir", str(data_dir), "--workers", "0"]
    out = tmp_path / "submission.csv"
    with pytest.raises(SystemExit) as exit_info:
        infer.main([*common, "--out", str(out), "--time-limit", "0.001s"])  # spent while the models load
    assert exit_info.value.code == 3 and not out.exists()
    assert "0 of the 32 test images are written and kept" in capsys.readouterr().err
    infer.main([*common, "--out", str(out), "--resume", "--time-limit", "1h"])
    assert "validated" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--time-limit", "soon"], "--time-limit 'soon': a duration such as 11h30m"),
        (["--time-limit", "-5m"], "--time-limit '-5m': a duration such as 11h30m"),
        (["--time-limit", "0m"], "--time-limit '0m': must be longer than 0 (0 or none: no limit)"),
        (["--oof", "--time-limit", "1h"], "--time-limit belongs to the test submission, not to --oof"),
    ],
)
def test_a_bad_time_limit_is_one_line(argv, message, tmp_path, capsys):
    assert message in one_line(run_infer([*argv, "--checkpoints", str(tmp_path / "nowhere")], capsys))


def test_a_batch_that_passes_the_time_limit_is_said_to_have_passed_it_never_to_fit(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="competition")
    out = tmp_path / "s.csv"
    deadline = ManualDeadline(10.0, started=0.0)
    pace = PredictionPace(deadline, "predict", 8, 1, 1)
    assert pace.next_batch_fits()  # nothing known of a batch's length before it: it is not refused
    deadline.now = 48.0
    pace.batch_done(4)
    assert not pace.next_batch_fits()
    pace.finish()
    inference.log_stopped(out, 4, 8, deadline, predicted=4)
    inference.log_stopped(out, 0, 8, deadline, predicted=0)
    assert [record.getMessage() for record in caplog.records] == [
        (
            "predict: projected 48s for the 4 image(s) left x 1 model(s) x 1 view(s) (from 0.1 img/s over 48s); the time "
            "limit 10s was passed: none of them fit"
        ),
        (
            f"{out}: the time limit 10s was passed during the last batch: 4 of the 8 test images are written and kept, no "
            "submission yet; run the same command with --resume to finish"
        ),
        (
            f"{out}: the time limit 10s had passed before the first batch: 0 of the 8 test images are written and kept, "
            "no submission yet; run the same command with --resume to finish"
        ),
    ]


def thirty_seconds_a_batch(monkeypatch) -> ManualDeadline:
    """A time limit of 95 s on a clock that moves 30 s with each batch the ensemble predicts: three batches fit.
    ``monkeypatch.undo()`` predicts at full speed again."""
    deadline = ManualDeadline(95.0, started=0.0)
    real = Ensemble.probabilities

    def slow(self, images, output_size):
        deadline.now += 30.0
        return real(self, images, output_size)

    monkeypatch.setattr(Ensemble, "probabilities", slow)
    return deadline


def run_stopped_after_three_batches(checkpoints, data_dir, out, monkeypatch) -> None:
    """A submission with TTA stopped by a time limit after three batches of 4: 12 rows in ``<out>.partial``."""
    deadline = thirty_seconds_a_batch(monkeypatch)
    members = [load_member(path, torch.device("cpu")) for path in find_checkpoints(checkpoints)]
    settings = {"workers": 0, "progress": False, "deadline": deadline}
    assert write_submission(Ensemble(members, ("hflip",)), CarvanaData(data_dir), out, **settings) is None
    monkeypatch.undo()


def best_checkpoints(trained_run: Path, folder: Path) -> Path:
    """A run folder holding a copy of the trained run's best checkpoints, for a test to change."""
    for fold in ("fold0", "fold1"):
        (folder / fold).mkdir(parents=True)
        shutil.copyfile(trained_run / fold / "best.pt", folder / fold / "best.pt")
    return folder


def train_fold_0_on(run: Path) -> None:
    """As if fold 0 trained on and saved a new best.pt: fold 1's weights, so that the ensemble predicts other masks."""
    shutil.copyfile(run / "fold1" / "best.pt", run / "fold0" / "best.pt")


@pytest.mark.slow
def test_resume_after_the_checkpoints_changed_predicts_every_image_again(
    trained_run, data_dir, tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.INFO, logger="competition")
    run = best_checkpoints(trained_run, tmp_path / "run")
    out = tmp_path / "submission.csv"
    run_stopped_after_three_batches([run], data_dir, out, monkeypatch)
    record = tmp_path / "submission.csv.predicted-by.json"
    assert [checkpoint["path"] for checkpoint in json.loads(record.read_text())["checkpoints"]] == [
        str((run / fold / "best.pt").resolve()) for fold in ("fold0", "fold1")
    ]
    old_rows = (tmp_path / "submission.csv.partial").read_text().splitlines()[1:]
    train_fold_0_on(run)
    common = ["--checkpoints", str(run), "--data-dir", str(data_dir), "--workers", "0", "--tta"]
    infer.main([*common, "--out", str(out), "--resume"])
    assert (
        f"the rows of {tmp_path / 'submission.csv.partial'} were predicted by other models or settings (checkpoints "
        "changed): predicting every test image again" in caplog.text
    )
    infer.main([*common, "--out", str(tmp_path / "fresh.csv")])
    assert out.read_bytes() == (tmp_path / "fresh.csv").read_bytes()
    assert out.read_text().splitlines()[1:13] != old_rows, "the new models predict other masks"
    assert not record.exists() and not (tmp_path / "fresh.csv.predicted-by.json").exists(), "removed when finished"


def test_rows_are_kept_by_resume_only_when_predicted_alike(tmp_path, caplog):
    out = tmp_path / "submission.csv"
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"weights")
    rows = HEADER + "a_01.jpg,1 2\n"
    (tmp_path / "submission.csv.partial").write_text(rows)
    start_rows(out, predicted_by([checkpoint], ("hflip",), 0.5), resume=True)  # no record: rows of an older version
    assert (tmp_path / "submission.csv.partial").read_text() == rows and not caplog.text
    start_rows(out, predicted_by([checkpoint], ("hflip",), 0.5), resume=True)
    assert (tmp_path / "submission.csv.partial").read_text() == rows and not caplog.text
    start_rows(out, predicted_by([checkpoint], (), 0.6), resume=True)
    assert "(TTA hflip -> off, threshold 0.5 -> 0.6): predicting every test image again" in caplog.text
    assert sorted(path.name for path in tmp_path.iterdir()) == ["best.pt", "submission.csv.predicted-by.json"]
    (tmp_path / "submission.csv.partial").write_text(rows)
    start_rows(out, predicted_by([checkpoint], (), 0.6), resume=False)  # --overwrite
    assert sorted(path.name for path in tmp_path.iterdir()) == ["best.pt", "submission.csv.predicted-by.json"]


def test_an_onnx_multilabel_model_gives_a_sigmoid_per_channel(tmp_path):
    class TwoLabels(torch.nn.Module):  # uint8 images in, two overlapping classes' logits out
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 2, 1)

        def forward(self, images):
            return self.conv(images.float() / 255)

    torch.manual_seed(0)
    model, path = TwoLabels().eval(), tmp_path / "labels.onnx"
    images = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8)
    torch.onnx.export(model, (images,), path, dynamo=False, input_names=["images"], output_names=["logits"])
    onnx_model = inference.OnnxModel(path)
    onnx_model.multilabel = True  # as serve sets it from the checkpoints' config
    with torch.no_grad():
        expected = torch.sigmoid(model(images))
    assert torch.allclose(onnx_model.probabilities({"onnx": images}, (8, 8)), expected, atol=1e-5)
