"""What the benchmarks share: waiting for the device, and naming it in the printed table."""

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that host clocks time what ran."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"
