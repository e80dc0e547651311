"""Training speed: this trainer's step against a plain fp32 eager loop as tutorials write it, in one run.

    python -m bench.train_bench --size 1024x1024 --batch-size 8 --encoder resnet34      # on a GPU
    python -m bench.train_bench --size 256x384 --batch-size 4 --steps 6 --data-dir input # CPU variant

Same model, same batch. "model only" feeds tensors already on the device; "end to end" reads
JPEG files from --data-dir through decoding, resizing and augmentation in a DataLoader.
"""

import time

import segmentation_models_pytorch as smp
import torch

from bench.device import describe, speed_bench_parser, synchronize
from competition.carvana import CarvanaData
from competition.config import TrainConfig, parse_size
from competition.data import SegmentationDataset
from competition.environment import resolve_device
from competition.fold_data import train_transform
from competition.losses import build_loss
from competition.models import IMAGENET_MEAN, IMAGENET_STD, build_model
from competition.prediction import model_input, prepare_model, resolve_precision, tune_for
from competition.training import accumulate_gradients, optimizer_step


def timed(step, batches, warmup: int, device: torch.device) -> float:
    """Images per second over the batches after ``warmup`` steps."""
    iterator = iter(batches)
    for _ in range(warmup):
        step(*next(iterator))
    synchronize(device)
    started, images = time.perf_counter(), 0
    for batch in iterator:
        step(*batch)
        images += len(batch[0])
    synchronize(device)
    return images / (time.perf_counter() - started)


def plain_step_factory(encoder: str, device: torch.device):
    """The loop of the public tutorials: float32 normalised NCHW input, eager, fp32."""
    model = smp.Unet(encoder, encoder_weights=None, classes=1).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = build_loss("bce_dice")
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255

    def step(images, masks):
        images = (images.to(device).float() - mean) / std
        optimizer.zero_grad()
        loss = loss_fn(model(images), masks.to(device))
        loss.backward()
        optimizer.step()

    return step


def trainer_step_factory(config: TrainConfig, device: torch.device, precision: str):
    """The trainer's own step: uint8 input normalised on the device, channels_last, autocast, compile."""
    model, forward = prepare_model(
        build_model(config.arch, config.encoder), device, config.channels_last, config.compile
    )
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    loss_fn = build_loss("bce_dice")

    def step(images, masks):
        images = model_input(images.to(device, non_blocking=True), config.channels_last)
        accumulate_gradients(forward, loss_fn, [(images, masks.to(device, non_blocking=True))], precision, scaler)
        optimizer_step(model, optimizer, scaler, config.clip_grad)

    return step


def main() -> None:
    parser = speed_bench_parser(__doc__, "1024x1024", steps=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument(
        "--precision", default="auto", help="of the trainer: auto (bf16/fp16 by the GPU), bf16, fp16, fp32"
    )
    args = parser.parse_args()
    # Not setup_device: cuDNN autotuning is switched on only after the plain loop, which tutorials run without it.
    device = resolve_device()
    height, width = parse_size(args.size)
    precision = resolve_precision(args.precision, device)
    config = TrainConfig(encoder=args.encoder, size=args.size, compile=device.type == "cuda" and not args.no_compile)
    torch.manual_seed(0)
    steps = args.warmup + args.steps
    images = torch.randint(0, 256, (args.batch_size, 3, height, width), dtype=torch.uint8, device=device)
    masks = (torch.rand(args.batch_size, 1, height, width, device=device) > 0.5).float()
    resident = [(images, masks)] * steps
    rows = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rows.append(
        ("plain fp32 eager, model only", timed(plain_step_factory(args.encoder, device), resident, args.warmup, device))
    )
    plain_memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    tune_for(device)  # what train.py sets; after the plain loop, which tutorials run without it
    trainer = trainer_step_factory(config, device, precision)
    label = f"trainer {precision}{' + channels_last' if config.channels_last else ''}{' + compile' if config.compile else ''}"
    rows.append((f"{label}, model only", timed(trainer, resident, args.warmup, device)))
    trainer_memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    data = CarvanaData(args.data_dir)
    dataset = SegmentationDataset(data, data.train_ids(), size=(height, width), transform=train_transform(config))
    loader = torch.utils.data.DataLoader(
        dataset,
        args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0,
        prefetch_factor=4 if args.workers else None,
    )
    batches = (batch for _ in range(1000) for batch in loader)  # loaded as they are consumed, inside the timing
    rows.append(
        (
            f"{label}, end to end ({args.workers} workers)",
            timed(trainer, (next(batches) for _ in range(steps)), args.warmup, device),
        )
    )
    name = describe(device)
    print(f"{name}: Unet-{args.encoder}, batch {args.batch_size} at {height}x{width}, {args.steps} timed steps")
    print(f"{'':58}{'img/s':>8}{'vs plain':>10}")
    for label_text, rate in rows:
        print(f"{label_text:58}{rate:8.1f}{rate / rows[0][1]:9.2f}x")
    print(f"end to end / model only: {rows[2][1] / rows[1][1]:.2f}")
    if device.type == "cuda":
        print(f"peak memory: plain {plain_memory:.1f} GiB, trainer {trainer_memory:.1f} GiB")


if __name__ == "__main__":
    main()
