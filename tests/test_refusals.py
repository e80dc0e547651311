"""Flags that contradict each other, and files that are not what they are given as: one line each, nothing done."""

import time

import pytest

import infer
import train
from competition import cluster
from competition.checkpoints import load_checkpoint
from competition.cluster import ClusterError
from competition.errors import CheckpointError


def refused(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    error = capsys.readouterr().err
    assert stop.value.code == 2 and error.count("\n") == 1 and "Traceback" not in error, error
    return error


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--folds", ""], "--folds '': comma-separated whole numbers, e.g. --folds 0,1,2,3,4"),
        (["--folds", "0,1", "--fold", "2"], "--fold and --folds: give one"),
        (["--folds", "1", "--fold", "0"], "--fold and --folds: give one"),
    ],
)
def test_folds_and_fold_are_not_half_read(argv, message, tmp_path, capsys):
    error = refused(train.main, [*argv, "--out", str(tmp_path / "runs")], capsys)
    assert message in error
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("content", [b"hello world\n", b"", b'{"model": 1}'], ids=["text", "empty", "json"])
def test_a_file_that_is_not_a_pytorch_file_says_so(content, tmp_path, capsys):
    path = tmp_path / "best.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as refusal:
        load_checkpoint(path)
    expected = "the file is empty" if not content else f"it begins {content[:16]!r}"
    assert str(refusal.value).startswith(f"{path}: not a PyTorch checkpoint ({expected}, where PyTorch's files begin")
    error = refused(infer.main, ["--checkpoints", str(path), "--out", str(tmp_path / "s.csv")], capsys)
    assert "not a PyTorch checkpoint" in error and not (tmp_path / "s.csv").exists()


def test_a_cut_off_checkpoint_is_still_called_incomplete(tmp_path):
    import torch

    path = tmp_path / "best.pt"
    torch.save({"model": {"w": torch.zeros(1000)}, "config": {}}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="not a readable checkpoint .*; it is corrupt or incomplete"):
        load_checkpoint(path)


@pytest.mark.skipif(not cluster.ray_importable(), reason="Ray is not installed (make setup-cluster)")
def test_a_ray_client_address_where_nothing_listens_is_one_line_at_once(capsys):
    started = time.monotonic()
    with pytest.raises(ClusterError, match="ray://127.0.0.1:1: nothing answers there .*--ray-client-server-port 1"):
        cluster.connect("ray://127.0.0.1:1")
    assert time.monotonic() - started < 10, "not Ray client's own 30 s timeout"
    assert "Warning" not in capsys.readouterr().err
