import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import infer
from competition.data import CarvanaData, DataError
from competition.inference import CheckpointError, Ensemble, Member, find_checkpoints, load_member, write_submission
from competition.metrics import score_submission
from competition.models import build_model
from competition.prediction import TTA, predict_probabilities
from competition.submission import validate_submission
from competition.synthetic import encode_jpeg
from tests.conftest import HEIGHT, WIDTH


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
    assert score_submission(submission, truth, HEIGHT * WIDTH).mean() > 0.8


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
    assert "Tried to allocate 8.00 GiB. (batch 2): lower --batch-size" in error and "allocator report" not in error
    assert not out.exists() and len((tmp_path / "submission.csv.partial").read_text().splitlines()) == 1 + 2 * 2
    monkeypatch.setattr(Ensemble, "probabilities", real)
    infer.main([*common, "--resume"])
    validate_submission(out, pd.read_csv(data_dir / "sample_submission.csv")["img"].tolist(), (HEIGHT, WIDTH))


def test_corrupt_checkpoint(trained_run, tmp_path, capsys):
    payload = (trained_run / "fold0" / "best.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(payload[: len(payload) // 2])
    assert "truncated.pt: not a readable checkpoint" in run_infer(
        ["--checkpoints", str(tmp_path / "truncated.pt")], capsys
    )
    (tmp_path / "garbage.pt").write_bytes(b"\x00" * 100)
    assert "garbage.pt: not a readable checkpoint" in run_infer(["--checkpoints", str(tmp_path / "garbage.pt")], capsys)
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
        ("img,rle_mask\na_01.jpg,1 2\na_01.jpg,\na_02.jpg,\n", "appear twice"),
        ("img,rle_mask\na_01.jpg,1 2\n", "1 test image"),
        ("img,rle_mask\na_01.jpg,1 9\na_02.jpg,\n", "row a_01.jpg: RLE has a run past the end"),
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


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 3), st.integers(8, 40), st.integers(8, 40), st.sampled_from(sorted(TTA)))
def test_each_tta_inverse_undoes_its_view(batch, height, width, name):
    forward, inverse = TTA[name]
    images = torch.rand(batch, 1, height, width)
    restored = inverse(forward(images), (height, width))
    assert restored.shape == images.shape
    if "flip" in name:
        assert torch.equal(restored, images)
