"""Inference speed: infer.py's pipeline (JPEG files to CSV rows) against the model-only forward rate, in one run.

    python -m bench.infer_bench --size full --batch-size 8 --tta hflip --compile      # on a GPU, 1280x1918
    python -m bench.infer_bench --size 256x384 --batch-size 4 --workers 2             # CPU variant

Both at the same batch size, TTA and precision, with a randomly initialised model saved as a
checkpoint and loaded back as infer.py does. End to end = decoding, resizing, the forward
passes, upsampling, thresholding, RLE and writing, over the test images of --data-dir.
"""

import tempfile
import time
from pathlib import Path

import torch

from bench.device import describe, speed_bench_parser, synchronize
from bench.kaggle_plan import CARVANA_TEST_IMAGES
from competition.carvana import CarvanaData
from competition.checkpoints import save_checkpoint, summary
from competition.clock import format_duration
from competition.config import TrainConfig
from competition.inference import Ensemble, load_member, write_submission
from competition.models import build_model
from competition.prediction import setup_device


def main() -> None:
    parser = speed_bench_parser(__doc__, "full", steps=20, size_help="HEIGHTxWIDTH the model sees, or full")
    parser.add_argument("--tta", default="hflip", help="comma-separated TTA views, or empty")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    device, precision = setup_device(None, "auto")
    tta = tuple(name for name in args.tta.split(",") if name)
    data = CarvanaData(args.data_dir)
    shape = data.image_shape(data.test_ids()[0], "test")
    config = TrainConfig(encoder=args.encoder, size=args.size, encoder_weights="none")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "best.pt"
        save_checkpoint(
            {"model": build_model(config.arch, config.encoder).state_dict(), **summary(config, 0, 0.0, shape)}, path
        )
        member = load_member(path, device, compile=args.compile)
        ensemble = Ensemble([member], tta, precision)
        size = config.input_size() or shape
        images = {member.size_key: torch.randint(0, 256, (args.batch_size, 3, *size), dtype=torch.uint8, device=device)}
        for _ in range(3):
            ensemble.probabilities(images, shape)
        synchronize(device)
        started = time.perf_counter()
        for _ in range(args.steps):
            (ensemble.probabilities(images, shape) > 0.5).to(torch.uint8)
        synchronize(device)
        model_only = args.steps * args.batch_size / (time.perf_counter() - started)
        started = time.perf_counter()
        rows = write_submission(
            ensemble,
            data,
            Path(folder) / "submission.csv",
            batch_size=args.batch_size,
            workers=args.workers,
            progress=False,
        )
        end_to_end = len(rows) / (time.perf_counter() - started)
    name = describe(device)
    print(
        f"{name}: Unet-{args.encoder}, input {size[0]}x{size[1]} -> {shape[0]}x{shape[1]}, batch {args.batch_size}, "
        f"TTA {'+'.join(tta) or 'off'}, {precision}{' + compile' if args.compile else ''}"
    )
    print(f"model only  {model_only:8.1f} img/s")
    print(f"end to end  {end_to_end:8.1f} img/s over {len(rows)} test images ({args.workers} workers)")
    print(f"end to end / model only: {end_to_end / model_only:.2f}")
    print(
        f"Carvana's {CARVANA_TEST_IMAGES:,} test images end to end at this rate: "
        f"{format_duration(CARVANA_TEST_IMAGES / end_to_end)} (one model)"
    )


if __name__ == "__main__":
    main()
