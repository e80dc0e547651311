"""Every command's outputs: checked writable before any work, written by one command at a time, and a full disk
said in one line with what is kept for --resume."""

import errno
import functools
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import infer
import make_folds
import train
from competition import lr_find, synthetic
from competition.errors import OutputError
from competition.files import check_writable, output_lock
from competition.shards import predict_shard, write_on_devices
from competition.submission import SubmissionWriter, validate_submission
from tests.conftest import HEIGHT, WIDTH

NOWHERE = "no-such-run-folder"  # the commands must refuse the output before they look for checkpoints or data

# (command's main, its name in messages, its command line writing to PATH, the flag that names PATH)
WRITERS = [
    (train.main, "train.py", ["--out", "PATH", "--data-dir", NOWHERE], "--out"),
    (infer.main, "infer.py", ["--out", "PATH/sub.csv", "--checkpoints", NOWHERE], "--out"),
    (infer.main, "infer.py", ["--out", "PATH/masks", "--format", "png", "--checkpoints", NOWHERE], "--out"),
    (infer.main, "infer.py", ["--devices", "cpu,cpu", "--out", "PATH/s.csv", "--checkpoints", NOWHERE], "--out"),
    (infer.main, "infer.py", ["--oof", "--out-dir", "PATH", "--checkpoints", NOWHERE], "--out-dir"),
    (infer.main, "infer.py", ["--oof", "--out", "PATH/masks", "--checkpoints", NOWHERE], "--out"),
    (infer.main, "infer.py", ["--image", "car.jpg", "--out-dir", "PATH", "--checkpoints", NOWHERE], "--out-dir"),
    (infer.main, "infer.py", ["--export-onnx", "PATH/m.onnx", "--checkpoints", NOWHERE], "--export-onnx"),
    (make_folds.main, "make_folds.py", ["--out", "PATH/folds.csv", "--data-dir", NOWHERE], "--out"),
    (lr_find.main, "competition.lr_find", ["--out-dir", "PATH", "--data-dir", NOWHERE], "--out-dir"),
    (synthetic.main, "synthetic.py", ["--out", "PATH", "--cars", "1", "--test-cars", "0"], "--out"),
]
IDS = [f"{program} {' '.join(argv[:2])}" for _, program, argv, _ in WRITERS]


def refusal(main, program, argv, monkeypatch, capsys) -> str:
    monkeypatch.setattr("sys.argv", [program])
    with pytest.raises(SystemExit) as stop:
        main(argv)
    error = capsys.readouterr().err
    _, said, line = error.rpartition(f"{program}: error: ")  # after the progress bar, if one was drawn
    assert stop.value.code == 2 and said and line.count("\n") == 1 and "Traceback" not in error, error
    return said + line


@pytest.mark.parametrize("main, program, argv, flag", WRITERS, ids=IDS)
def test_an_output_under_a_file_is_one_line_before_any_work(main, program, argv, flag, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("README.md").write_text("a file, not a folder")
    path = "README.md/x"
    error = refusal(main, program, [item.replace("PATH", path) for item in argv], monkeypatch, capsys)
    named = next(item for item in argv if "PATH" in item).replace("PATH", path)
    assert f"{flag} {named}: README.md is a file, not a folder; name a path in a folder" in error
    assert sorted(os.listdir()) == ["README.md"]  # nothing made


@pytest.mark.parametrize("main, program, argv, flag", WRITERS, ids=IDS)
def test_an_output_where_no_file_can_be_made_is_one_line(main, program, argv, flag, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    error = refusal(main, program, [item.replace("PATH", "/proc/x") for item in argv], monkeypatch, capsys)
    assert f"{flag} /proc/x" in error and "cannot write in /proc" in error and "name a folder you can write to" in error


def test_missing_folders_are_allowed_and_a_file_to_replace_is_written_in_its_folder(tmp_path):
    check_writable(tmp_path / "new" / "deeper" / "out.csv", "--out")  # made as the output is written
    (tmp_path / "out.csv").write_text("finished")
    check_writable(tmp_path / "out.csv", "--out")
    with pytest.raises(OutputError, match="out.csv is a file, not a folder"):
        check_writable(tmp_path / "out.csv", "--out-dir", folder=True)
    assert sorted(os.listdir(tmp_path)) == ["out.csv"]  # the probes are gone


# (an infer.py command line writing PATH, the output it holds)
HELD = [
    (["--out", "PATH/sub.csv"], "PATH/sub.csv"),
    (["--out", "PATH/masks", "--format", "png"], "PATH/masks"),
    (["--devices", "cpu,cpu", "--out", "PATH/sub.csv"], "PATH/sub.csv"),
    (["--oof", "--out-dir", "PATH"], "PATH/oof.csv"),
    (["--oof", "--out-dir", "PATH/scores", "--out", "PATH/masks"], "PATH/masks"),
]


@pytest.mark.parametrize("argv, held", HELD, ids=[" ".join(argv[:2]) for argv, _ in HELD])
def test_a_second_infer_on_the_same_output_is_refused_at_once(argv, held, tmp_path, monkeypatch, capsys):
    argv = [item.replace("PATH", str(tmp_path)) for item in [*argv, "--checkpoints", NOWHERE]]
    held = held.replace("PATH", str(tmp_path))
    with output_lock(held, "--out"):  # the first command, still writing (a lock is its open file's)
        error = refusal(infer.main, "infer.py", argv, monkeypatch, capsys)
    assert f"{held} is being written by another process (pid {os.getpid()}); wait for it or stop it" in error
    error = refusal(infer.main, "infer.py", argv, monkeypatch, capsys)  # alone: on to the checkpoints
    assert f"{NOWHERE}: no such checkpoint file or run folder" in error
    assert not list(tmp_path.rglob("*.lock"))  # released on exit, not left behind


@pytest.mark.slow
def test_the_lock_of_a_killed_command_does_not_block(tmp_path):
    out = tmp_path / "sub.csv"
    holder = "import sys, time\nfrom competition.files import output_lock\n"
    holder += f"with output_lock({str(out)!r}, '--out'):\n    print('held', flush=True)\n    time.sleep(60)\n"
    process = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "held\n"
    with pytest.raises(OutputError, match=f"pid {process.pid}"), output_lock(out, "--out"):
        pass
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert (tmp_path / "sub.csv.lock").exists()  # left by the killed holder, but not held by anyone
    with output_lock(out, "--out"):
        assert (tmp_path / "sub.csv.lock").read_text() == f"{os.getpid()}\n"
    assert not (tmp_path / "sub.csv.lock").exists()


def test_a_second_infer_started_while_the_first_predicts_is_refused(trained_run, data_dir, tmp_path, capsys):
    out = tmp_path / "submission.csv"
    argv = ["--checkpoints", str(trained_run), "--data-dir", str(data_dir), "--workers", "0", "--out", str(out)]
    second: list[str] = []
    real_write = SubmissionWriter.write

    def write_and_start_another(self, rows):
        if not second:
            second.append("started")  # once: a second command that is not refused must not start a third
            with pytest.raises(SystemExit):
                infer.main(argv)
            second[0] = capsys.readouterr().err
        real_write(self, rows)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SubmissionWriter, "write", write_and_start_another)
        infer.main(argv)
    assert second[0].count("\n") == 1 and f"(pid {os.getpid()})" in second[0]
    validate_submission(out, pd.read_csv(data_dir / "sample_submission.csv")["img"].tolist(), (HEIGHT, WIDTH))


def test_a_full_disk_keeps_the_rows_written_and_resume_goes_on(trained_run, data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "submission.csv"
    argv = [
        "--checkpoints",
        str(trained_run),
        "--data-dir",
        str(data_dir),
        "--workers",
        "0",
        "--batch-size",
        "2",
        "--quiet",
    ]
    argv += ["--out", str(out)]
    total = len(pd.read_csv(data_dir / "sample_submission.csv"))

    def torn(self, rows):  # the third batch's rows: a line cut off, then the disk is full
        if len(torn.calls) == 2:
            self.handle.write(f"{rows[0][0]},1 2 3")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        torn.calls.append(rows)
        real(self, rows)

    real, torn.calls = SubmissionWriter.write, []
    monkeypatch.setattr(SubmissionWriter, "write", torn)
    error = refusal(infer.main, "infer.py", argv, monkeypatch, capsys)
    assert (
        f"{tmp_path}: no space left on its disk; 4 of the {total} test images are written and kept: free some " in error
    )
    assert error.rstrip().endswith("run the same command with --resume to go on")
    monkeypatch.undo()
    infer.main([*argv, "--resume"])
    validate_submission(out, pd.read_csv(data_dir / "sample_submission.csv")["img"].tolist(), (HEIGHT, WIDTH))


def test_a_full_disk_keeps_whole_masks_and_overlays(trained_run, data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "masks"
    argv = [
        "--checkpoints",
        str(trained_run),
        "--data-dir",
        str(data_dir),
        "--workers",
        "0",
        "--batch-size",
        "2",
        "--quiet",
    ]
    argv += ["--format", "png", "--overlays", "--out", str(out)]
    writes = {"n": 0}
    real = Path.write_bytes

    def full_at_the_third_mask(self, data):  # each image: its overlay, then its mask
        writes["n"] += 1
        if writes["n"] >= 6:
            real(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_at_the_third_mask)
    error = refusal(infer.main, "infer.py", argv, monkeypatch, capsys)
    monkeypatch.undo()
    assert f"{out}: no space left on its disk; 2 of the " in error and "--resume to go on" in error
    assert len(list(out.glob("*.png"))) == 2 and not list(out.rglob("*.partial"))
    infer.main([*argv, "--resume"])
    masks = sorted(path.name for path in out.glob("*.png"))
    assert masks == sorted(path.name for path in (out / "overlays").glob("*.png")) and len(masks) > 2


def test_a_full_disk_under_shards_is_the_same_one_line(trained_run, data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "submission.csv"
    argv = ["--checkpoints", str(trained_run), "--data-dir", str(data_dir), "--workers", "0", "--batch-size", "2"]
    argv += ["--devices", "cpu,cpu", "--quiet", "--out", str(out)]
    real = SubmissionWriter.write

    def full_at_the_second_batch(self, rows):  # in each shard's file
        self.batches = getattr(self, "batches", 0) + 1
        if self.batches >= 2:  # and stays full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self, rows)

    def in_this_process(jobs, settings):  # the shard workers' own code, where the patch reaches it
        return [predict_shard(job, settings) for job in jobs]

    monkeypatch.setattr(SubmissionWriter, "write", full_at_the_second_batch)
    monkeypatch.setattr(infer, "write_on_devices", functools.partial(write_on_devices, run=in_this_process))
    error = refusal(infer.main, "infer.py", argv, monkeypatch, capsys)
    total = len(pd.read_csv(data_dir / "sample_submission.csv"))
    assert f"{tmp_path}: no space left on its disk; 4 of the {total} test images are written and kept" in error
    monkeypatch.undo()
    infer.main([*argv, "--resume"])
    validate_submission(out, pd.read_csv(data_dir / "sample_submission.csv")["img"].tolist(), (HEIGHT, WIDTH))


def test_the_current_folder_as_output_is_held_beside_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with output_lock(".", "--out"):  # Path(".") has no name: its lock once raised ValueError
        assert (tmp_path.parent / f"{tmp_path.name}.lock").exists()
        with pytest.raises(OutputError, match=f"pid {os.getpid()}"), output_lock(str(tmp_path), "--out"):
            pass
    assert not (tmp_path.parent / f"{tmp_path.name}.lock").exists()
