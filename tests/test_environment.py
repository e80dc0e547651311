from pathlib import Path

import pytest
import torch

import infer
import train
from competition.environment import (
    DeviceError,
    default_data_dir,
    default_work_dir,
    gpu_supported,
    on_kaggle,
    resolve_device,
)


def test_local_defaults(monkeypatch):
    for name in ("KAGGLE_KERNEL_RUN_TYPE", "CARVANA_DATA_DIR", "CARVANA_WORK_DIR"):
        monkeypatch.delenv(name, raising=False)
    assert not on_kaggle()
    assert default_data_dir() == Path("input") and default_work_dir() == Path(".")


def test_kaggle_defaults_and_overrides(monkeypatch):
    monkeypatch.delenv("CARVANA_DATA_DIR", raising=False)
    monkeypatch.delenv("CARVANA_WORK_DIR", raising=False)
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    assert on_kaggle()
    assert default_data_dir() == Path("/kaggle/input/carvana-image-masking-challenge")
    assert default_work_dir() == Path("/kaggle/working")
    monkeypatch.setenv("CARVANA_DATA_DIR", "/data/carvana")
    monkeypatch.setenv("CARVANA_WORK_DIR", "/scratch")
    assert default_data_dir() == Path("/data/carvana") and default_work_dir() == Path("/scratch")


@pytest.mark.parametrize(
    "capability, arch_list, supported",
    [
        ((6, 0), ["sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"], False),  # P100, cu128 build
        ((6, 0), ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"], True),  # P100, cu126 build
        ((7, 5), ["sm_70", "sm_75", "sm_80"], True),  # T4
        ((8, 9), ["sm_75", "sm_80", "sm_86", "sm_90"], True),  # L4: the sm_86 cubin runs on 8.9
        ((8, 0), ["sm_86", "sm_90"], False),  # a cubin does not run on an older minor version
        ((12, 0), ["sm_80", "sm_90", "compute_90"], True),  # a newer GPU compiles the PTX
        ((9, 0), ["sm_90a"], True),
        ((7, 0), [], True),  # a build that lists nothing (ROCm) is trusted
    ],
)
def test_gpu_supported_by_the_build(capability, arch_list, supported):
    assert gpu_supported(capability, arch_list) is supported


def test_a_gpu_without_kernels_fails_at_once_with_what_to_pick(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 0))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_70", "sm_75", "sm_80", "sm_90", "sm_120"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla P100-PCIE-16GB")
    with pytest.raises(DeviceError, match=r"Tesla P100-PCIE-16GB \(compute capability 6\.0\) is not supported.*T4"):
        resolve_device()
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--fold", "0"])
    assert exit_info.value.code == 2 and "Tesla P100-PCIE-16GB" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        infer.main(["--checkpoints", __file__])  # a file that exists: the device is checked before it is read
    assert exit_info.value.code == 2 and "T4 x2" in capsys.readouterr().err
