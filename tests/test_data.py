"""Training data as people have it: tar shards written the way img2dataset writes them (KEY.jpg / KEY.webp,
KEY.txt, KEY.json; images of many sizes; no index; a corrupt sample), made here by the webdataset package, streamed
from folders, brace patterns and pipe: URLs; and the shards nanosd writes, read by the webdataset package."""
import io
import itertools
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

import nanosd
from nanosd.cli import main
from nanosd.io import load_tensors, read_metadata
from nanosd.shards import StreamSet, bucket_sizes, fit_image
from test_distributed import CONFIG, run as torchrun

wds = pytest.importorskip("webdataset")

SIZES = [(40, 24), (16, 16), (24, 48), (64, 32), (20, 20)]  # (width, height)
CORRUPT = 7



def tiny(data, extra=""):
    """test_distributed's tiny recipe at 16 px on `data`, checkpointed every 2 steps."""
    return CONFIG.format(data=data).replace("size = 8", f"size = 16\n{extra}", 1).replace("checkpoint_every = 100",
                                                                                        "checkpoint_every = 2")


def img2dataset_shards(folder, n=30, per_shard=10, size_of=lambda i: SIZES[i % len(SIZES)]):
    """n samples in shards of per_shard: JPEG (and every third WebP) of mixed sizes, a caption in KEY.txt and in
    KEY.json as img2dataset writes it; sample CORRUPT's image is not an image."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(n):
            w, h = size_of(i)
            b = io.BytesIO()
            Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(b, format="WEBP" if i % 3 == 0 else "JPEG")
            sink.write({"__key__": f"{i:09d}", "webp" if i % 3 == 0 else "jpg": b"not an image" if i == CORRUPT else b.getvalue(),
                        "txt": f"caption {i}", "json": json.dumps({"caption": f"caption {i}", "width": w, "height": h,
                                                                    "status": "success"}).encode()})
    return folder


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_img2dataset_shards_train_with_buckets_resume_and_stream_through_pipe(tmp_path, capsys):
    shards = img2dataset_shards(tmp_path / "i2d")
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(tiny(shards, "buckets = true"))
    assert main(["train", str(cfg), "--steps", "4", "--out", str(tmp_path / "run")]) == 0  # 32 samples: one epoch
    log = metrics(tmp_path / "run")
    assert len(log) == 4 and log[-1]["skipped_samples"] == 1 and log[-1]["unreadable_shards"] == 0
    assert "skipping undecodable samples (first: 000000007" in capsys.readouterr().out
    assert json.loads(read_metadata(tmp_path / "run" / "train_state.safetensors")["stream"])["per_shard"] > 0
    assert main(["train", str(tmp_path / "run"), "--steps", "6"]) == 0  # resumed: the streams skip what was read
    assert "the shard streams restart after the 3 shards read in 4 steps" in capsys.readouterr().out
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]
    # the same shards through a brace pattern of pipe: URLs (what streaming from object storage looks like)
    cfg.write_text(tiny(f"pipe:cat {shards}/{{00000..00002}}.tar", 'crop = "random"'))
    assert main(["train", str(cfg), "--steps", "2", "--out", str(tmp_path / "piped")]) == 0
    assert len(metrics(tmp_path / "piped")) == 2
    assert nanosd.load(tmp_path / "piped").generate(batch_size=1, steps=2, output="tensor").images.shape == (1, 3, 16, 16)


def test_streams_resize_crop_and_bucket_any_size(tmp_path):
    shards = img2dataset_shards(tmp_path / "i2d", n=10)
    square = StreamSet(shards, 16, shuffle=0)
    first = square.preview(5)
    assert first["image"].shape == (5, 3, 16, 16) and first["captions"][0] == ["caption 0"]
    assert first["image"].min() >= -1 and first["image"].max() <= 1
    buckets = bucket_sizes(16, 8)
    assert (16, 16) in buckets and all(h * w <= 256 and h % 8 == 0 == w % 8 for h, w in buckets)
    bucketed = StreamSet(shards, 16, buckets=True, multiple=8, shuffle=0)
    bucketed.open(0, 1, 0)
    shapes = set()
    for _ in range(3):  # each batch one bucket, the one nearest to its images' own aspect ratio
        batch = bucketed.next(2)
        h, w = batch["image"].shape[-2:]
        shapes.add((h, w))
        for caption in batch["captions"]:
            ow, oh = SIZES[int(caption[0].split()[1]) % len(SIZES)]
            assert (h, w) == min(buckets, key=lambda b: abs(np.log(b[0] / b[1]) - np.log(oh / ow)))
    assert len(shapes) > 1
    # a wide image centre-cropped: its middle columns survive
    wide = Image.new("RGB", (64, 16), "black")
    wide.paste((255, 255, 255), (28, 0, 36, 16))  # the middle 8 of 64 columns
    x = fit_image(wide, (16, 16), 3, "center", random.Random(0))
    assert x[:, :, 5:11].min() > 0.9 and x[:, :, :3].max() < -0.9 and x[:, :, 13:].max() < -0.9


def test_ranks_read_disjoint_samples_covering_the_set_and_unreadable_shards_are_named(tmp_path, capsys):
    shards = img2dataset_shards(tmp_path / "i2d", n=40)
    (shards / "00004.tar").write_bytes(b"\0" * 100 + b"garbage")  # a shard that is not a tar file
    s = StreamSet(shards, 16)
    keys = {}
    for rank in (0, 1):  # one epoch: 5 shards in an order from the seed, rank r takes every other one
        mine = s._samples(rank, 2, seed=3, done=0)
        keys[rank] = [x["__key__"] for x in itertools.islice(mine, 20)]
        next(mine)  # into the next epoch: past the unreadable shard wherever it was
    assert not set(keys[0]) & set(keys[1]) and set(keys[0]) | set(keys[1]) == {f"{i:09d}" for i in range(40)}
    assert s.bad_shards == [str(shards / "00004.tar")]
    assert f"shard {shards / '00004.tar'} is unreadable" in capsys.readouterr().out
    one = StreamSet(f"{shards}/00000.tar", 16)  # fewer shards than ranks: the samples are split
    split = [[x["__key__"] for x in itertools.islice(one._samples(r, 3, 0, 0), 3)] for r in range(3)]
    assert sorted(sum(split, [])) == [f"{i:09d}" for i in range(9)] and split[1][:2] == ["000000001", "000000004"]
    # a resumed stream starts after the shards its samples came from
    assert s.open(0, 2, seed=3, consumed=25, state={"per_shard": 10.0}) == 2
    with pytest.raises(FileNotFoundError, match="shard .*missing.tar not found"):
        StreamSet(f"{shards}/missing.tar", 16)


def test_nanosd_shards_are_read_by_webdataset_with_every_field(tmp_path):
    from nanosd.data import ImageSet
    from nanosd.shards import write_shards

    g = torch.Generator().manual_seed(0)
    images = torch.rand(5, 3, 8, 8, generator=g) * 2 - 1
    data = ImageSet(images, torch.arange(5), ["a", "b", "c", "d", "e"], [[f"cap {i}", f"alt {i}"] for i in range(5)])
    out, count = write_shards([data.take(torch.arange(0, 3)), data.take(torch.arange(3, 5))], tmp_path / "s", 2,
                              classes=data.classes, encode=lambda x: x[:, :2, ::2, ::2] * 2, autoencoder_key="k")
    assert count == 5 and json.loads((out / "index.json").read_text())["latent"] == {"autoencoder": "k", "shape": [2, 4, 4]}
    read = list(wds.WebDataset(str(out / "shard-{000000..000002}.tar"), shardshuffle=False).decode("rgb"))
    assert [r["__key__"] for r in read] == [f"{i:08d}" for i in range(5)]
    for i, r in enumerate(read):
        assert set(r) >= {"png", "txt", "cls", "json", "latent.npy"}
        assert r["txt"] == f"cap {i}\nalt {i}" and r["cls"] == i and r["json"]["caption"] == f"cap {i}"
        assert r["json"]["autoencoder"] == "k" and (r["json"]["width"], r["json"]["height"]) == (8, 8)
        torch.testing.assert_close(torch.from_numpy(r["png"]).permute(2, 0, 1) * 2 - 1, images[i], atol=1 / 127, rtol=0)
        torch.testing.assert_close(torch.from_numpy(r["latent.npy"]), images[i, :2, ::2, ::2] * 2)


def test_gradient_checkpointing_gives_the_same_gradients_with_and_without_a_lora():
    from nanosd.unet import UNet, UNetConfig

    torch.manual_seed(0)
    unet = UNet(UNetConfig(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1],
                           num_heads=2, in_channels=3))
    torch.nn.init.normal_(unet.out[2].weight, std=0.1)  # the zero-initialised output would hide everything
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 500])
    block, calls = unet.input_blocks[1], []
    forward = block.forward
    block.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    grads, runs = [], []
    for checkpointing in (False, True):
        unet.zero_grad()
        unet.checkpointing, calls[:] = checkpointing, []
        unet(x, t).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters()]))
        runs.append(len(calls))
    assert runs == [1, 2] and grads[0].abs().max() > 0  # recomputed in the backward pass, to the same gradients
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)
    # a LoRA on the frozen U-Net: its deltas are active again when the blocks are recomputed
    from nanosd.adapters import LoraUNet

    lora = LoraUNet(unet, rank=2, alpha=2.0)
    for p in lora.up.values():
        torch.nn.init.normal_(p, std=0.1)
    grads = []
    for checkpointing in (False, True):
        lora.zero_grad()
        unet.checkpointing = checkpointing
        lora(x, t).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in lora.parameters()]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_an_sd_model_fine_tunes_from_shards_with_its_vae_latents_stored_ahead(tmp_path, monkeypatch):
    """init = an SD folder: `nanosd data shard` stores its VAE's latents beside img2dataset images (resized and
    cropped to 32 px); the fine-tune streams them through pipe: without running the encoder, with gradient
    checkpointing; the run loads as its base with the learned U-Net, and resumes under torchrun."""
    pytest.importorskip("diffusers")
    from test_sd import tiny_reference

    from nanosd.autoencoder import Autoencoder
    from nanosd.config import load_config
    from nanosd.recipes import train

    _, sd = tiny_reference(tmp_path)
    src = img2dataset_shards(tmp_path / "i2d", n=12, per_shard=6)
    assert main(["data", "shard", str(src), str(tmp_path / "pre"), "--size", "32", "--shard-size", "5",
                 "--autoencoder", str(sd)]) == 0
    sample = next(iter(wds.WebDataset(str(tmp_path / "pre" / "shard-000000.tar"), shardshuffle=False).decode("rgb")))
    assert sample["latent.npy"].shape == (4, 16, 16) and sample["png"].shape == (32, 32, 3)  # f = 2 VAE
    data = f"pipe:cat {tmp_path / 'pre'}/shard-{{000000..000002}}.tar"
    values = {"init": str(sd), "data": {"name": data, "size": 32},
              "train": {"batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "steps": 2, "sample_every": 0,
                        "checkpoint_every": 100, "checkpointing": True, "log_every": 1},
              "sample": {"steps": 2, "n": 2}}
    monkeypatch.setattr(Autoencoder, "encode", lambda *a: pytest.fail("the stored latents were encoded again"))
    run = train(load_config(values=values), tmp_path / "tuned")
    monkeypatch.undo()
    learned = load_tensors(run / "model.safetensors")
    assert learned and all(k.startswith("unet.") for k in learned)  # the frozen CLIP is not written again
    assert not any(k.startswith(("model.conditioner", "ema.conditioner")) for k in load_tensors(run / "train_state.safetensors"))
    base, tuned = nanosd.load(sd), nanosd.load(run)
    kw = dict(steps=2, seed=0, height=32, width=32, output="tensor")
    assert (tuned.generate("a cat", **kw).images - base.generate("a cat", **kw).images).abs().max() > 1e-4
    assert (tmp_path / "tuned" / "samples.png").is_file()
    assert main(["convert", str(run), str(tmp_path / "tuned.safetensors")]) == 0  # one file for A1111
    one = nanosd.load(tmp_path / "tuned.safetensors", config=sd)
    torch.testing.assert_close(one.generate("a cat", **kw).images, tuned.generate("a cat", **kw).images, atol=1e-5, rtol=0)
    cfg = tmp_path / "tune.toml"  # under torchrun, and resumed by one process
    cfg.write_text(f'init = "{sd}"\n' + "\n".join(
        f"[{name}]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in table.items())
        for name, table in values.items() if isinstance(table, dict)))
    torchrun(2, cfg, "--steps", 2, "--out", tmp_path / "two")
    torchrun(1, tmp_path / "two", "--steps", 3)
    assert [r["step"] for r in metrics(tmp_path / "two") if "loss" in r] == [1, 2, 3]
