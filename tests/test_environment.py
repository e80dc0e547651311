from pathlib import Path

from competition.environment import default_data_dir, default_work_dir, on_kaggle


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
