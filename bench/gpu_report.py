"""The GPU report: every benchmark's GPU variant in one run, their tables written to one Markdown file.

    make bench-gpu                                           # = python -m bench.gpu_report --out bench/results/gpu.md
    python -m bench.gpu_report --smoke --out /tmp/smoke.md   # the same benchmarks at tiny sizes, on any machine

Training step (this trainer against a plain fp32 loop, then the T4's fp16 + GradScaler path), inference
(end to end against model only), training memory (measured against counted) and the Kaggle session
plan, each run as its own process so that one benchmark's compiled graphs and cached memory do not
touch the next. Without --data-dir holding a data set, a synthetic one is made first. Sized to take
under 9 minutes on one H100 (not yet measured: no GPU was lent to the sessions that wrote it).
"""

import argparse
import logging
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.device import describe
from competition.environment import resolve_device
from competition.errors import DeviceError
from competition.files import atomic_output
from competition.logs import configure, exit_on_project_error
from competition.synthetic import generate
from competition.workers import die_with_parent

logger = logging.getLogger("bench.gpu_report")

# (title, module, flags on a GPU, flags of the smoke mode); "{data}" is the data folder.
TINY = ["--encoder", "resnet18", "--workers", "0", "--data-dir", "{data}"]
BENCHES = [
    (
        "Training step: this trainer against the plain fp32 loop",
        "bench.train_bench",
        ["--size", "1024x1024", "--batch-size", "8", "--data-dir", "{data}"],
        ["--size", "64x96", "--batch-size", "2", "--steps", "2", "--warmup", "1", "--no-compile", *TINY],
    ),
    (
        "Training step in fp16 + GradScaler (the T4's path)",
        "bench.train_bench",
        ["--size", "1024x1024", "--batch-size", "8", "--precision", "fp16", "--data-dir", "{data}"],
        ["--size", "64x96", "--batch-size", "2", "--steps", "2", "--warmup", "1", "--precision", "fp16", *TINY],
    ),
    (
        "Inference: end to end against model only",
        "bench.infer_bench",
        ["--size", "full", "--batch-size", "8", "--compile", "--data-dir", "{data}"],
        ["--size", "64x96", "--batch-size", "2", "--steps", "2", *TINY],
    ),
    (
        "Training memory: measured against counted",
        "bench.memory_bench",
        ["--size", "1024x1536", "--batch-sizes", "2,4,8"],
        ["--size", "64x96", "--batch-sizes", "1,2", "--encoder", "resnet18", "--precision", "fp32"],
    ),
    (
        "Kaggle session plan for configs/kaggle_full.toml",
        "bench.kaggle_plan",
        ["--config", "configs/kaggle_full.toml", "--data-dir", "{data}"],
        ["--config", "configs/kaggle_full.toml", "--size", "64x96", "--batch-size", "2", "--seconds", "1", *TINY],
    ),
]


def data_folder(requested: Path | None, smoke: bool, scratch: Path) -> Path:
    """``requested`` when it holds a data set; else a synthetic one made in ``scratch`` (full size on a GPU)."""
    if requested is not None and (requested / "train").exists():
        return requested
    size = {"width": 192, "height": 128, "cars": 2, "test_cars": 1} if smoke else {"cars": 8, "test_cars": 4}
    logger.info("making a synthetic data set in %s (%s)", scratch, ", ".join(f"{k} {v}" for k, v in size.items()))
    return generate(scratch / "data", seed=0, **size)


def run_bench(title: str, module: str, flags: list[str], data: Path) -> str:
    """One benchmark in its own process (killed with this one); its output as a Markdown section."""
    command = [sys.executable, "-m", module, *(flag.replace("{data}", str(data)) for flag in flags)]
    logger.info("%s: %s", title, " ".join(command[1:]))
    started = time.perf_counter()
    result = subprocess.run(command, check=False, capture_output=True, text=True, preexec_fn=die_with_parent)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        logger.error("%s failed (exit %d):\n%s", module, result.returncode, result.stderr[-3000:])
        last_line = (result.stderr.strip().splitlines() or ["no message"])[-1]
        body = f"FAILED (exit {result.returncode}): {last_line}"
    else:
        body = result.stdout.strip().replace(str(data), "<data>")
    shown = " ".join(["python", *command[1:]]).replace(str(data), "<data>")
    table = body if module == "bench.kaggle_plan" and result.returncode == 0 else f"```\n{body}\n```"
    return f"## {title}\n\n`{shown}` ({seconds:.0f} s)\n\n{table}\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu.md"), help="(default: %(default)s)")
    parser.add_argument("--data-dir", type=Path, help="a data set to measure on (default: a synthetic one)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, on whatever device there is (CI)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    configure()
    with exit_on_project_error("bench.gpu_report", debug=False):
        device = resolve_device()
        if device.type != "cuda" and not args.smoke:
            raise DeviceError("bench.gpu_report: no GPU here; --smoke runs the same benchmarks at tiny sizes")
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="gpu-report-") as scratch:
            data = data_folder(args.data_dir, args.smoke, Path(scratch))
            sections = [
                run_bench(title, module, smoke if args.smoke else gpu, data) for title, module, gpu, smoke in BENCHES
            ]
        mode = "smoke mode, tiny sizes" if args.smoke else "GPU sizes"
        header = (
            f"# Benchmarks on {describe(device)} ({mode})\n\n"
            f"PyTorch {torch.__version__}, Python {platform.python_version()}; "
            f"`python -m bench.gpu_report{' --smoke' if args.smoke else ''}` took "
            f"{(time.perf_counter() - started) / 60:.1f} min.\n"
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(args.out) as partial:
            partial.write_text("\n".join([header, *sections]))
        logger.info("wrote %s", args.out)
        if any("FAILED (exit" in section for section in sections):
            sys.exit(1)


if __name__ == "__main__":
    main()
