"""python -m competition.serve: the API on both backends, its batching queue, bad input, and the page in Chromium."""

import concurrent.futures
import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from competition import serve
from competition.checkpoints import save_checkpoint, summary
from competition.config import TrainConfig
from competition.inference import export_onnx, load_member, predict_image
from competition.models import build_model
from competition.rle import rle_decode
from competition.serve import Backend, Limits, create_app, load_backend

ROOT = Path(__file__).resolve().parents[1]
# The largest difference in probability between the ONNX and the PyTorch backend on one image, and the largest
# share of pixels whose class differs (pixels at the threshold may fall either way): README's "Serve a model".
ONNX_PROBABILITY_TOLERANCE, ONNX_PIXEL_TOLERANCE = 1e-4, 1e-3


def untrained_run(out: Path, classes: str = "") -> Path:
    """A run folder with one untrained fold (resnet18 Unet at 64x96): a real checkpoint in a second."""
    torch.manual_seed(0)
    config = TrainConfig(out=str(out), encoder="resnet18", encoder_weights="none", size="64x96", classes=classes)
    model = build_model(config.arch, config.encoder, "none", classes=config.output_channels())
    (out / "fold0").mkdir(parents=True)
    save_checkpoint({"model": model.state_dict(), **summary(config, 1, 0.0, (128, 192))}, out / "fold0" / "best.pt")
    return out


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory):
    return untrained_run(tmp_path_factory.mktemp("serve") / "binary")


@pytest.fixture(scope="module")
def parts_run(tmp_path_factory):
    return untrained_run(tmp_path_factory.mktemp("serve") / "parts", "background,body,glass,wheels")


def png_bytes(array: np.ndarray, mode: str | None = None, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format=format)
    return buffer.getvalue()


def photo(height: int = 128, width: int = 192, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def client_for(run: Path, limits: Limits | None = None, onnx: str | None = None) -> TestClient:
    return TestClient(create_app(load_backend([str(run)], onnx, "cpu", 0.5), limits or Limits()))


def one_line_error(reply, status: int) -> str:
    assert reply.status_code == status, reply.text
    assert set(reply.json()) == {"error"} and "\n" not in reply.json()["error"]
    return reply.json()["error"]


def test_png_reply_is_the_mask_predict_image_gives(binary_run):
    image = photo()
    member_mask = predict_image(load_backend([str(binary_run)], None, "cpu", 0.5).predictor, image)
    with client_for(binary_run) as client:
        reply = client.post("/predict", content=png_bytes(image), headers={"Content-Type": "image/png"})
    assert reply.status_code == 200 and reply.headers["content-type"] == "image/png"
    mask = Image.open(io.BytesIO(reply.content))
    assert mask.mode == "P" and mask.size == (192, 128)
    np.testing.assert_array_equal(np.asarray(mask), member_mask)


def test_json_reply_has_each_class_rle_pixels_and_share(parts_run):
    image = photo(96, 160)
    with client_for(parts_run) as client:
        assert client.get("/health").json()["status"] == "ok"
        assert [entry["name"] for entry in client.get("/info").json()["classes"]][1:] == ["body", "glass", "wheels"]
        assert "opacity" in client.get("/").text
        reply = client.post("/predict?format=json", files={"file": ("car.png", png_bytes(image), "image/png")})
        mask = np.asarray(Image.open(io.BytesIO(client.post("/predict", content=png_bytes(image)).content)))
    body = reply.json()
    assert (body["width"], body["height"], body["backend"]) == (160, 96, "pytorch")
    assert sum(entry["pixels"] for entry in body["classes"]) == 96 * 160
    for entry in body["classes"]:
        assert entry["pixels"] == (mask == entry["index"]).sum()
        assert entry["share"] == pytest.approx(entry["pixels"] / mask.size)
        if entry["index"]:
            np.testing.assert_array_equal(rle_decode(entry["rle"], mask.shape), mask == entry["index"])


@pytest.mark.parametrize(
    "shape, mode",
    [((100, 150, 3), "RGB"), ((77, 33, 3), "RGB"), ((128, 192), "L"), ((128, 192, 4), "RGBA"), ((50, 64), "I;16")],
)
def test_any_size_and_image_mode_is_predicted_at_its_own_size(binary_run, shape, mode):
    array = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    payload = png_bytes(array.astype(np.uint16) * 257) if mode == "I;16" else png_bytes(array, mode)
    with client_for(binary_run) as client:
        reply = client.post("/predict", content=payload)
    assert reply.status_code == 200, reply.text
    assert Image.open(io.BytesIO(reply.content)).size == (shape[1], shape[0])


def test_a_full_size_model_pads_to_32_and_crops(tmp_path):
    run = untrained_run(tmp_path / "full")
    checkpoint = torch.load(run / "fold0" / "best.pt", weights_only=True)
    checkpoint["config"]["size"] = "full"
    torch.save(checkpoint, run / "fold0" / "best.pt")
    with client_for(run) as client:
        reply = client.post("/predict", content=png_bytes(photo(70, 101)))
    assert reply.status_code == 200 and Image.open(io.BytesIO(reply.content)).size == (101, 70)


def bad_inputs() -> dict[str, tuple[bytes, int, str]]:
    jpeg = png_bytes(photo(), format="JPEG")
    return {
        "not an image": (b"%PDF-1.4 not a picture at all", 415, "not an image"),
        "truncated": (jpeg[: len(jpeg) // 2], 400, "upload: the image does not decode"),
        "bomb": (png_bytes(np.zeros((3000, 3000), np.uint8)), 413, "the image has 3000x3000 pixels, over --max-pixels"),
        "over the upload limit": (b"\xff" * (2 * 2**20 + 1), 413, "the upload is over --max-upload-mb 2"),
        "empty": (b"", 400, "empty body"),
    }


@pytest.mark.parametrize("name", bad_inputs())
def test_bad_input_is_a_4xx_with_one_line_and_the_server_goes_on(binary_run, name):
    payload, status, message = bad_inputs()[name]
    with client_for(binary_run, Limits(max_upload_bytes=2 * 2**20, max_pixels=4_000_000)) as client:
        assert message in one_line_error(client.post("/predict", content=payload), status)
        assert client.get("/health").status_code == 200
        assert client.post("/predict", content=png_bytes(photo())).status_code == 200


def test_uploads_and_queries_the_server_refuses(binary_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with client_for(binary_run) as client:
        assert "?format=gif" in one_line_error(client.post("/predict?format=gif", content=png_bytes(photo())), 400)
        other_field = client.post("/predict", files={"image": ("car.png", png_bytes(photo()), "image/png")})
        assert "a field named file" in one_line_error(other_field, 400)
        declared = client.post("/predict", content=b"x", headers={"Content-Length": str(10**10)})
        assert "--max-upload-mb" in one_line_error(declared, 413)
        # the client's file name is never a path: not read, not written, not echoed
        hostile = client.post("/predict", files={"file": ("../../escape.png", b"not an image", "image/png")})
        assert "escape" not in one_line_error(hostile, 415)
        assert client.post("/predict", files={"file": ("../../escape.png", png_bytes(photo()))}).status_code == 200
    assert list(tmp_path.iterdir()) == [] and not (tmp_path.parent.parent / "escape.png").exists()


class GatedBackend(Backend):
    """A backend whose predictions wait for ``gate``, recording each batch's size."""

    def __init__(self):
        super().__init__("gated", type("Predictor", (), {"in_channels": 3})(), ["background", "car"])
        self.gate, self.entered, self.batch_sizes = threading.Event(), threading.Event(), []

    def predict(self, images):
        self.batch_sizes.append(len(images))
        self.entered.set()
        assert self.gate.wait(30)
        return np.zeros((len(images), *images[0].shape[:2]), np.uint8)


def wait_for(condition, seconds: float = 10.0) -> None:
    until = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < until, "timed out"
        time.sleep(0.01)


def test_concurrent_requests_are_batched_and_a_full_queue_is_503_at_once():
    backend = GatedBackend()
    payload = png_bytes(photo(32, 32))
    app = create_app(backend, Limits(max_batch=8, batch_wait_s=0, queue_size=4))
    with TestClient(app) as client, concurrent.futures.ThreadPoolExecutor(6) as pool:
        first = pool.submit(client.post, "/predict", content=payload)
        assert backend.entered.wait(10)
        waiting = [pool.submit(client.post, "/predict", content=payload) for _ in range(4)]
        wait_for(lambda: client.get("/health").json()["queued"] == 4)
        started = time.monotonic()
        busy = client.post("/predict", content=payload)
        assert time.monotonic() - started < 2
        assert "--queue-size" in one_line_error(busy, 503) and busy.headers["Retry-After"] == "1"
        assert client.get("/health").status_code == 200  # predicting never blocks the event loop
        backend.gate.set()
        assert [reply.result(30).status_code for reply in [first, *waiting]] == [200] * 5
    assert backend.batch_sizes == [1, 4]


def test_without_the_extra_it_says_the_install_command(binary_run, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(SystemExit) as exit_info:
        serve.main(["--checkpoints", str(binary_run)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1
    assert "needs fastapi, which the plain install leaves out: pip install -r requirements-serve.txt" in error


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--queue-size", "0"], "--queue-size 0: out of range"),
        (["--onnx", "missing.onnx"], "--onnx missing.onnx: no such file"),
        (["--max-upload-mb", "-1"], "--max-upload-mb -1.0: out of range"),
    ],
)
def test_bad_flags_are_one_line(binary_run, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        serve.main(["--checkpoints", str(binary_run), *argv])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in error and error.count("\n") == 1
    parser = serve.OneLineParser()
    serve.add_arguments(parser)
    assert parser.parse_args(["--checkpoints", "x"]).host == "127.0.0.1"


def test_onnx_backend_agrees_with_pytorch_within_the_stated_tolerance(parts_run, tmp_path):
    member = load_member(parts_run / "fold0" / "best.pt", torch.device("cpu"))
    export_onnx(member, tmp_path / "model.onnx")
    pytorch = load_backend([str(parts_run)], None, "cpu", 0.5)
    onnx = load_backend([str(parts_run)], str(tmp_path / "model.onnx"), "cpu", 0.5)
    for seed, (height, width) in enumerate([(128, 192), (77, 130)]):
        image = photo(height, width, seed)
        assert np.abs(probabilities(onnx, image) - probabilities(pytorch, image)).max() <= ONNX_PROBABILITY_TOLERANCE
        assert (pytorch.predict([image]) != onnx.predict([image])).mean() <= ONNX_PIXEL_TOLERANCE
    with client_for(parts_run, onnx=str(tmp_path / "model.onnx")) as client:
        assert client.post("/predict?format=json", content=png_bytes(photo())).json()["backend"] == "onnx"


def probabilities(backend: Backend, image: np.ndarray) -> np.ndarray:
    from competition.data import resize_image, to_chw

    batches = {
        key: to_chw(image if size is None else resize_image(image, size))[None]
        for key, size in backend.predictor.input_sizes.items()
    }
    with torch.no_grad():
        return backend.predictor.probabilities(batches, image.shape[:2]).numpy()


def test_an_onnx_file_of_another_model_is_one_line(binary_run, parts_run, tmp_path, capsys):
    export_onnx(load_member(parts_run / "fold0" / "best.pt", torch.device("cpu")), tmp_path / "parts.onnx")
    (tmp_path / "text.onnx").write_text("not a model")
    capsys.readouterr()  # the exporter's own warnings
    for name, message in [("parts.onnx", "takes 3 channel(s) and gives 4"), ("text.onnx", "not an ONNX model")]:
        with pytest.raises(SystemExit):
            serve.main(["--checkpoints", str(binary_run), "--onnx", str(tmp_path / name)])
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def server(trained_run):
    """``python -m competition.serve`` on the trained run, on a free port of 127.0.0.1; stopped when the test
    ends, and killed with the test's process if that dies first."""
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "competition.serve", "--checkpoints", str(trained_run), "--port", str(port)]
    environment = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(command + ["--die-with-parent"], env=environment)
    url = f"http://127.0.0.1:{port}"
    try:
        until = time.monotonic() + 60
        while True:
            assert process.poll() is None, "the server exited"
            assert time.monotonic() < until, "the server did not answer in 60 s"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_the_server_program_answers_on_this_machine(server, data_dir):
    import httpx

    image = next((data_dir / "test").iterdir())
    reply = httpx.post(f"{server}/predict", content=image.read_bytes(), timeout=30)
    assert reply.status_code == 200
    mask = np.asarray(Image.open(io.BytesIO(reply.content)))
    assert mask.shape == (128, 192) and 0.05 < mask.mean() < 0.8


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "no chromium on PATH: `make test` installs Debian's (apt-get install -y chromium)"
    return found


@pytest.mark.slow
def test_the_page_shows_the_overlay_in_a_real_browser(server, trained_run, data_dir):
    """Chromium uploads an image on the page and waits for the overlay: its size, and its colour where the mask
    is known; the screenshot is the README's."""
    from playwright.sync_api import sync_playwright

    from competition.data import decode_image
    from competition.inference import Ensemble, find_checkpoints

    image_path = min((data_dir / "test").iterdir())
    image = decode_image(image_path.read_bytes(), str(image_path))
    ensemble = Ensemble([load_member(path, torch.device("cpu")) for path in find_checkpoints([trained_run])])
    mask = predict_image(ensemble, image)
    car, background = np.argwhere(mask == 1)[len(np.argwhere(mask == 1)) // 2], np.argwhere(mask == 0)[0]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 560})
            page.goto(server)
            page.wait_for_selector("body[data-ready=yes]", timeout=15000)
            page.set_input_files("#file", str(image_path))
            page.wait_for_selector("body[data-state=done]", timeout=30000)
            size = page.eval_on_selector("#overlay", "canvas => [canvas.width, canvas.height]")
            pixel = "(canvas, [y, x]) => Array.from(canvas.getContext('2d').getImageData(x, y, 1, 1).data)"
            assert size == [image.shape[1], image.shape[0]]
            assert page.eval_on_selector("#overlay", pixel, [int(car[0]), int(car[1])]) == [230, 25, 75, 255]
            assert page.eval_on_selector("#overlay", pixel, [int(background[0]), int(background[1])])[3] == 0
            shares = page.locator("#legend .share").all_inner_texts()
            assert shares[1] == f"{100 * mask.mean():.1f}%"
            assert page.get_attribute("#download", "href").startswith("blob:")
            page.fill("#opacity", "70")
            assert page.eval_on_selector("#overlay", "canvas => canvas.style.opacity") == "0.7"
            (ROOT / "docs").mkdir(exist_ok=True)
            page.screenshot(path=str(ROOT / "docs" / "serve.png"), full_page=True)
        finally:
            browser.close()


@pytest.mark.slow
def test_the_bench_compares_both_backends_in_one_run():
    command = [sys.executable, "-m", "bench.serve_bench", "--concurrency", "1,2", "--rounds", "1"]
    command += ["--size", "64x96", "--image-size", "96x128"]
    environment = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        command, check=False, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith(("| pytorch", "| onnx"))]
    assert [(row[0].strip(), row[1].strip()) for row in rows] == [
        ("pytorch", "1"),
        ("pytorch", "2"),
        ("onnx", "1"),
        ("onnx", "2"),
    ]
    assert all(row[7].strip() == "0" for row in rows) and all(float(row[8]) > 0 for row in rows)
    assert "masks of the two backends differ on" in result.stdout


class FailingBackend(GatedBackend):
    """A backend that fails its first prediction (a bug, or a device out of memory) and then predicts."""

    def predict(self, images):
        if not self.batch_sizes:
            self.batch_sizes.append(len(images))
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore details")
        return np.zeros((len(images), *images[0].shape[:2]), np.uint8)


def test_a_failed_prediction_is_a_500_of_one_json_line_and_the_server_goes_on():
    app = create_app(FailingBackend(), Limits(batch_wait_s=0))
    with TestClient(app, raise_server_exceptions=False) as client:
        failed = client.post("/predict", content=png_bytes(photo(32, 32)))
        assert (
            one_line_error(failed, 500)
            == "the prediction failed: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
        )
        assert client.post("/predict", content=png_bytes(photo(32, 32))).status_code == 200
        assert app.state.batcher.in_flight == 0  # the failed request let go of its place


def test_uploads_in_progress_count_against_the_queue():
    backend = GatedBackend()
    app = create_app(backend, Limits(max_batch=1, batch_wait_s=0, queue_size=1))
    app.state.batcher.in_flight = 2  # two requests still reading their uploads: a full queue and a batch
    with TestClient(app) as client:
        busy = client.post("/predict", content=png_bytes(photo(32, 32)))
        assert "--queue-size" in one_line_error(busy, 503) and backend.batch_sizes == []


def test_the_served_masks_follow_the_run_s_tuned_post_processing(tmp_path):
    from competition.errors import ConfigError
    from competition.postprocess import ClassRule, PostProcess, write_postprocess
    from competition.submission import predicted_by

    run = untrained_run(tmp_path / "run")
    checkpoints = predicted_by([run / "fold0" / "best.pt"], (), 0.5)["checkpoints"]
    everything = PostProcess("binary", (ClassRule("car", 1e-9, 0, 0),))  # every pixel above the threshold
    write_postprocess(run / "postprocess.json", everything, {"images": 1, "tta": []}, checkpoints)
    assert (load_backend([str(run)], None, "cpu", 0.5).predict([photo()]) == 1).all()
    assert not (load_backend([str(run)], None, "cpu", 0.5, postprocess=False).predict([photo()]) == 1).all()
    write_postprocess(run / "postprocess.json", everything, {"images": 1, "tta": []}, [])
    with pytest.raises(ConfigError, match="tuned on other checkpoints"):
        load_backend([str(run)], None, "cpu", 0.5)
