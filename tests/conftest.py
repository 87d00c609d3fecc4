import pytest
import torch

from nanosd.config import load_config
from nanosd.data import ImageSet


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOSD_CACHE", str(tmp_path / "cache"))  # tests never touch the user's cache or the network


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
