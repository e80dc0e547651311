"""Slides larger than memory: peak memory of sliding-window prediction per slide size, and the cost of one window.

    python -m bench.slides_bench --sizes 4096,16384,32768 --tile 1024 --tile-overlap 0.25 --work /tmp/slides-bench

For each size a synthetic slide (python -m competition.synthetic --slides) is written, then predicted through
competition.sliding_window with a per-pixel model (a glomerulus is purple: the probability is a logistic of the
green channel, ``sigmoid((120 - G) / 6)``, no torch), the mask written band by band as .npy. Each step runs in a
fresh process, so no size inherits another's memory: the prediction's peak RSS is the kernel's (getrusage) as it
ends, before the mask is scored against the slide's truth (Dice, so a blending fault would show); writing's and
reading's are read as their process ends (os.wait4). Then the real ``infer.py --tile`` predicts the slide in a fresh
process (``child_infer``: a checkpoint built as the tests build one, its model swapped for the same per-pixel model
in torch), writing column-major RLE rows encoded band by band, its peak RSS against the imports'. Then one window (--window a side) is read from the largest
slide, against what the whole image would take; and on the smallest, seams: see ``child_seams``.
"""

import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from competition.errors import ConfigError
from competition.files import format_bytes
from competition.logs import OneLineParser, exit_on_project_error
from competition.sliding_window import check_tiling, window_starts

SEAM_REACH = 32  # pixels from a window's edge where seams are scored
# Disk a size needs: the TIFF (deflate: well under its raw RGB), the float16 accumulator, the uint8 mask.
DISK_PER_PIXEL = 3 * 0.5 + 2 + 1


def purple(windows: np.ndarray) -> np.ndarray:
    """(N, 1, h, w) float32 probabilities of the synthetic glomeruli, from each pixel's green channel alone."""
    green = windows[..., 1].astype(np.float32)
    return (1 / (1 + np.exp((green - 120) / 6)))[:, None]


def blurred_purple(windows: np.ndarray) -> np.ndarray:
    """A model with context, as a network's zero padding gives it one: each pixel sees the mean of the 15 x 15
    around it, zeros past the window's edge; so its windows disagree near their edges (seams)."""
    import cv2

    blurred = np.stack([cv2.blur(window, (15, 15), borderType=cv2.BORDER_CONSTANT) for window in windows])
    return purple(blurred)


def seam_zone(size: int, tile: int, stride: int, reach: int = SEAM_REACH) -> np.ndarray:
    """bool (size,): positions along a side within ``reach`` of a window's edge inside the slide."""
    near = np.zeros(size, bool)
    for start in window_starts(size, tile, stride):
        for edge in (start, start + tile):
            if 0 < edge < size:
                near[max(0, edge - reach) : edge + reach] = True
    return near


def child_seams(size: int, work: Path, tile: int, overlap: float) -> dict:
    from competition import synthetic
    from competition.slides import open_slide
    from competition.sliding_window import check_tiling, predict_mask

    slide, plan = open_slide(work / f"slide-{size}.tiff", work / "cache"), synthetic.plan_slide(size, seed=size)
    truth = synthetic.slide_mask_window(plan, 0, 0, size, size).astype(bool)
    whole = blurred_purple(slide.read(0, 0, size, size)[None])[0, 0] > 0.5  # the same model with no windows
    rows = {}
    for weighting, share in (("uniform", 0.0), ("uniform", overlap), ("ramp", overlap), ("gaussian", overlap)):
        bands: list[np.ndarray] = []
        predict_mask(
            slide, blurred_purple, lambda top, band, bands=bands: bands.append(band), tile, share, weighting=weighting
        )
        mask, stride = np.concatenate(bands).astype(bool), check_tiling(tile, share)
        line = seam_zone(size, tile, stride)
        zone = line[:, None] | line[None, :]
        rows[f"{weighting}, overlap {share}"] = (dice(mask[zone], truth[zone]), dice(mask[zone], whole[zone]))
    return rows


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    return 2 * float((predicted & truth).sum()) / max(float(predicted.sum() + truth.sum()), 1.0)


def run_child(args: list[str]) -> tuple[dict, int]:
    """Runs ``python -m bench.slides_bench --child ...`` and returns (its JSON result, its peak RSS in bytes)."""
    process = subprocess.Popen([sys.executable, "-m", "bench.slides_bench", "--child", *args], stdout=subprocess.PIPE)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"slides_bench: the child {' '.join(args)} failed (exit code {process.returncode})")
    print(f"slides_bench: {' '.join(args[:2])}: {output.decode().strip()}", file=sys.stderr)  # kept if cut short
    return json.loads(output), usage.ru_maxrss * 1024  # Linux counts kilobytes


def child_write(size: int, work: Path) -> dict:
    from competition import synthetic

    started = time.perf_counter()
    plan = synthetic.plan_slide(size, seed=size)
    synthetic.write_slide(plan, work / f"slide-{size}.tiff")
    return {"seconds": time.perf_counter() - started, "bytes": (work / f"slide-{size}.tiff").stat().st_size}


def child_predict(size: int, work: Path, tile: int, overlap: float, weighting: str) -> dict:
    from competition import synthetic
    from competition.slides import open_slide
    from competition.sliding_window import npy_mask_writer, predict_mask

    slide = open_slide(work / f"slide-{size}.tiff", work / "cache")
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the interpreter and its imports
    started = time.perf_counter()
    with npy_mask_writer(work / f"mask-{size}.npy", size, size) as write:
        windows = predict_mask(slide, purple, write, tile, overlap, weighting=weighting, work_dir=work)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the prediction's peak, before the scoring
    plan, overlap_pixels, total = synthetic.plan_slide(size, seed=size), 0, 0
    with open(work / f"mask-{size}.npy", "rb") as file:  # read, not mapped: mapped pages would count as RSS
        np.lib.format.read_magic(file)
        np.lib.format.read_array_header_1_0(file)
        for top in range(0, size, 1024):  # Dice band by band: the truth is drawn from the discs, never whole
            rows = min(1024, size - top)
            truth = synthetic.slide_mask_window(plan, top, 0, rows, size)
            predicted = np.fromfile(file, np.uint8, rows * size).reshape(rows, size)
            overlap_pixels += int((truth & predicted).sum())
            total += int(truth.sum()) + int(predicted.sum())
    return {
        "windows": windows,
        "seconds": seconds,
        "dice": 2 * overlap_pixels / max(total, 1),
        "baseline": baseline,
        "peak": peak,
    }


def torch_purple():
    """``purple`` as a torch model for infer.py: the logit ``(120 - G) / 6`` of each pixel's raw green value."""
    import torch

    class Purple(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 1, 1)  # a parameter: the ensemble finds its device by it
            with torch.no_grad():
                self.conv.weight.copy_(torch.tensor([0.0, -1 / 6, 0.0]).view(1, 3, 1, 1))
                self.conv.bias.fill_(20.0)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.conv(images.float())

    return Purple()


def slide_run(size: int, work: Path, tile: int, overlap: float) -> tuple[Path, Path]:
    """(a data folder whose test/ holds the slide of ``size`` (linked, HuBMAP's layout: an RLE table, column-major),
    a run folder of one full-resolution checkpoint for --tile, built as the tests build one: untrained, no
    training)."""
    from competition.checkpoints import save_checkpoint, summary
    from competition.config import TrainConfig
    from competition.models import build_model

    data, run = work / f"data-{size}", work / f"run-{size}"
    shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(run, ignore_errors=True)
    (data / "test").mkdir(parents=True)
    (data / "train").mkdir()  # the layout's training folder: nothing is trained here
    os.link(work / f"slide-{size}.tiff", data / "test" / "slide.tiff")
    (data / "train.csv").write_text("id,encoding\n")
    config = TrainConfig(
        data_dir=str(data), out=str(run), encoder="resnet18", encoder_weights="none", size="full",
        masks_csv="train.csv", rle_columns="id,encoding", rle_order="column", tile=tile, tile_overlap=overlap,
    )  # fmt: skip
    model = build_model(config.arch, config.encoder, "none", classes=config.output_channels())
    (run / "fold0").mkdir(parents=True)
    save_checkpoint({"model": model.state_dict(), **summary(config, 1, 0.0, (size, size))}, run / "fold0" / "best.pt")
    return data, run


def child_infer(size: int, work: Path, tile: int, overlap: float, weighting: str) -> dict:
    """``infer.py --tile`` on the slide, its model swapped for ``torch_purple``: the prediction stream, the writer
    (column-major RLE rows, encoded band by band) and their checks, as a user runs them."""
    import dataclasses

    import infer

    data, run = work / f"data-{size}", work / f"run-{size}"  # slide_run's, made by the parent
    load_member = infer.load_member

    def purple_member(path, device, compile=False):
        model = torch_purple().to(device)
        return dataclasses.replace(load_member(path, device, compile), model=model, forward=model)

    infer.load_member = purple_member
    os.environ["CARVANA_WORK_DIR"] = str(work)  # the accumulator's slide_cache
    out = work / f"infer-{size}.csv"
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the interpreter and infer.py's imports
    started = time.perf_counter()
    flags = ["--tile", str(tile), "--tile-overlap", str(overlap), "--tile-weighting", weighting, "--batch-size", "4"]
    with contextlib.redirect_stdout(sys.stderr):  # its log lines; this process's output is the JSON result
        infer.main([
            "--checkpoints", str(run), "--data-dir", str(data), "--workers", "0", "--out", str(out), "--overwrite",
            "--format", "rle-csv", "--rle-order", "column", *flags,
        ])  # fmt: skip
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rle = out.read_text().splitlines()[1].split(",", 1)[1]
    area = sum(int(length) for length in rle.split()[1::2]) / (size * size)
    return {"seconds": seconds, "baseline": baseline, "peak": peak, "area": area, "rle_bytes": len(rle)}


def child_read(size: int, work: Path, side: int) -> dict:
    from competition.slides import open_slide

    slide = open_slide(work / f"slide-{size}.tiff", work / "cache")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    window = slide.read(size // 2 - side // 2, size // 2 - side // 2, side, side)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "rss_before": before, "rss_after": after, "window_bytes": window.nbytes}


def child(argv: list[str]) -> None:
    step, size, work, *rest = argv
    size, work = int(size), Path(work)
    if step == "write":
        result = child_write(size, work)
    elif step == "predict":
        result = child_predict(size, work, int(rest[0]), float(rest[1]), rest[2])
    elif step == "setup":  # in a child: torch in this process would count in every later child's peak (fork)
        result = [str(path) for path in slide_run(size, work, int(rest[0]), float(rest[1]))]
    elif step == "infer":
        result = child_infer(size, work, int(rest[0]), float(rest[1]), rest[2])
    elif step == "seams":
        result = child_seams(size, work, int(rest[0]), float(rest[1]))
    else:
        result = child_read(size, work, int(rest[0]))
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1:])
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="4096,16384,32768", help="slide sides in pixels (default: 4k, 16k, 32k)")
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--tile-overlap", type=float, default=0.25)
    parser.add_argument("--tile-weighting", default="gaussian")
    parser.add_argument("--window", type=int, default=1024, help="side of the window read alone (default: 1024)")
    parser.add_argument("--work", default="slides_bench", help="folder of the slides, masks, accumulators")
    parser.add_argument("--keep", action="store_true", help="keep the slides and masks (default: remove them)")
    args = parser.parse_args(argv)
    with exit_on_project_error(parser.prog):
        check_tiling(args.tile, args.tile_overlap)
        try:
            sizes = [int(size) for size in args.sizes.split(",")]
        except ValueError:
            raise ConfigError(
                f"--sizes {args.sizes!r}: give sides in pixels separated by commas, e.g. 4096,16384"
            ) from None
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        measured = [size for size in sizes if fits(size, work)]
        inferred: dict[int, dict] = {}
        print(
            "| slide | windows | windows/s | peak RSS (at start) | mask | RSS / mask | Dice | write: s, peak RSS, TIFF |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for size in measured:
            written, write_rss = run_child(["write", str(size), str(work)])
            stride = (str(args.tile), str(args.tile_overlap), args.tile_weighting)
            predicted, _ = run_child(["predict", str(size), str(work), *stride])
            rss = predicted["peak"]
            mask_bytes = size * size
            print(
                f"| {size}x{size} | {predicted['windows']} | {predicted['windows'] / predicted['seconds']:.1f} | "
                f"{format_bytes(rss)} ({format_bytes(predicted['baseline'])}) | {format_bytes(mask_bytes)} | {rss / mask_bytes:.2f} | {predicted['dice']:.4f} | "
                f"{written['seconds']:.0f} s, {format_bytes(write_rss)}, {format_bytes(written['bytes'])} |"
            )
            run_child(["setup", str(size), str(work), str(args.tile), str(args.tile_overlap)])
            inferred[size], _ = run_child(["infer", str(size), str(work), *stride])
            if size == measured[0]:
                seams, _ = run_child(["seams", str(size), str(work), str(args.tile), str(args.tile_overlap)])
            if size != measured[-1] and not args.keep:
                remove_size(work, size)
        if measured:
            print_infer(inferred, args.tile, args.tile_overlap)
            print(f"\nseams on the {measured[0]}x{measured[0]} slide, a model with context (blurred_purple):")
            print(
                f"| windows | within {SEAM_REACH} px of window edges: Dice with the truth | Dice with the model "
                "on the whole slide at once |\n| --- | --- | --- |"
            )
            for name, (truth, whole) in seams.items():
                print(f"| {name} | {truth:.4f} | {whole:.4f} |")
            largest = measured[-1]
            read, rss = run_child(["read", str(largest), str(work), str(args.window)])
            image_bytes = largest * largest * 3
            print(
                f"\none {args.window}x{args.window} window of the {largest}x{largest} tiled TIFF "
                f"({format_bytes(image_bytes)} as RGB): {read['seconds'] * 1000:.0f} ms, "
                f"RSS {format_bytes(read['rss_before'])} -> {format_bytes(read['rss_after'])} "
                f"(+{format_bytes(read['rss_after'] - read['rss_before'])} for a window of "
                f"{format_bytes(read['window_bytes'])}); peak of that process {format_bytes(rss)}"
            )
            if not args.keep:
                remove_size(work, largest)


def print_infer(inferred: dict[int, dict], tile: int, overlap: float) -> None:
    """The table of ``infer.py --tile`` (``child_infer``) on each slide."""
    print(
        f"\ninfer.py --tile {tile} --tile-overlap {overlap} --format rle-csv --rle-order column (per-pixel torch "
        "model; each mask's RLE encoded band by band, never whole):"
    )
    print(
        "| slide | s | windows/s | peak RSS (after imports) | growth over imports | mask | growth / mask | mask area "
        "| RLE |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    stride = check_tiling(tile, overlap)
    for size, result in inferred.items():
        growth, mask_bytes = result["peak"] - result["baseline"], size * size
        windows = len(window_starts(size, tile, stride)) ** 2
        print(
            f"| {size}x{size} | {result['seconds']:.0f} | {windows / result['seconds']:.1f} | "
            f"{format_bytes(result['peak'])} "
            f"({format_bytes(result['baseline'])}) | {format_bytes(growth)} | {format_bytes(mask_bytes)} | "
            f"{growth / mask_bytes:.2f} | {100 * result['area']:.2f}% | {format_bytes(result['rle_bytes'])} |"
        )


def fits(size: int, work: Path) -> bool:
    needed, free = size * size * DISK_PER_PIXEL, shutil.disk_usage(work).free
    if needed > free * 0.9:
        print(
            f"{size}x{size}: left out, it needs about {format_bytes(needed)} of disk and {work} has {format_bytes(free)}"
        )
        return False
    return True


def remove_size(work: Path, size: int) -> None:
    for name in (f"slide-{size}.tiff", f"mask-{size}.npy", f"infer-{size}.csv"):
        (work / name).unlink(missing_ok=True)
    for folder in (f"data-{size}", f"run-{size}"):
        shutil.rmtree(work / folder, ignore_errors=True)


if __name__ == "__main__":
    main()
