"""Serve a trained model over HTTP: python -m competition.serve --checkpoints RUN answers POST /predict.

python -m competition.serve --checkpoints runs/unet_resnet34                the fold ensemble (PyTorch)
python -m competition.serve --checkpoints runs/x/fold0/best.pt --onnx unet.onnx   ... or its ONNX export

Endpoints: POST /predict (an image as the raw body or as the multipart field ``file``) -> the mask as a palette
PNG of class indices (a greyscale PNG of packed bits, bit k for class k, for a multilabel model), or with ?format=json each class's pixel count, share and row-major RLE; GET /health;
GET /info (the classes and their colours); GET / (a page to try it). Concurrent requests wait in a bounded queue
and are predicted in batches of images of one size; a full queue answers 503 with Retry-After at once. Every
refused request is a 4xx with one line of JSON, {"error": "..."}, and the server goes on serving. The masks follow
the run's postprocess.json (infer.py --oof --tune) when it is there and tuned on these checkpoints (--no-postprocess:
--threshold). Needs the
serve extra: pip install -r requirements-serve.txt.
"""

import argparse
import asyncio
import concurrent.futures
import contextlib
import io
import logging
import socket
import time
from collections import defaultdict
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from competition.checkpoints import checkpoint_config, load_checkpoint
from competition.data import decode_image
from competition.errors import CheckpointError, ConfigError, DataError
from competition.inference import Ensemble, OnnxModel, find_checkpoints, load_member, predict_images, tuned_postprocess
from competition.logs import OneLineParser, add_logging_arguments, configure_from, exit_on_project_error
from competition.mask_values import class_pixels
from competition.postprocess import PostProcess
from competition.prediction import setup_device
from competition.submission import class_rles, label_rles
from competition.workers import die_with_parent
from competition.writers import encode_mask_png, encode_png, palette

logger = logging.getLogger(__name__)

INSTALL = "pip install -r requirements-serve.txt"
FORMATS = ("png", "json")
UPLOAD_NAME = "upload"  # what error messages call the image: the client's file name is never used for anything


class RequestError(Exception):
    """A request the server refuses: its HTTP status and one line saying why."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass(frozen=True)
class Limits:
    """What one request may ask, and how requests are batched and queued."""

    max_upload_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    max_batch: int = 8
    batch_wait_s: float = 0.005
    queue_size: int = 32
    retry_after_s: int = 1


@dataclass
class Backend:
    """What predicts: the PyTorch fold ensemble or an ONNX export, with the classes its checkpoints name."""

    name: str
    predictor: Ensemble | OnnxModel
    class_names: list[str]
    threshold: float = 0.5
    multilabel: bool = False  # --head multilabel: masks are packed bits (bit k: class k), classes without background
    postprocess: PostProcess | None = None  # the run's tuned rules (postprocess.json), which replace ``threshold``

    @property
    def in_channels(self) -> int:
        return self.predictor.in_channels

    def predict(self, images: list[np.ndarray]) -> np.ndarray:
        """Masks (N, H, W) of images of one size, as one batch."""
        return predict_images(self.predictor, images, self.threshold, self.postprocess)


def require_serving():
    """FastAPI, uvicorn and python-multipart, or one line saying how to install them."""
    try:
        import fastapi
        import python_multipart  # noqa: F401 - the multipart uploads' parser
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise ConfigError(
            f"python -m competition.serve needs {error.name}, which the plain install leaves out: {INSTALL}"
        ) from None
    return fastapi


def load_backend(
    checkpoints: list[str], onnx: str | None, device: str | None, threshold: float, postprocess: bool = True
) -> Backend:
    """The fold ensemble of ``checkpoints`` on ``device``, or the ONNX model ``onnx`` read with their classes; with
    ``postprocess``, the rules of the postprocess.json tuned on these checkpoints when there is one."""
    paths = find_checkpoints(checkpoints)
    if onnx is None:
        torch_device, _ = setup_device(device, "fp32")
        ensemble = Ensemble([load_member(path, torch_device) for path in paths])
        config = ensemble.members[0].config
        names = config.class_names() or ["background", "car"]
        rules = serving_rules(paths, config) if postprocess else None
        return Backend("pytorch", ensemble, names, threshold, config.multilabel(), rules)
    if not Path(onnx).is_file():
        raise CheckpointError(f"--onnx {onnx}: no such file; export one with `python infer.py --export-onnx {onnx}`")
    config = checkpoint_config(load_checkpoint(paths[0]), paths[0])
    model = OnnxModel(onnx)
    if (model.output_channels, model.in_channels) != (config.output_channels(), config.in_channels):
        raise CheckpointError(
            f"--onnx {onnx}: takes {model.in_channels} channel(s) and gives {model.output_channels}, where "
            f"{paths[0]} takes {config.in_channels} and gives {config.output_channels()}; pass the checkpoints "
            "it was exported from"
        )
    model.multilabel = config.multilabel()  # the export records no head: its checkpoints' config says it
    names, rules = config.class_names() or ["background", "car"], serving_rules(paths, config) if postprocess else None
    return Backend("onnx", model, names, threshold, config.multilabel(), rules)


def serving_rules(paths: list[Path], config) -> PostProcess | None:
    """The rules of the postprocess.json tuned on the checkpoints (one line when tuned on others), said in a line."""
    rules, path = tuned_postprocess(paths, (), config)
    if rules is not None:
        logger.info("%s: post-processing applied (--no-postprocess leaves it out): %s", path, rules.describe())
    return rules


def decode_upload(payload: bytes, in_channels: int, max_pixels: int) -> np.ndarray:
    """The uploaded bytes as a uint8 (H, W, in_channels) image; RequestError when they are none, or too many pixels
    (checked from the header before anything is decoded)."""
    if not payload:
        raise RequestError(400, "empty body: send an image file (curl --data-binary @car.jpg URL)")
    try:
        with Image.open(io.BytesIO(payload)) as image:
            width, height = image.size
    except Image.DecompressionBombError:
        raise RequestError(413, f"the image has more pixels than --max-pixels {max_pixels}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise RequestError(415, "not an image: send a JPEG, PNG or another format Pillow reads") from None
    if width * height > max_pixels:
        raise RequestError(413, f"the image has {width}x{height} pixels, over --max-pixels {max_pixels}")
    try:
        return decode_image(payload, UPLOAD_NAME, channels=in_channels)
    except DataError as error:
        raise RequestError(400, str(error)) from None
    except Image.DecompressionBombError:  # Pillow's own limit, when set lower than --max-pixels
        raise RequestError(413, f"the image has more pixels than Pillow's limit {Image.MAX_IMAGE_PIXELS}") from None


def multipart_file(body: bytes, content_type: str) -> bytes:
    """The field ``file`` of a multipart/form-data body, parsed in memory."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise RequestError(400, "multipart body without a boundary in its Content-Type")
    parts: list[dict] = []
    header = {"field": b"", "value": b""}

    def on_header_end():
        parts[-1]["headers"][header["field"].lower()] = header["value"]
        header["field"] = header["value"] = b""

    callbacks = {
        "on_part_begin": lambda: parts.append({"headers": {}, "data": bytearray()}),
        "on_header_field": lambda data, start, end: header.__setitem__("field", header["field"] + data[start:end]),
        "on_header_value": lambda data, start, end: header.__setitem__("value", header["value"] + data[start:end]),
        "on_header_end": on_header_end,
        "on_part_data": lambda data, start, end: parts[-1]["data"].extend(data[start:end]),
    }
    try:
        MultipartParser(boundary, callbacks).write(body)
    except Exception as error:  # noqa: BLE001 - python-multipart's parse errors: one line
        raise RequestError(400, f"a malformed multipart body ({error})") from None
    for part in parts:
        disposition = parse_options_header(part["headers"].get(b"content-disposition", b""))[1]
        if disposition.get(b"name") == b"file":
            return bytes(part["data"])
    raise RequestError(400, "a multipart upload without a field named file: send it as -F file=@car.jpg")


async def read_body(request, max_bytes: int) -> bytes:
    """The request's body, refused with 413 as soon as it is over ``max_bytes`` (by its Content-Length, or by
    the bytes counted as they arrive), so that no large upload is held in memory."""
    too_large = RequestError(413, f"the upload is over --max-upload-mb {max_bytes / 2**20:g}")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > max_bytes:
            raise too_large
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        return multipart_file(bytes(body), content_type)
    return bytes(body)


@dataclass
class Job:
    image: np.ndarray
    future: asyncio.Future


@dataclass
class Batcher:
    """A bounded queue of images and one worker that predicts them in batches (up to ``max_batch`` of one size,
    gathered for ``batch_wait_s`` after the first), in a thread, so that the event loop goes on answering."""

    predict: callable
    limits: Limits
    queue: asyncio.Queue = field(init=False)
    executor: concurrent.futures.ThreadPoolExecutor = field(init=False)
    batches: int = 0
    in_flight: int = 0  # admitted requests: reading, decoding, waiting or predicted (one event loop: no lock)

    def __post_init__(self):
        self.queue = asyncio.Queue(maxsize=self.limits.queue_size)
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="predict")

    def busy(self) -> RequestError:
        return RequestError(
            503,
            f"busy: {self.limits.queue_size} images are waiting (--queue-size); retry after "
            f"{self.limits.retry_after_s} s",
            {"Retry-After": str(self.limits.retry_after_s)},
        )

    @contextlib.contextmanager
    def admitted(self):
        """A request from before its upload is read to its reply. At most a full queue and a batch are admitted at
        once, so uploads and decodes in progress are bounded too; beyond, RequestError 503 before anything is read."""
        if self.in_flight >= self.limits.queue_size + self.limits.max_batch or self.queue.full():
            raise self.busy()
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def submit(self, image: np.ndarray) -> np.ndarray:
        """The image's mask; RequestError 503 at once when the queue is full."""
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(Job(image, future))
        except asyncio.QueueFull:
            raise self.busy() from None
        return await future

    async def gather(self) -> list[Job]:
        """The next jobs to predict: the first to come, and those that come within ``batch_wait_s`` after it."""
        jobs = [await self.queue.get()]
        loop = asyncio.get_running_loop()
        until = loop.time() + self.limits.batch_wait_s
        while len(jobs) < self.limits.max_batch:
            try:
                jobs.append(self.queue.get_nowait())
            except asyncio.QueueEmpty:
                if loop.time() >= until:
                    break
                await asyncio.sleep(min(0.001, until - loop.time()))
        return jobs

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            by_shape = defaultdict(list)
            for job in await self.gather():
                by_shape[job.image.shape].append(job)
            for jobs in by_shape.values():
                jobs = [job for job in jobs if not job.future.done()]  # a client that left is not predicted for
                if not jobs:
                    continue
                try:
                    masks = await loop.run_in_executor(self.executor, self.predict, [job.image for job in jobs])
                except Exception as error:  # noqa: BLE001 - handed to each waiting request, the worker goes on
                    masks = [error] * len(jobs)
                self.batches += 1
                for job, mask in zip(jobs, masks):
                    if not job.future.done():
                        (job.future.set_exception if isinstance(mask, Exception) else job.future.set_result)(mask)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def class_summary(mask: np.ndarray, class_names: list[str], with_rle: bool, multilabel: bool = False) -> list[dict]:
    """Each class's index, name, colour, pixel count and share of the image (and row-major RLE, background aside);
    ``multilabel``: of each class's bit of the packed mask, in the colour its overlay tints it."""
    counts = class_pixels(mask, len(class_names), multilabel)
    if multilabel:
        colours, rles = palette(len(class_names) + 1)[1:], label_rles(mask, len(class_names)) if with_rle else None
        summary = []
        for index, name in enumerate(class_names):
            entry = {"index": index, "name": name, "colour": "#" + bytes(colours[index]).hex()}
            entry |= {"pixels": int(counts[index]), "share": float(counts[index] / mask.size)}
            summary.append(entry | ({"rle": rles[index]} if rles else {}))
        return summary
    colours = palette(len(class_names))
    rles = [""] + class_rles(mask, len(class_names)) if with_rle else None
    summary = []
    for index, name in enumerate(class_names):
        entry = {"index": index, "name": name, "colour": "#" + bytes(colours[index]).hex()}
        entry |= {"pixels": int(counts[index]), "share": float(counts[index] / mask.size)}
        if rles is not None and index > 0:
            entry["rle"] = rles[index]
        summary.append(entry)
    return summary


def page_html() -> str:
    return resources.files("competition").joinpath("static/index.html").read_text(encoding="utf-8")


def create_app(backend: Backend, limits: Limits = Limits()):
    """The ASGI application: FastAPI routes over ``backend``, with the batching queue started by its lifespan."""
    fastapi = require_serving()
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    batcher = Batcher(backend.predict, limits)

    async def lifespan(app):
        worker = asyncio.create_task(batcher.run(), name="batcher")
        yield
        worker.cancel()
        batcher.close()

    app = fastapi.FastAPI(title="competition.serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher, app.state.backend = batcher, backend

    @app.exception_handler(RequestError)
    async def refused(request, error: RequestError):
        logger.info("%s %s refused (%d): %s", request.method, request.url.path, error.status, error.message)
        return JSONResponse({"error": error.message}, status_code=error.status, headers=error.headers)

    @app.exception_handler(Exception)
    async def failed(request, error: Exception):  # a bug or the machine (out of memory): one line too, logged whole
        logger.error("%s %s failed", request.method, request.url.path, exc_info=error)
        first_line = (str(error).strip().splitlines() or [""])[0]
        return JSONResponse({"error": f"the prediction failed: {type(error).__name__}: {first_line}"}, status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "backend": backend.name, "queued": batcher.queue.qsize()}

    @app.get("/info")
    async def info():
        classes = [
            {key: entry[key] for key in ("index", "name", "colour")}
            for entry in class_summary(np.zeros((1, 1), np.uint8), backend.class_names, False, backend.multilabel)
        ]
        return {"backend": backend.name, "classes": classes, "max_upload_bytes": limits.max_upload_bytes}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return page_html()

    @app.post("/predict")
    async def predict(request: fastapi.Request, format: str = "png"):
        if format not in FORMATS:
            raise RequestError(400, f"?format={format}: choose png or json")
        with batcher.admitted():
            payload = await read_body(request, limits.max_upload_bytes)
            loop = asyncio.get_running_loop()
            image = await loop.run_in_executor(None, decode_upload, payload, backend.in_channels, limits.max_pixels)
            started = time.perf_counter()
            mask = await batcher.submit(image)
        headers = {"X-Predict-Seconds": f"{time.perf_counter() - started:.4f}"}
        if format == "png":
            if backend.multilabel:  # packed bits as grey levels, as infer.py writes them
                png = encode_png(mask)
            else:
                png = encode_mask_png(mask, palette(len(backend.class_names)))
            return Response(png, media_type="image/png", headers=headers)
        height, width = mask.shape
        body = {"width": width, "height": height, "backend": backend.name}
        classes = class_summary(mask, backend.class_names, True, backend.multilabel)
        return JSONResponse(body | {"classes": classes}, headers=headers)

    return app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoints", nargs="+", required=True, help="run folders (fold*/best.pt) or best.pt files")
    parser.add_argument("--onnx", metavar="FILE", help="predict with this ONNX export instead (onnxruntime, CPU)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", help="PyTorch backend's device (default: cuda when there is one, else cpu)")
    parser.add_argument("--threshold", type=float, default=0.5, help="binary models: probability of the class")
    parser.add_argument(
        "--no-postprocess", action="store_true", help="leave out the run folder's postprocess.json (--oof --tune)"
    )
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload; larger ones get 413")
    parser.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image (Pillow's pixel limit)")
    parser.add_argument("--max-batch", type=int, default=8, help="images predicted together at most")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits for more images")
    parser.add_argument("--queue-size", type=int, default=32, help="images waiting at most; more get 503")
    parser.add_argument("--retry-after", type=int, default=1, help="seconds a 503 tells the client to wait")
    parser.add_argument("--die-with-parent", action="store_true", help=argparse.SUPPRESS)  # tests and the bench
    add_logging_arguments(parser)


def limits_from(args: argparse.Namespace) -> Limits:
    """The limits the flags give, each checked."""
    checks = {
        "--max-upload-mb": args.max_upload_mb > 0,
        "--max-pixels": args.max_pixels > 0,
        "--max-batch": args.max_batch >= 1,
        "--batch-wait-ms": args.batch_wait_ms >= 0,
        "--queue-size": args.queue_size >= 1,
        "--retry-after": args.retry_after >= 1,
        "--threshold": 0 < args.threshold < 1,
        "--port": 0 <= args.port < 65536,
    }
    for flag, valid in checks.items():
        if not valid:
            raise ConfigError(f"{flag} {getattr(args, flag[2:].replace('-', '_'))}: out of range, see --help")
    return Limits(
        int(args.max_upload_mb * 2**20),
        args.max_pixels,
        args.max_batch,
        args.batch_wait_ms / 1000,
        args.queue_size,
        args.retry_after,
    )


def check_port(host: str, port: int) -> None:
    """One line when ``host:port`` cannot be listened on (uvicorn would log a paragraph and exit 1)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as error:
        raise ConfigError(
            f"--host {host} --port {port}: cannot listen there ({error.strerror}); pass another --port"
        ) from None


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(prog="python -m competition.serve", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    configure_from(args)
    with exit_on_project_error(parser.prog, args.debug):
        if args.die_with_parent:
            die_with_parent()
        require_serving()
        import uvicorn

        limits = limits_from(args)
        Image.MAX_IMAGE_PIXELS = limits.max_pixels  # Pillow's guard, explicit: decode_upload checks it first
        backend = load_backend(args.checkpoints, args.onnx, args.device, args.threshold, not args.no_postprocess)
        check_port(args.host, args.port)
        logger.info(
            "serving %s (%s) on http://%s:%d/", backend.name, ", ".join(backend.class_names), args.host, args.port
        )
        uvicorn.run(create_app(backend, limits), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
