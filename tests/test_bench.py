"""The benchmarks that plan a Kaggle session and report a GPU, in their CPU modes."""

import math
import os
import subprocess
import sys

import pytest

from bench import gpu_report, kaggle_plan, rle_table_bench
from bench.kaggle_plan import Rates, Workload, plan

TINY = ["--size", "64x96", "--encoder", "resnet18", "--batch-size", "2", "--workers", "0", "--seconds", "0.5"]


def test_the_plan_is_the_arithmetic_of_its_rates():
    rates = Rates(train=40.0, loader=60.0, predict=10.0, predict_loader=100.0, validate=50.0)
    work = Workload(
        folds=5, epochs=30, train_images=5000, test_images=100_000, devices=2, session=43_200, weekly_gpu_hours=30
    )
    result = plan(rates, work)
    # Two folds at once share the loaders: 60 / 2 = 30 img/s each, below the device's 40.
    assert result["fold_rate"] == 30.0 and result["loader_bound"]
    assert result["epoch"] == pytest.approx(4000 / 30 + 1000 / 50)  # 153.3 s
    assert result["fold"] == pytest.approx(30 * 153.333, rel=1e-4)  # 4600 s
    assert result["training"] == pytest.approx(3 * 4600)  # 5 folds, 2 at a time: 3 rounds
    assert result["inference"] == pytest.approx(100_000 / 20)  # both devices predict, the loaders keep up
    assert result["folds_per_session"] == 9 * 2
    assert result["fits"] and result["total"] == pytest.approx(18_800)
    assert result["quota_hours"] == pytest.approx(18_800 / 3600)  # Kaggle meters the session's time


def test_one_device_bound_by_itself_and_a_plan_that_does_not_fit():
    rates = Rates(train=10.0, loader=100.0, predict=5.0, predict_loader=3.0, validate=20.0)
    work = Workload(
        folds=5, epochs=30, train_images=5000, test_images=100_000, devices=1, session=43_200, weekly_gpu_hours=30
    )
    result = plan(rates, work)
    assert result["fold_rate"] == 10.0 and not result["loader_bound"]
    assert result["training"] == pytest.approx(5 * 30 * (4000 / 10 + 1000 / 20))
    assert not result["fits"] and result["folds_per_session"] == math.floor(43_200 / (30 * 450))
    assert result["inference"] == pytest.approx(100_000 / 3)  # bound by the test images' decoding, not the device


def test_the_plan_runs_on_the_cpu(data_dir, tmp_path, capsys):
    out = tmp_path / "plan.md"
    kaggle_plan.main(["--config", "configs/kaggle_full.toml", "--data-dir", str(data_dir), "--out", str(out), *TINY])
    printed = capsys.readouterr().out
    assert printed == out.read_text()
    assert "Plan for `configs/kaggle_full.toml` on CPU" in printed and "batch 2x2" in printed
    for row in (
        "one epoch",
        "one fold (30 epochs)",
        "5 folds, 1 at a time",
        "test inference, 100,064 images",
        "fits one 12h00m session",
    ):
        assert f"| {row}" in printed


def test_the_gpu_report_needs_a_gpu_or_the_smoke_mode(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bench.gpu_report", "--out", str(tmp_path / "gpu.md")],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},  # no GPU, also where there is one
    )
    assert result.returncode == 2 and "--smoke" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "gpu.md").exists()


@pytest.mark.slow
def test_the_gpu_report_smoke_mode_runs_every_benchmark(data_dir, tmp_path):
    out = tmp_path / "gpu.md"
    gpu_report.main(["--smoke", "--data-dir", str(data_dir), "--out", str(out)])
    report = out.read_text()
    assert "FAILED" not in report
    for title, module, _, _ in gpu_report.BENCHES:
        assert f"## {title}" in report and f"python -m {module}" in report
    assert "trainer fp16 + channels_last" in report, "the T4's fp16 path is measured"
    assert "| fits one 12h00m session |" in report, "the plan's table is quoted as Markdown"


def test_the_rle_table_bench_checks_both_decoders_and_prints_the_ratio(capsys):
    rle_table_bench.main(["--rows", "40", "--size", "32x48"])  # the two decoders' masks compared first
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("40 rows (10 images of 48x32, 4 classes, column-major;")
    assert printed[1].split() == ["numpy", "s", "numba", "s", "speed-up"]
    name, baseline, ours, ratio = printed[2].split()
    assert name == "decode" and float(baseline) > 0 and float(ours) > 0 and float(ratio.removesuffix("x")) > 0
