"""What the benchmarks share: their common flags, waiting for the device, and naming it in the printed table."""

import argparse

import torch


def speed_bench_parser(doc: str, size: str, steps: int, size_help: str = "HEIGHTxWIDTH") -> argparse.ArgumentParser:
    """The flags of the training and inference speed benchmarks; each adds its own."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--size", default=size, help=size_help)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--data-dir", default="input")
    return parser


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that host clocks time what ran."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"
