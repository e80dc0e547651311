"""Serving under load: python -m competition.serve with the PyTorch backend and with its ONNX export, side by side.

    python -m bench.serve_bench                                   # the CPU demo's model (resnet18 at 160x224)
    python -m bench.serve_bench --checkpoints runs/demo --concurrency 1,8,32 --rounds 4

For each backend a server is started on a free port of 127.0.0.1 and, for each N of --concurrency, N clients
send --rounds requests each (a JPEG of --image-size), each client waiting for its reply before the next:
latency percentiles, throughput, errors (any reply but 200; none is expected while N stays within the queue)
and the server's peak resident memory (VmHWM, so far). Without --checkpoints a randomly initialised model is
saved as a checkpoint (speed does not depend on the weights); without --onnx its fold 0 is exported.
"""

import argparse
import asyncio
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from competition.checkpoints import save_checkpoint, summary
from competition.config import TrainConfig
from competition.inference import export_onnx, find_checkpoints, load_member
from competition.models import build_model

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (Linux's VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def untrained_run(folder: Path, encoder: str, size: str) -> Path:
    config = TrainConfig(out=str(folder), encoder=encoder, encoder_weights="none", size=size)
    model = build_model(config.arch, config.encoder, "none", classes=config.output_channels())
    (folder / "fold0").mkdir(parents=True)
    save_checkpoint(
        {"model": model.state_dict(), **summary(config, 1, 0.0, config.input_size())}, folder / "fold0" / "best.pt"
    )
    return folder


def test_image(size: tuple[int, int]) -> bytes:
    """A smooth synthetic photo as a JPEG (noise would make a JPEG of unusual size)."""
    height, width = size
    rows, columns = np.mgrid[0:height, 0:width]
    image = np.stack([rows * 255 // height, columns * 255 // width, (rows + columns) * 127 // (height + width)], 2)
    buffer = io.BytesIO()
    Image.fromarray(image.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class Server:
    """python -m competition.serve in a child process that dies with this one."""

    def __init__(self, arguments: list[str]):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environment = os.environ | {
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        }
        command = [sys.executable, "-m", "competition.serve", *arguments, "--port", str(self.port), "--quiet"]
        self.process = subprocess.Popen([*command, "--die-with-parent"], env=environment)
        until = time.monotonic() + 120
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited with status {self.process.returncode}")
            if time.monotonic() > until:
                self.stop()
                raise SystemExit("the server did not answer /health in 120 s")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def load(url: str, payload: bytes, clients: int, rounds: int) -> dict:
    """``clients`` concurrent clients, ``rounds`` requests each: latencies, errors and the wall time."""
    import httpx

    latencies, errors = [], 0
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def one_client():
            nonlocal errors
            for _ in range(rounds):
                started = time.perf_counter()
                reply = await client.post("/predict", content=payload, headers={"Content-Type": "image/jpeg"})
                latencies.append(time.perf_counter() - started)
                errors += reply.status_code != 200

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        wall = time.perf_counter() - started
    return {"latencies": np.array(latencies), "errors": errors, "wall": wall}


def mask_of(url: str, payload: bytes) -> np.ndarray:
    import httpx

    reply = httpx.post(f"{url}/predict", content=payload, timeout=120)
    reply.raise_for_status()
    return np.asarray(Image.open(io.BytesIO(reply.content)))


def bench_backend(name: str, arguments: list[str], payload: bytes, args) -> np.ndarray:
    """One table row per concurrency for a backend, printed; its mask of the image."""
    server = Server(arguments)
    try:
        asyncio.run(load(server.url, payload, 1, 3))  # warm-up: first batches allocate
        for clients in args.concurrency:
            result = asyncio.run(load(server.url, payload, clients, args.rounds))
            p50, p95, p99 = np.percentile(result["latencies"], [50, 95, 99]) * 1000
            throughput = len(result["latencies"]) / result["wall"]
            print(
                f"| {name} | {clients} | {len(result['latencies'])} | {p50:.0f} | {p95:.0f} | {p99:.0f} | "
                f"{throughput:.1f} | {result['errors']} | {peak_rss_mb(server.process.pid):.0f} |",
                flush=True,
            )
        return mask_of(server.url, payload)
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", help="a run folder or best.pt (default: an untrained model, see --size)")
    parser.add_argument("--onnx", help="its ONNX export (default: fold 0 exported to a temporary file)")
    parser.add_argument("--encoder", default="resnet18", help="the untrained model's encoder")
    parser.add_argument("--size", default="160x224", help="the untrained model's input size (the CPU demo's)")
    parser.add_argument("--image-size", default="640x960", help="HEIGHTxWIDTH of the JPEG sent")
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--rounds", type=int, default=4, help="requests each client sends, one after another")
    parser.add_argument("--server-args", default="", help="more flags for the servers, e.g. '--max-batch 4'")
    args = parser.parse_args()
    args.concurrency = [int(number) for number in args.concurrency.split(",")]
    payload = test_image(tuple(int(side) for side in args.image_size.split("x")))
    with tempfile.TemporaryDirectory() as folder:
        checkpoints = args.checkpoints or str(untrained_run(Path(folder) / "run", args.encoder, args.size))
        onnx = args.onnx
        if onnx is None:  # both backends then serve the one model exported, not the PyTorch one an ensemble
            checkpoints = str(find_checkpoints([checkpoints])[0])
            onnx = str(Path(folder) / "fold0.onnx")
            export_onnx(load_member(checkpoints, torch.device("cpu")), onnx)
        common = ["--checkpoints", checkpoints, "--device", "cpu", *args.server_args.split()]
        print(f"serve bench: {args.image_size} JPEG of {len(payload) / 1024:.0f} KiB, {os.cpu_count()} CPUs")
        print("| backend | clients | requests | p50 ms | p95 ms | p99 ms | images/s | errors | peak RSS MiB |")
        print("|---|---|---|---|---|---|---|---|---|")
        torch_mask = bench_backend("pytorch", common, payload, args)
        onnx_mask = bench_backend("onnx", [*common, "--onnx", onnx], payload, args)
    print(f"masks of the two backends differ on {100 * (torch_mask != onnx_mask).mean():.3f}% of the pixels")


if __name__ == "__main__":
    main()
