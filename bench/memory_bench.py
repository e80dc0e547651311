"""Training memory: the measured peak of real training steps beside competition.memory's count, in one run.

    python -m bench.memory_bench --size 1024x1536 --batch-sizes 2,4,8              # on a GPU
    python -m bench.memory_bench --size 512x768 --batch-sizes 1,2 --precision fp32 # CPU variant

On a GPU the peak is torch.cuda.max_memory_allocated over a step (the CUDA context and the
allocator's cached slack come on top: nvidia-smi shows both). On a CPU it is the peak of live tensor
bytes in the profiler's memory timeline. Each peak is taken on the second step, when AdamW's
moments exist, with the trainer's own step (uint8 input, channels_last, autocast, float32 loss).
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action

from bench.device import describe
from bench.train_bench import trainer_step_factory
from competition.config import TrainConfig, parse_size
from competition.memory import GIB, estimate_training_memory
from competition.prediction import model_input, setup_device


def cpu_peak_bytes(step) -> int:
    """Peak bytes of live CPU tensors while ``step`` runs, those alive before it included.

    Why private APIs (``prof._memory_profile()``, ``torch.profiler._memory_profiler.Action``): PyTorch's
    public profiler exports this timeline only as an HTML plot; the CPU has no max_memory_allocated.
    Used by this benchmark alone; a PyTorch upgrade that moves them breaks the CPU variant here, loudly.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    live = peak = 0
    for _, action, _, nbytes in prof._memory_profile().timeline:
        if action in (Action.PREEXISTING, Action.CREATE):
            live += nbytes
        elif action == Action.DESTROY:
            live -= nbytes
        peak = max(peak, live)
    return peak


def measured_peak_bytes(config: TrainConfig, batch_size: int, precision: str, device: torch.device) -> int:
    height, width = config.input_size()
    step = trainer_step_factory(config, device, precision)
    images = torch.randint(0, 256, (batch_size, 3, height, width), dtype=torch.uint8, device=device)
    images = model_input(images, config.channels_last)
    masks = (torch.rand(batch_size, 1, height, width, device=device) > 0.5).float()
    step(images, masks)
    if device.type != "cuda":
        return cpu_peak_bytes(lambda: step(images, masks))
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step(images, masks)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1024x1536")
    parser.add_argument("--batch-sizes", default="2,4,8")
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--arch", default="Unet")
    parser.add_argument(
        "--precision", default="auto", help="auto (bf16/fp16 on a GPU, fp32 on a CPU), bf16, fp16, fp32"
    )
    args = parser.parse_args()
    parse_size(args.size)
    device, precision = setup_device(None, args.precision)
    config = TrainConfig(arch=args.arch, encoder=args.encoder, size=args.size, encoder_weights="none")
    estimate = estimate_training_memory(config, precision)
    print(f"{describe(device)}: {args.arch}-{args.encoder} at {args.size}, {precision}, AdamW, one step")
    print(f"{'batch':>6}{'counted GiB':>13}{'measured GiB':>14}{'measured/counted':>18}")
    for batch_size in (int(batch) for batch in args.batch_sizes.split(",")):
        torch.manual_seed(0)
        counted = estimate.total_bytes(batch_size)
        try:
            measured = measured_peak_bytes(config, batch_size, precision, device)
        except torch.OutOfMemoryError:
            print(f"{batch_size:6}{counted / GIB:13.2f}{'out of memory':>14}")
            torch.cuda.empty_cache()
            continue
        print(f"{batch_size:6}{counted / GIB:13.2f}{measured / GIB:14.2f}{measured / counted:17.2f}x")
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
