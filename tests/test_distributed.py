"""torchrun with gloo on this machine: N processes take the same steps as one process accumulating over the same
micro-batches, and a run resumes under another number of processes."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from nanosd.io import load_tensors

CONFIG = """
[data]
name = "{data}"
size = 8
[unet]
model_channels = 32
channel_mult = [1, 2]
num_res_blocks = 1
attention_levels = [1]
num_heads = 2
[train]
batch_size = 8
micro_batch = 4
lr = 1e-3
warmup_steps = 2
log_every = 1
sample_every = 0
checkpoint_every = 100
[sample]
steps = 2
n = 4
"""


@pytest.fixture
def recipe(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(24):
        Image.fromarray((torch.rand(8, 8, generator=g) * 255).byte().numpy(), "L").save(folder / f"{i:02d}.png")
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(CONFIG.format(data=folder))
    return cfg


def run(procs, *args):
    """`nanosd train ...` alone, or under torchrun with `procs` processes (gloo)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-port",
                str(29500 + os.getpid() % 1000)] if procs > 1 else [sys.executable]
    for attempt in (1, 2):
        out = subprocess.run(launcher + ["-m", "nanosd", "train", *map(str, args)], env=env, capture_output=True,
                             text=True, timeout=300)
        # a rare abort of one rank's process at the very end (about 1 run in 12 under pytest, unexplained so far:
        # see issue #16's note): a new run is made once more from scratch, and must then succeed
        if attempt == 2 or not out.returncode or "--out" not in args or \
                "terminate called without an active exception" not in out.stderr:
            break
        shutil.rmtree(args[args.index("--out") + 1], ignore_errors=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def weights(run_dir):
    return {k: v for k, v in load_tensors(run_dir / "train_state.safetensors").items() if k.startswith("model.")}


def losses(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_a_wall_clock_budget_ends_every_rank_together(recipe, tmp_path):
    run(2, recipe, "--minutes", "0.02", "--out", tmp_path / "timed")  # rank 0's clock, broadcast each step
    log = losses(tmp_path / "timed")
    assert log and log[-1]["elapsed_s"] >= 1.2 and all(r["world_size"] == 2 for r in log)


def test_n_processes_take_the_steps_of_one_accumulating_and_a_run_resumes_with_another_number(recipe, tmp_path):
    run(2, recipe, "--steps", 12, "--out", tmp_path / "two")
    run(1, recipe, "--steps", 12, "--out", tmp_path / "one")
    two, one = ([r["loss"] for r in losses(tmp_path / p)] for p in ("two", "one"))
    assert len(two) == len(one) == 12
    assert two == pytest.approx(one, rel=1e-5)  # the same images, draws and steps (here even bit for bit)
    a, b = weights(tmp_path / "two"), weights(tmp_path / "one")  # N processes take one accumulating process's steps
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert losses(tmp_path / "two")[0]["world_size"] == 2 and losses(tmp_path / "one")[0]["world_size"] == 1
    # a constant learning rate: a cosine schedule follows each run's own budget
    run(1, recipe, "--steps", 12, "--out", tmp_path / "whole", "train.lr_decay=constant")
    run(2, recipe, "--steps", 6, "--out", tmp_path / "resumed", "train.lr_decay=constant")
    run(1, tmp_path / "resumed", "--steps", 12)  # resumed by one process
    whole, resumed = ([r["loss"] for r in losses(tmp_path / p)] for p in ("whole", "resumed"))
    assert len(resumed) == 12 and resumed == pytest.approx(whole, rel=1e-5)
    a, b = weights(tmp_path / "resumed"), weights(tmp_path / "whole")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_shards_written_from_a_folder_read_back_by_two_ranks_and_resumed(tmp_path, recipe):
    from nanosd.cli import main
    from nanosd.data import load_dataset
    from nanosd.shards import ShardSet
    from nanosd.train import Trainer
    from nanosd.config import TrainConfig

    folder = recipe.parent / "images"
    for i in range(24):  # captions beside the images
        (folder / f"{i:02d}.txt").write_text(f"picture {i}")
    assert main(["data", "shard", str(folder), str(tmp_path / "shards"), "--shard-size", "5", "--size", "8"]) == 0
    assert sorted(p.name for p in (tmp_path / "shards").glob("*.tar")) == [f"shard-{i:06d}.tar" for i in range(5)]
    shards, images = ShardSet(tmp_path / "shards"), load_dataset(str(folder), 8)
    assert isinstance(load_dataset(str(tmp_path / "shards"), 8), ShardSet) and len(shards) == 24
    every = shards.take(range(24))
    torch.testing.assert_close(every["image"], images.images, atol=1 / 255, rtol=0)  # PNG round trip
    assert every["captions"] == [[f"picture {i}"] for i in range(24)]

    cfg = TrainConfig(batch_size=8, micro_batch=4, steps=3)
    seen = {}
    for rank in (0, 1):  # each rank's share of each step's batch, as the trainer asks for it
        t = Trainer.__new__(Trainer)
        t.data, t.cfg, t.device = shards, cfg, torch.device("cpu")
        seen[rank] = [t.batch(step, rank * 4, rank * 4 + 4)["captions"] for step in range(3)]
    flat = [c[0] for rank in (0, 1) for step in seen[rank] for c in step]
    assert sorted(flat) == sorted(f"picture {i}" for i in range(24))  # one epoch: no overlap, nothing lost
    # a resumed run asks for the same samples at the same step
    t2 = Trainer.__new__(Trainer)
    t2.data, t2.cfg, t2.device = ShardSet(tmp_path / "shards"), cfg, torch.device("cpu")
    assert t2.batch(1, 4, 8)["captions"] == seen[1][1]
    # training on the shards under torchrun, and resuming with one process
    shard_cfg = tmp_path / "shard.toml"
    shard_cfg.write_text(recipe.read_text().replace(str(folder), str(tmp_path / "shards")))
    run(2, shard_cfg, "--steps", 2, "--out", tmp_path / "run")
    run(1, tmp_path / "run", "--steps", 4)
    assert len(losses(tmp_path / "run")) == 4


def test_latents_stored_in_shards_replace_encoding(tmp_path, recipe, monkeypatch):
    from nanosd.cli import main
    import nanosd.recipes as train_module

    folder = recipe.parent / "images"
    latent_cfg = tmp_path / "latent.toml"
    latent_cfg.write_text(recipe.read_text().replace("[train]", "[autoencoder]\nch = 32\nch_mult = [1, 2]\n"
                                                                "z_channels = 4\n[autoencoder_train]\nsteps = 2\n"
                                                                "batch_size = 8\nsample_every = 0\n[train]"))
    assert main(["train", str(latent_cfg), "--steps", "1", "--out", str(tmp_path / "first")]) == 0
    assert main(["data", "shard", str(folder), str(tmp_path / "shards"), "--size", "8",
                 "--autoencoder", str(tmp_path / "first")]) == 0
    shard_cfg = tmp_path / "on-shards.toml"
    shard_cfg.write_text(latent_cfg.read_text().replace(str(folder), str(tmp_path / "shards")))
    monkeypatch.setattr(train_module, "encode_dataset", lambda *a, **k: pytest.fail("encoded again"))
    assert main(["train", str(shard_cfg), "--steps", "2", "--out", str(tmp_path / "second"),
                 "--autoencoder", str(tmp_path / "first")]) == 0
    assert len(losses(tmp_path / "second")) == 2


def test_a_lora_trains_under_torchrun_as_in_one_process(recipe, tmp_path):
    """A LoRA on a frozen run (lora.base): two processes take the same steps as one accumulating, and both write
    the same kohya file."""
    run(1, recipe, "--steps", 2, "--out", tmp_path / "base")
    lora = tmp_path / "lora.toml"
    lora.write_text(recipe.read_text().split("[unet]")[0] + f'[lora]\nbase = "{tmp_path / "base"}"\nrank = 2\n'
                    + "[train]" + recipe.read_text().split("[train]")[1])
    run(2, lora, "--steps", 3, "--out", tmp_path / "two")
    run(1, lora, "--steps", 3, "--out", tmp_path / "one")
    a, b = (load_tensors(tmp_path / p / "lora.safetensors") for p in ("two", "one"))
    assert a.keys() == b.keys() and any(k.endswith("lora_up.weight") and v.abs().max() > 0 for k, v in a.items())
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert losses(tmp_path / "two")[0]["world_size"] == 2


def test_a_controlnet_trains_under_torchrun_and_resumes_as_in_one_process(recipe, tmp_path):
    """A ControlNet on a frozen run (controlnet.base, canny controls of the images): two processes for three steps
    write the ControlNet that one process writes in two steps and then, resumed, a third."""
    run(1, recipe, "--steps", 2, "--out", tmp_path / "base")
    control = tmp_path / "control.toml"
    control.write_text(recipe.read_text().split("[unet]")[0] + f'[controlnet]\nbase = "{tmp_path / "base"}"\n'
                       + "[train]" + recipe.read_text().split("[train]")[1])
    run(2, control, "--steps", 3, "--out", tmp_path / "two", "train.lr_decay=constant")
    run(1, control, "--steps", 2, "--out", tmp_path / "one", "train.lr_decay=constant")  # the same schedule
    run(1, tmp_path / "one", "--steps", 3)
    a, b = (load_tensors(tmp_path / p / "controlnet.safetensors") for p in ("two", "one"))
    assert a.keys() == b.keys() and a["control_model.middle_block_out.0.weight"].abs().max() > 0  # it learned
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert (tmp_path / "two" / "controlnet" / "config.json").is_file()


def _rank_trains_in(rank, port, out, picks):
    """One torchrun-like rank whose own CPU test says picks[rank]: which arithmetic its Trainer takes."""
    import nanosd.train as train
    from nanosd.config import TrainConfig, UNetConfig
    from nanosd.unet import UNet

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    train.choose_precision = lambda device=None: (picks[rank], "this rank's measurement")
    unet = UNet(UNetConfig(model_channels=32, channel_mult=[1], num_res_blocks=1, attention_levels=[]))
    trainer = train.Trainer(out / str(rank), unet, None, list(range(8)), TrainConfig(batch_size=8, steps=1))
    (out / f"{rank}.txt").write_text(str(trainer.bf16))
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("picks,want", [(("bf16", "fp32"), "False"), (("bf16", "bf16"), "True")])
def test_ranks_that_choose_differently_train_in_one_arithmetic(tmp_path, picks, want):
    """train.bf16 = auto under torchrun: bf16 autocast only if every rank's CPU chose it (else gradients would
    average across arithmetics)."""
    torch.multiprocessing.spawn(_rank_trains_in, (29000 + os.getpid() % 500, tmp_path, picks), nprocs=2)
    assert [(tmp_path / f"{r}.txt").read_text() for r in (0, 1)] == [want, want]
