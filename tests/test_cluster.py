"""--backend ray: the flags, the attempts record, and folds and shards on a local Ray cluster started by each command
(as a user's first try would: ray.init's own cluster on this machine, its 2 CPUs)."""

import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import infer
import train
from competition import cluster
from competition.cluster import Attempts, ClusterError, claim_attempt
from competition.shards import describe_devices
from competition.submission import shard_files
from tests.test_shards import many_test_images

ROOT = Path(__file__).resolve().parents[1]
NO_RAY = "Ray is not installed: pip install -r requirements-cluster.txt (make test installs it)"
TRAIN_FLAGS = ["--encoder", "resnet18", "--encoder-weights", "none", "--size", "64x96", "--batch-size", "8"]
TRAIN_FLAGS += ["--lr", "2e-3", "--warmup-epochs", "0.2", "--workers", "0", "--epochs", "2"]


def run(script: str, *flags: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """An entry point as a user runs it, in a process of its own (each starts and ends its own Ray cluster)."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *flags],
        check=False,
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        timeout=600,
    )


def scores(run_dir: Path, fold: int) -> list[float]:
    """Each epoch's train loss, validation loss and Dice, in order."""
    with open(run_dir / f"fold{fold}" / "log.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [float(row[column]) for row in rows for column in ("train_loss", "val_loss", "val_dice")]


# Without a cluster ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--folds", "0,1", "--address", "auto"], "--address is for --backend ray"),
        (["--folds", "0,1", "--retries", "3"], "--retries is for --backend ray"),
        (["--folds", "0,1", "--backend", "ray", "--gpus", "0,1"], "--gpus is for the local backend"),
        (["--folds", "0,1", "--backend", "ray", "--jobs", "2"], "--jobs is for the local backend"),
        (["--backend", "ray", "--device", "cpu"], "--device is for the local backend"),
        (["--folds", "0,1", "--backend", "ray", "--retries", "-1"], "--retries -1: must be at least 0"),
    ],
)
def test_train_refuses_flags_of_the_other_backend_in_one_line(argv, message, data_dir, folds_csv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--data-dir", str(data_dir), "--folds-csv", str(folds_csv), *argv])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in error and "Traceback" not in error


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shards", "3"], "--shards is for --backend ray; locally, --devices makes one shard per device"),
        (["--backend", "ray", "--shards", "0"], "--shards 0: must be at least 1"),
        (["--backend", "ray", "--devices", "cpu,cpu"], "--devices is for the local backend"),
        (["--backend", "ray", "--oof"], "--backend ray is for the test submission, not --oof"),
        (["--address", "auto"], "--address is for --backend ray"),
    ],
)
def test_infer_refuses_flags_of_the_other_backend_in_one_line(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        infer.main(["--checkpoints", str(tmp_path), *argv])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in error and "Traceback" not in error


def test_without_ray_the_backend_is_one_line_naming_the_install(data_dir, folds_csv, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # what an import finds when the package is absent
    flags = ["--data-dir", str(data_dir), "--folds-csv", str(folds_csv), "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exit_info:
        train.main([*flags, "--folds", "0,1", "--backend", "ray"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in error
    assert (
        "--backend ray needs Ray, which the plain install leaves out: pip install -r requirements-cluster.txt" in error
    )
    assert not (tmp_path / "run").exists(), "nothing written"


def test_the_clock_of_another_machine_counts_the_same_time_limit():
    started = time.monotonic() - 30.0  # the command began 30 s ago
    assert abs(cluster.monotonic_here(cluster.wall_clock(started)) - started) < 0.1


def test_devices_named_once_are_listed_and_repeated_ones_counted():
    assert describe_devices(["cuda:0", "cuda:1"]) == "cuda:0, cuda:1"
    assert describe_devices(["cpu", "cpu", "cpu"]) == "3 x cpu"


def test_attempts_are_claimed_in_turn_and_a_dead_drivers_folder_is_removed(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(cluster, "_node_address", lambda: "10.0.0.7")
    abandoned = tmp_path / f"{cluster.ATTEMPTS_PREFIX}deadbeef"
    abandoned.mkdir()  # a driver killed before removing its own: nobody holds its lock
    attempts = Attempts(tmp_path, retries=2, retry_means="resuming from its last.pt")
    other = Attempts(tmp_path, retries=2, retry_means="")  # a live driver's folder stays
    assert not abandoned.exists() and attempts.folder.is_dir() and other.folder.is_dir()
    retry = {"node": "10.0.0.8", "device": "cpu", "pid": 42}  # claimed by a retry a stale listing did not show
    (attempts.folder / "fold 0.2.json").write_text(json.dumps(retry))
    numbers = [claim_attempt(str(attempts.folder), "fold 0", "cpu") for _ in range(2)]
    assert numbers == [1, 3], "a number already claimed is never claimed again"
    assert claim_attempt(str(attempts.folder), "fold 1", "cuda:0") == 1
    assert attempts.where("fold 1") == "node 10.0.0.7, cuda:0" and attempts.where("fold 9") == "an unknown node"
    with caplog.at_level(logging.INFO, logger="competition"), attempts.watched():
        pass
    said = caplog.text
    assert "fold 0: started on node 10.0.0.7, cpu (Ray worker process " in said
    assert "fold 0: retry 1 of 2 on node 10.0.0.8, cpu (Ray worker process 42)" in said
    assert "fold 0: retry 2 of 2 on node 10.0.0.7, cpu" in said and "attempt 2's worker died; resuming from" in said
    assert "fold 1: started on node 10.0.0.7, cuda:0" in said
    assert not attempts.folder.exists() and other.folder.is_dir()


def test_a_node_that_does_not_see_the_output_folder_is_told_so(tmp_path, monkeypatch):
    monkeypatch.setattr(cluster, "_node_address", lambda: "10.0.0.7")
    with pytest.raises(ClusterError, match="node 10.0.0.7 does not see .*: the output folder must be on storage"):
        claim_attempt(str(tmp_path / "elsewhere"), "fold 0", "cpu")


def test_an_output_folder_the_driver_cannot_write_is_one_line(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the run folder would be")
    with pytest.raises(ClusterError, match=f"cannot write to {blocked / 'run'}"):
        Attempts(blocked / "run", retries=2, retry_means="")


class TaskRaised(Exception):
    """Ray's error for a task that raised: the task's own exception is its cause."""

    def __init__(self, cause: BaseException):
        super().__init__(f"ray::fold0() (pid=1, ip=10.0.0.7)\n  File ...\n{cause}")
        self.cause = cause


def test_a_failed_task_is_one_line_naming_its_cause_or_its_tries():
    raised = cluster._failure(TaskRaised(OSError("disk full\nmore detail")), retries=2)
    assert raised == "its Ray task raised OSError: disk full", "Ray does not retry an exception"
    died = cluster._failure(Exception("The worker died unexpectedly.\nCheck the logs"), retries=2)
    assert died == "its Ray task failed 3 time(s): The worker died unexpectedly."


# On a local cluster --------------------------------------------------------------------------------------------------

ray_installed = pytest.mark.skipif(not cluster.ray_importable(), reason=NO_RAY)


@ray_installed
def test_an_address_where_nothing_listens_is_one_line_at_once():
    started = time.monotonic()
    with pytest.raises(ClusterError, match="--address 127.0.0.1:1: nothing answers there .*ray start --head --port 1"):
        cluster.connect("127.0.0.1:1")  # loopback: a port nothing listens on
    assert time.monotonic() - started < 10, "not Ray's own minutes of retries"


@ray_installed
def test_a_precision_of_no_name_is_one_line_before_the_cluster_is_joined(trained_run, data_dir, tmp_path, capsys):
    flags = ["--checkpoints", str(trained_run), "--data-dir", str(data_dir), "--out", str(tmp_path / "s.csv")]
    with pytest.raises(SystemExit) as exit_info:
        infer.main([*flags, "--backend", "ray", "--precision", "fp8"])
    said = capsys.readouterr()
    assert exit_info.value.code == 2 and "--precision 'fp8': choose one of auto, bf16, fp16, fp32" in said.err
    assert "Ray cluster" not in said.out


@pytest.fixture(scope="module")
def two_folds(data_dir, folds_csv, tmp_path_factory):
    """Folds 0 and 1 trained by --backend ray and by joblib's local workers, same seeds: the two run folders."""
    out = tmp_path_factory.mktemp("cluster")
    common = ["--data-dir", str(data_dir), "--folds-csv", str(folds_csv), "--folds", "0,1", *TRAIN_FLAGS]
    on_ray = run("train.py", *common, "--out", str(out / "ray"), "--backend", "ray")
    assert on_ray.returncode == 0, on_ray.stderr
    local = run("train.py", *common, "--out", str(out / "local"), "--jobs", "2")
    assert local.returncode == 0, local.stderr
    yield out / "ray", out / "local", on_ray
    shutil.rmtree(out, ignore_errors=True)  # 0.9 GB of checkpoints: kept no longer than this module needs them


@pytest.mark.slow
@ray_installed
def test_two_folds_on_ray_score_as_the_local_workers_do(two_folds):
    on_ray, local, finished = two_folds
    for fold in (0, 1):
        assert scores(on_ray, fold) == pytest.approx(scores(local, fold), rel=1e-5)
        assert (on_ray / f"fold{fold}" / "best.pt").is_file()
    said = finished.stdout
    assert "Ray cluster: 1 node(s), 2 CPU(s), 0 GPU(s)" in said
    for fold in (0, 1):
        assert f"fold {fold}: started on node " in said and f"fold {fold}: finished on node " in said
        assert f"fold {fold}: ok: best val Dice" in said
    assert not list(on_ray.glob(f"{cluster.ATTEMPTS_PREFIX}*")), "the attempts record is removed"


@pytest.mark.slow
@ray_installed
def test_a_fold_whose_worker_dies_is_retried_from_its_last_checkpoint(two_folds, data_dir, folds_csv, tmp_path):
    out = tmp_path / "run"
    flags = ["--data-dir", str(data_dir), "--folds-csv", str(folds_csv), "--folds", "0,1", *TRAIN_FLAGS]
    # Each fold's first attempt exits hard after its first epoch, as a lost machine would
    finished = run(
        "train.py", *flags, "--out", str(out), "--backend", "ray", env={"CARVANA_FAULT_EXIT_AFTER_EPOCHS": "1"}
    )
    assert finished.returncode == 0, finished.stderr
    for fold in (0, 1):
        assert f"fold {fold}: retry 1 of 2 on node " in finished.stderr
        assert "attempt 1's worker died; resuming from its last.pt" in finished.stderr
        log = (out / f"fold{fold}" / "train.log").read_text()
        assert "the process exits now, as if killed" in log and "resumed from " in log and "epoch 1 done" in log
        assert scores(out, fold) == pytest.approx(scores(two_folds[0], fold), rel=1e-5), "as if never interrupted"


@pytest.mark.slow
@ray_installed
def test_a_fold_that_fails_for_good_is_reported_with_its_log(data_dir, folds_csv, tmp_path):
    out = tmp_path / "run"
    flags = ["--data-dir", str(data_dir), "--folds-csv", str(folds_csv), "--folds", "0", *TRAIN_FLAGS]
    failed = run(
        "train.py", *flags, "--out", str(out), "--backend", "ray", "--retries", "0",
        env={"CARVANA_FAULT_EXIT_AFTER_EPOCHS": "1"},
    )  # fmt: skip
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert "fold 0: FAILED: its Ray task failed 1 time(s): " in failed.stderr
    assert f"(log: {out / 'fold0' / 'train.log'})" in failed.stderr
    resumed = run("train.py", *flags, "--out", str(out), "--backend", "ray", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert len(scores(out, 0)) == 2 * 3, "both epochs: three values each"


def predict_flags(checkpoints: Path, data_dir: Path) -> list[str]:
    return ["--tta", "--checkpoints", str(checkpoints), "--data-dir", str(data_dir), "--workers", "0"]


@pytest.fixture(scope="module")
def local_submission(two_folds, data_dir, tmp_path_factory) -> bytes:
    """The submission of the two folds trained on Ray, predicted on one device in one process."""
    out = tmp_path_factory.mktemp("local") / "submission.csv"
    local = run("infer.py", *predict_flags(two_folds[0], data_dir), "--out", str(out))
    assert local.returncode == 0, local.stderr
    return out.read_bytes()


@pytest.mark.slow
@ray_installed
def test_three_shards_on_ray_write_the_local_runs_file(two_folds, data_dir, local_submission, tmp_path):
    out = tmp_path / "submission.csv"
    finished = run(
        "infer.py", *predict_flags(two_folds[0], data_dir), "--out", str(out), "--backend", "ray", "--shards", "3"
    )
    assert finished.returncode == 0, finished.stderr
    assert "32 test images to predict (0 kept from an interrupted run) in 3 shard(s) on 3 x cpu" in finished.stdout
    for index in (1, 2, 3):
        assert f"shard {index} of 3: started on node " in finished.stdout
        assert f"shard {index} of 3: finished on node " in finished.stdout
    assert out.read_bytes() == local_submission
    assert sorted(path.name for path in tmp_path.iterdir()) == ["submission.csv"], "shards and attempts removed"


@pytest.mark.slow
@ray_installed
def test_a_failed_shard_on_ray_is_reported_and_resume_keeps_the_complete_ones(two_folds, data_copy, local_submission):
    out = data_copy.parent / "out" / "submission.csv"
    order = [line.split(",")[0] for line in (data_copy / "sample_submission.csv").read_text().splitlines()[1:]]
    victim = data_copy / "test" / order[25]  # shards of 32 images in batches of 4: 0-7, 8-19, 20-31; its 2nd batch
    payload = victim.read_bytes()
    victim.write_bytes(b"not a jpeg")
    flags = [*predict_flags(two_folds[0], data_copy), "--out", str(out), "--backend", "ray", "--shards", "3"]
    failed = run("infer.py", *flags)
    assert failed.returncode == 1 and not out.exists() and "Traceback" not in failed.stderr
    assert f"shard 3/3: FAILED: DataError: {victim}" in failed.stderr
    assert [path.name for path in shard_files(out)] == [
        "submission.csv.shard1of3",
        "submission.csv.shard2of3",
        "submission.csv.shard3of3.partial",
    ]
    victim.write_bytes(payload)
    resumed = run("infer.py", *flags, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "8 test images to predict (24 kept from an interrupted run)" in resumed.stdout
    assert out.read_bytes() == local_submission


@pytest.mark.slow
@ray_installed
def test_a_shard_whose_worker_is_killed_is_retried_and_keeps_its_rows(two_folds, data_dir, tmp_path):
    data = many_test_images(data_dir, tmp_path / "data", copies=12)  # 384 images: long enough to kill mid-way
    out = tmp_path / "out" / "submission.csv"
    flags = [*predict_flags(two_folds[0], data), "--batch-size", "2"]
    driver = subprocess.Popen(
        [sys.executable, str(ROOT / "infer.py"), *flags, "--out", str(out), "--backend", "ray", "--shards", "2"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    second = out.parent / "submission.csv.shard2of2.partial"
    try:
        deadline = time.monotonic() + 180
        while not (second.exists() and len(second.read_text().splitlines()) > 5):  # shard 2 has written rows
            assert driver.poll() is None and time.monotonic() < deadline, "shard 2 did not start"
            time.sleep(0.1)
        record = next(out.parent.glob(f"{cluster.ATTEMPTS_PREFIX}*/shard 2 of 2.1.json"))
        os.kill(json.loads(record.read_text())["pid"], signal.SIGKILL)  # as a lost machine would
        said, error = driver.communicate(timeout=300)
    finally:
        driver.kill()
    assert driver.returncode == 0, error
    assert "shard 2 of 2: retry 1 of 2 on node " in error and "keeping the rows its shard file holds" in error
    assert "shard 2 of 2: finished on node " in said and "384 rows" in said
    local = run("infer.py", *flags, "--out", str(tmp_path / "local.csv"))
    assert local.returncode == 0, local.stderr
    assert out.read_bytes() == (tmp_path / "local.csv").read_bytes()
