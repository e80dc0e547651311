"""Precision per device, for training and inference alike: bf16 only where the GPU runs it natively."""

import pytest
import torch

from competition import prediction
from competition.errors import ConfigError
from competition.losses import build_loss
from competition.models import build_model
from competition.prediction import NATIVE_BF16, PRECISIONS, resolve_precision, setup_device
from competition.training import OptimizerStepCount, accumulate_gradients, optimizer_step

GPU = torch.device("cuda", 0)  # constructing a device object needs no GPU
# name, compute capability, what auto resolves to
GPUS = [
    ("Tesla T4", (7, 5), "fp16"),
    ("Tesla V100-SXM2-16GB", (7, 0), "fp16"),
    ("Tesla P100-PCIE-16GB", (6, 0), "fp16"),
    ("NVIDIA A100-SXM4-40GB", (8, 0), "bf16"),
    ("NVIDIA L4", (8, 9), "bf16"),
    ("NVIDIA H100 80GB HBM3", (9, 0), "bf16"),
]


@pytest.fixture
def fake_gpu(monkeypatch):
    """Makes torch.cuda report the GPU given to the returned function; bf16 "supported" everywhere, since
    torch.cuda.is_bf16_supported() counts emulation and so must not decide."""

    def install(name: str, capability: tuple[int, int]) -> None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
        monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)

    return install


@pytest.mark.parametrize(("name", "capability", "expected"), GPUS, ids=[gpu[0].split()[-1] for gpu in GPUS])
def test_auto_is_bf16_only_on_gpus_that_run_it_natively(fake_gpu, name, capability, expected):
    fake_gpu(name, capability)
    assert resolve_precision("auto", GPU) == expected
    assert (expected == "bf16") == (capability >= NATIVE_BF16)
    assert resolve_precision("fp16", GPU) == "fp16"
    assert resolve_precision("fp32", GPU) == "fp32"


@pytest.mark.parametrize(("name", "capability", "expected"), GPUS, ids=[gpu[0].split()[-1] for gpu in GPUS])
def test_explicit_bf16_is_refused_where_it_would_be_emulated(fake_gpu, name, capability, expected):
    fake_gpu(name, capability)
    if expected == "bf16":
        assert resolve_precision("bf16", GPU) == "bf16"
        return
    with pytest.raises(ConfigError) as refused:
        resolve_precision("bf16", GPU)
    message = str(refused.value)
    assert name in message and f"{capability[0]}.{capability[1]}" in message
    assert "no native bf16" in message and "--precision fp16" in message


def test_cpu_runs_fp32_by_default_and_takes_an_explicit_choice(fake_gpu):
    fake_gpu("NVIDIA H100 80GB HBM3", (9, 0))  # the CPU answer must not depend on any GPU present
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    for precision in ("bf16", "fp16", "fp32"):
        assert resolve_precision(precision, cpu) == precision


@pytest.mark.parametrize("device", [torch.device("cpu"), GPU], ids=["cpu", "cuda"])
def test_unknown_precision_lists_the_choices(fake_gpu, device):
    fake_gpu("Tesla T4", (7, 5))
    with pytest.raises(ConfigError, match="'fp8'") as refused:
        resolve_precision("fp8", device)
    assert all(choice in str(refused.value) for choice in PRECISIONS)


def test_training_and_inference_resolve_auto_to_fp16_on_a_t4(fake_gpu, monkeypatch):
    """train.py (via train_fold) and infer.py both call setup_device: one answer for both."""
    fake_gpu("Tesla T4", (7, 5))
    requested = []
    monkeypatch.setattr(prediction, "resolve_device", lambda name: requested.append(name) or GPU)
    tuned = []
    monkeypatch.setattr(prediction, "tune_for", tuned.append)
    assert setup_device(None, "auto") == (GPU, "fp16")
    assert requested == [None] and tuned == [GPU]
    with pytest.raises(ConfigError, match="no native bf16"):
        setup_device("cuda", "bf16")


@pytest.mark.slow
def test_fp16_steps_with_loss_scaling_skip_nothing_when_the_loss_is_finite():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions on a busy 2-core CPU: one thread is ten times faster
    try:
        model = build_model("Unet", "resnet18", "none").train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler("cpu", enabled=True)
        initial_scale = scaler.get_scale()
        before = [parameter.detach().clone() for parameter in model.parameters()]
        images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        masks = torch.zeros(2, 1, 64, 64)
        masks[..., 16:48, 8:40] = 1
        loss_fn = build_loss("bce_dice")
        steps = 2  # fp16 convolutions are slow on a CPU: ~3 s a step here
        for _ in range(steps):
            loss = accumulate_gradients(model, loss_fn, [(images, masks)], "fp16", scaler)
            assert torch.isfinite(loss) and loss.dtype == torch.float32
            optimizer_step(model, optimizer, scaler, clip_grad=1.0)
    finally:
        torch.set_num_threads(threads)
    # a skipped step (inf/NaN gradients) would halve the scale and leave the optimizer's step count behind
    assert scaler.get_scale() == initial_scale > 0
    assert all(int(state["step"]) == steps for state in optimizer.state.values())
    assert len(optimizer.state) == len(before)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize(("init_scale", "skipped"), [(2.0**60, 3), (2.0**8, 0)], ids=["overflowing", "finite"])
def test_fp16_steps_skipped_for_overflowing_gradients_are_counted(init_scale, skipped):
    """A loss scale of 2**60 overflows fp16 gradients: GradScaler skips the step and halves the scale."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 1, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    steps = OptimizerStepCount(optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    images = torch.rand(2, 3, 32, 32)
    masks = (torch.rand(2, 1, 32, 32) > 0.5).float()
    for _ in range(3):
        accumulate_gradients(model, build_loss("bce_dice"), [(images, masks)], "fp16", scaler)
        optimizer_step(model, optimizer, scaler, clip_grad=1.0)
    assert 3 - steps.taken == skipped
    assert scaler.get_scale() == init_scale / 2**skipped


def test_a_process_on_the_second_gpu_makes_it_its_current_device(fake_gpu, monkeypatch):
    """Else PyTorch's implicit work (pinned-memory threads) opens a second CUDA context on cuda:0."""
    fake_gpu("Tesla T4", (7, 5))
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_75", "sm_80"])
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setattr(prediction, "tune_for", lambda device: None)  # cuDNN and matmul settings: not this test's
    device, precision = setup_device("cuda:1", "auto")
    assert (device, precision) == (torch.device("cuda", 1), "fp16")
    assert current == [torch.device("cuda", 1)]
