"""infer.py --devices: shards cut at batch boundaries, one worker process each, merged byte for byte; failures,
kills and --resume."""

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import infer
from competition.errors import ConfigError
from competition.shards import shard_bounds
from competition.submission import HEADER, gather_rows, keep_finished, shard_files
from tests.conftest import threads_of_cpu_shards
from tests.test_inference import (
    best_checkpoints,
    one_line,
    run_infer,
    run_stopped_after_three_batches,
    train_fold_0_on,
)


@given(st.integers(0, 500), st.integers(1, 9), st.integers(1, 17))
def test_shards_are_contiguous_cover_every_image_and_cut_at_batch_multiples(n_images, n_shards, batch_size):
    bounds = shard_bounds(n_images, n_shards, batch_size)
    assert len(bounds) == n_shards and bounds[0][0] == 0 and bounds[-1][1] == n_images
    assert all(end == start for (_, end), (start, _) in itertools.pairwise(bounds))
    assert all(start % batch_size == 0 for start, _ in bounds)
    batches = -(-n_images // batch_size)
    if batches >= n_shards:
        assert all(end > start for start, end in bounds)
        sizes = [-(-(end - start) // batch_size) for start, end in bounds]
        assert max(sizes) - min(sizes) <= 1, "as equal as whole batches allow"


def test_gather_keeps_every_complete_row_once_in_order_and_drops_torn_lines(tmp_path):
    out = tmp_path / "s.csv"
    (tmp_path / "s.csv.partial").write_text(HEADER + "a_01.jpg,1 2\n")
    (tmp_path / "s.csv.shard1of2").write_text(HEADER + "a_03.jpg,5 1\na_02.jpg,3 1\n")
    (tmp_path / "s.csv.shard2of2.partial").write_text(HEADER + "a_04.jpg,7 1\na_01.jpg,9 9\na_05.jpg,8")  # torn
    (tmp_path / "s.csv.shard3of3.partial").write_text("not,a submission\nz_01.jpg,1 1\n")
    assert gather_rows(out, ["a_01", "a_02", "a_03", "a_04", "a_05"]) == 4
    gathered = "a_01.jpg,1 2\na_02.jpg,3 1\na_03.jpg,5 1\na_04.jpg,7 1\n"
    assert (tmp_path / "s.csv.partial").read_text() == HEADER + gathered
    assert shard_files(out) == [] and sorted(path.name for path in tmp_path.iterdir()) == ["s.csv.partial"]


def test_rows_of_shards_are_refused_unasked_and_removed_by_overwrite(tmp_path):
    out = tmp_path / "s.csv"
    (tmp_path / "s.csv.shard2of2.partial").write_text(HEADER + "a_01.jpg,1 2\na_02.jpg,1 2\n")
    with pytest.raises(ConfigError, match=r"s.csv.shard2of2.partial: an interrupted run left 2 predicted rows; pass"):
        keep_finished(out, resume=False, overwrite=False)
    assert keep_finished(out, resume=True, overwrite=False) is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_unusable_or_conflicting_devices_are_one_line(tmp_path, capsys):
    (tmp_path / "unread.pt").touch()  # devices are checked before a checkpoint is read
    unread = ["--checkpoints", str(tmp_path / "unread.pt"), "--out", str(tmp_path / "s.csv")]
    error = one_line(run_infer(["--devices", "cuda:0,cuda:1", *unread], capsys))
    assert "--device cuda:0: no CUDA device here (none visible to PyTorch); use --device cpu" in error
    nowhere = ["--checkpoints", str(tmp_path / "nowhere")]
    error = one_line(run_infer(["--devices", "cpu,cpu", "--device", "cpu", *nowhere], capsys))
    assert "--device and --devices: pass one of them" in error
    assert "--devices 'cpu,': comma-separated devices" in one_line(run_infer(["--devices", "cpu,", *unread], capsys))
    assert "--devices belongs to the test submission, not to --oof" in one_line(
        run_infer(["--oof", "--devices", "cpu,cpu", *nowhere], capsys)
    )


def test_the_default_gpus_are_checked_before_any_shard_starts(tmp_path, capsys, monkeypatch):
    """Two T4s (faked) and --precision bf16: one line and exit 2, not a FAILED line per shard."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    (tmp_path / "unread.pt").touch()  # devices are checked before a checkpoint is read
    flags = ["--checkpoints", str(tmp_path / "unread.pt"), "--out", str(tmp_path / "s.csv"), "--precision", "bf16"]
    error = one_line(run_infer(flags, capsys))
    assert "--precision bf16: Tesla T4 (compute capability 7.5) has no native bf16" in error
    assert "FAILED" not in error and sorted(path.name for path in tmp_path.iterdir()) == ["unread.pt"]


def common_flags(trained_run, data_dir, out):
    return ["--checkpoints", str(trained_run), "--data-dir", str(data_dir), "--workers", "0", "--out", str(out)]


@pytest.fixture(scope="module")
def one_device_submission(trained_run, data_dir, tmp_path_factory):
    """The submission of an uninterrupted run on one device, in this process: what every other run must equal."""
    out = tmp_path_factory.mktemp("one_device") / "submission.csv"
    with threads_of_cpu_shards():
        infer.main([*common_flags(trained_run, data_dir, out), "--tta"])
    return out.read_bytes()


def test_two_cpu_shards_write_the_file_of_one_device(trained_run, data_dir, one_device_submission, tmp_path, capfd):
    out = tmp_path / "submission.csv"
    infer.main([*common_flags(trained_run, data_dir, out), "--tta", "--devices", "cpu,cpu"])
    assert out.read_bytes() == one_device_submission
    assert sorted(path.name for path in tmp_path.iterdir()) == ["submission.csv"], "shard files removed"
    printed = capfd.readouterr()
    assert "32 test images to predict (0 kept from an interrupted run) in 2 shard(s) on 2 x cpu" in printed.out
    assert "cpu shard 1/2: 16 test images on cpu" in printed.out
    assert "cpu shard 2/2: 16 test images on cpu" in printed.out
    assert "; --workers 0 split across 2 shards: 0 here)" in printed.out
    assert "validated" in printed.out and "cpu shard 2/2" in printed.err, "a progress bar per shard"


def test_a_failing_shard_keeps_every_row_and_resume_finishes(trained_run, data_copy, one_device_submission, capfd):
    out = data_copy.parent / "submission.csv"
    order = [line.split(",")[0] for line in (data_copy / "sample_submission.csv").read_text().splitlines()[1:]]
    victim = data_copy / "test" / order[21]  # in the second shard (images 16-31), in its second batch (20-23)
    payload = victim.read_bytes()
    victim.write_bytes(b"not a jpeg")
    flags = [*common_flags(trained_run, data_copy, out), "--tta", "--devices", "cpu,cpu"]
    with pytest.raises(SystemExit) as exit_info:
        infer.main(flags)
    error = capfd.readouterr().err
    assert exit_info.value.code == 1 and not out.exists() and "Traceback" not in error
    failure = next(line for line in error.splitlines() if "FAILED" in line)
    assert f"cpu shard 2/2: FAILED: DataError: {victim}" in failure
    assert "its 4 row(s) and the other shards' rows are kept: run the same command with --resume" in failure
    assert len((data_copy.parent / "submission.csv.shard1of2").read_text().splitlines()) == 1 + 16
    assert len((data_copy.parent / "submission.csv.shard2of2.partial").read_text().splitlines()) == 1 + 4
    victim.write_bytes(payload)
    infer.main([*flags, "--resume"])
    assert "12 test images to predict (20 kept from an interrupted run) in 2 shard(s)" in capfd.readouterr().out
    assert out.read_bytes() == one_device_submission and shard_files(out) == []


def test_shards_stopped_by_the_time_limit_exit_3_and_resume_finishes(
    trained_run, data_dir, one_device_submission, tmp_path, capfd
):
    out = tmp_path / "submission.csv"
    flags = [*common_flags(trained_run, data_dir, out), "--tta", "--devices", "cpu,cpu"]
    with pytest.raises(SystemExit) as exit_info:
        infer.main([*flags, "--time-limit", "0.001s"])  # spent before the workers start
    assert exit_info.value.code == 3 and not out.exists()
    assert "0 of the 32 test images are written and kept" in capfd.readouterr().err
    infer.main([*flags, "--resume", "--time-limit", "1h"])
    assert out.read_bytes() == one_device_submission and shard_files(out) == []


def test_nothing_left_to_predict_on_devices_merges_the_rows_kept(
    trained_run, data_dir, one_device_submission, tmp_path, capfd
):
    out = tmp_path / "submission.csv"
    (tmp_path / "submission.csv.shard1of2.partial").write_bytes(one_device_submission)  # every row, not renamed
    infer.main([*common_flags(trained_run, data_dir, out), "--tta", "--devices", "cpu,cpu", "--resume"])
    assert "nothing left to predict: all 32 test images kept from an interrupted run" in capfd.readouterr().out
    assert out.read_bytes() == one_device_submission
    assert sorted(path.name for path in tmp_path.iterdir()) == ["submission.csv"]


@pytest.mark.slow
def test_resume_on_devices_after_the_checkpoints_changed_predicts_every_image_again(
    trained_run, data_dir, tmp_path, monkeypatch, capfd
):
    run = best_checkpoints(trained_run, tmp_path / "run")
    out = tmp_path / "submission.csv"
    run_stopped_after_three_batches([run], data_dir, out, monkeypatch)  # on one device: 12 rows
    train_fold_0_on(run)
    infer.main([*common_flags(run, data_dir, out), "--tta", "--devices", "cpu,cpu", "--resume"])
    printed = capfd.readouterr()
    assert "predicted by other models or settings (checkpoints changed): predicting every test image again" in (
        printed.err
    )
    assert "32 test images to predict (0 kept from an interrupted run) in 2 shard(s)" in printed.out
    infer.main([*common_flags(run, data_dir, tmp_path / "fresh.csv"), "--tta"])
    assert out.read_bytes() == (tmp_path / "fresh.csv").read_bytes()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["fresh.csv", "run", "submission.csv"]


def session_processes(session: int) -> list[int]:
    """Live (not zombie) processes of a session, read from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def many_test_images(data_dir: Path, folder: Path, copies: int) -> Path:
    """data_dir with each test image ``copies`` times under new car names: a test set long enough to kill mid-way."""
    data = shutil.copytree(data_dir, folder, ignore=shutil.ignore_patterns("test", "sample_submission.csv"))
    (data / "test").mkdir()
    rows = [HEADER]
    for copy in range(copies):
        for image in sorted((data_dir / "test").iterdir()):
            name = f"c{copy:03d}{image.name}"
            shutil.copyfile(image, data / "test" / name)
            rows.append(f"{name},1 1\n")
    (data / "sample_submission.csv").write_text("".join(rows))
    return data


@pytest.mark.slow
@pytest.mark.usefixtures("threads_as_cpu_shards")
def test_kill_9_of_the_driver_stops_every_shard_and_resume_finishes_the_same_file(trained_run, data_dir, tmp_path):
    data = many_test_images(data_dir, tmp_path / "data", copies=12)  # 384 images
    out = tmp_path / "submission.csv"
    flags = [*common_flags(trained_run, data, out), "--batch-size", "2"]
    driver = subprocess.Popen(
        [sys.executable, "infer.py", *flags, "--devices", "cpu,cpu"],
        cwd=Path(infer.__file__).parent,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    shards = [tmp_path / f"submission.csv.shard{index}of2.partial" for index in (1, 2)]
    try:
        deadline = time.monotonic() + 120
        while not all(shard.exists() and shard.stat().st_size > 200 for shard in shards):  # rows in both shards
            assert driver.poll() is None and time.monotonic() < deadline, "the shards did not start"
            time.sleep(0.05)
        writers = {writer_of(shard, session_processes(driver.pid)) for shard in shards}
        assert len(writers) == 2 and driver.pid not in writers, "a worker process of its own writes each shard"
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 10
        while session_processes(driver.pid) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert session_processes(driver.pid) == [], "workers outlived their driver"
        written = [shard.read_bytes() for shard in shards]
        time.sleep(1)
        assert [shard.read_bytes() for shard in shards] == written, "nothing predicts on"
        assert not out.exists() and sum(len(rows.splitlines()) - 1 for rows in written) < 384, "killed mid-way"
    finally:
        for pid in session_processes(driver.pid):
            os.kill(pid, signal.SIGKILL)
    infer.main([*flags, "--devices", "cpu,cpu", "--resume"])
    resumed = out.read_bytes()
    infer.main([*common_flags(trained_run, data, tmp_path / "uninterrupted.csv"), "--batch-size", "2"])
    assert resumed == (tmp_path / "uninterrupted.csv").read_bytes()


def writer_of(path: Path, pids: list[int]) -> int:
    """The process among ``pids`` that holds ``path`` open, read from /proc."""
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                if Path(os.readlink(fd)) == path:
                    return pid
            except OSError:
                continue
    raise AssertionError(f"no process holds {path} open")


@pytest.mark.slow
@pytest.mark.usefixtures("threads_as_cpu_shards")
def test_a_shard_whose_process_dies_is_reported_and_the_other_finishes(trained_run, data_dir, tmp_path):
    data = many_test_images(data_dir, tmp_path / "data", copies=12)  # 384 images
    out = tmp_path / "submission.csv"
    flags = [*common_flags(trained_run, data, out), "--batch-size", "2"]
    driver = subprocess.Popen(
        [sys.executable, "infer.py", *flags, "--devices", "cpu,cpu"],
        cwd=Path(infer.__file__).parent,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    second = tmp_path / "submission.csv.shard2of2.partial"
    try:
        deadline = time.monotonic() + 120
        while not (second.exists() and second.stat().st_size > 200):  # shard 2 is writing rows
            assert driver.poll() is None and time.monotonic() < deadline, "shard 2 did not start"
            time.sleep(0.05)
        # Every worker paused first: shard 2 cannot finish and rename its file while its writer is looked for
        workers = [pid for pid in session_processes(driver.pid) if pid != driver.pid]
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):  # gone since it was listed
                os.kill(pid, signal.SIGSTOP)
        assert second.exists(), "shard 2 finished before it was paused: give it more images"
        victim = writer_of(second, workers)
        os.kill(victim, signal.SIGKILL)
        for pid in workers:
            if pid != victim:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        _, error = driver.communicate(timeout=300)
    finally:
        for pid in session_processes(driver.pid):
            os.kill(pid, signal.SIGKILL)
    assert driver.returncode == 1 and not out.exists()
    assert "cpu shard 2/2: FAILED: its worker process died (exit code -9); its " in error
    assert len((tmp_path / "submission.csv.shard1of2").read_text().splitlines()) == 1 + 192, "shard 1 finished"
    infer.main([*flags, "--devices", "cpu,cpu", "--resume"])
    infer.main([*common_flags(trained_run, data, tmp_path / "uninterrupted.csv"), "--batch-size", "2"])
    assert out.read_bytes() == (tmp_path / "uninterrupted.csv").read_bytes()
