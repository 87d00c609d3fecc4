"""Spatial conditions concatenated to z_t: inpainting, edge maps, super-resolution, end to end on tiny models."""
import pytest
import torch
from PIL import Image

from nanosd import load
from nanosd.cli import main
from nanosd.condition import ConditionConfig, edge_map, random_masks
from nanosd.data import ImageSet
from nanosd.metrics import evaluate_concat
from nanosd.recipes import train


@pytest.fixture
def data(monkeypatch):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(32, 1, 8, 8, generator=g) * 2 - 1
    ds = ImageSet(images, torch.arange(32) % 2, ["cat", "dog"], [[c] for c in ["cat", "dog"] * 16])
    for module in ("nanosd.recipes", "nanosd.metrics"):
        monkeypatch.setattr(f"{module}.load_dataset", lambda *a, **k: ds)
    return ds


def test_random_masks_and_edge_maps():
    g = torch.Generator().manual_seed(0)
    m = random_masks((200, 1, 16, 16), g)
    share = m.mean(dim=(1, 2, 3))
    assert set(m.unique().tolist()) <= {0.0, 1.0} and share.min() >= 0.25 ** 2 - 1e-6
    assert 5 <= (share == 1).sum() <= 40 and ((share > 0.05) & (share < 0.6)).sum() > 100
    x = -torch.ones(1, 1, 16, 16)
    x[..., 4:12, 4:12] = 1  # a white square: edges on its border only
    e = edge_map(x)[0, 0]
    assert e[8, 8] == 0 and e[0, 0] == 0 and e[4, 8] == 1 and e[8, 11] == 1


@pytest.mark.parametrize("concat,encoder,latent", [("inpaint", "none", False), ("inpaint", "clip", True),
                                                    ("edges", "none", False), ("lowres", "none", True)])
def test_concat_modes_end_to_end(tmp_path, tiny_cfg, data, concat, encoder, latent):
    from nanosd.text import CLIPTextConfig

    tiny_cfg.condition = ConditionConfig(encoder=encoder, concat=concat, sr_factor=2 if latent else 4,
                                         clip=CLIPTextConfig(width=32, layers=1, heads=2, max_length=8))
    tiny_cfg.sample.prompts = ["cat"]
    if latent:
        from nanosd.config import load_config

        tiny_cfg.autoencoder = load_config(values={"data": {"size": 8}, "autoencoder": {"ch": 32, "ch_mult": [1, 2], "z_channels": 3}}).autoencoder
        tiny_cfg.autoencoder_train = load_config(values={"train": {"steps": 2, "batch_size": 8, "sample_every": 0}}).train
    run = train(tiny_cfg, tmp_path / "run", steps=3)
    pipe = load(run)
    prompt = "cat" if encoder != "none" else None
    image = torch.rand(1, 8, 8)
    small = torch.rand(1, 8 // tiny_cfg.condition.sr_factor, 8 // tiny_cfg.condition.sr_factor)
    mask = torch.zeros(1, 8, 8)
    mask[:, 2:6, 2:6] = 1
    kw = {"inpaint": {"image": image, "mask": mask}, "edges": {"image": (image > 0.5).float()},
          "lowres": {"image": small}}[concat]
    out = pipe.generate(prompt, batch_size=2, seed=0, output="tensor", **kw).images
    assert out.shape == (2, 1, 8, 8)
    if concat == "inpaint":  # blended after each step, the latent cells wholly outside the hole stay as encoded
        pipe.cfg.sample.inpaint_blend = True
        z = pipe.generate(prompt, batch_size=2, seed=0, output="latent", **kw).images
        known = pipe.to_model_space(image[None] * 2 - 1, torch.Generator().manual_seed(0))  # the first draw
        f = pipe.factor_ae
        keep = torch.ones(8 // f, 8 // f, dtype=torch.bool)
        keep[2 // f:6 // f, 2 // f:6 // f] = False
        torch.testing.assert_close(z[..., keep], known.expand_as(z)[..., keep])
        assert not torch.allclose(z[..., ~keep], known.expand_as(z)[..., ~keep])
        pipe.cfg.sample.inpaint_blend = False
        pasted = pipe.inpaint(image, mask, prompt, batch_size=2, seed=0, output="tensor", overlay=True).images
        kept = (mask == 0).expand_as(out[0])
        torch.testing.assert_close(pasted[:, kept], image[kept].expand(2, -1))  # A1111's overlay: the image's own
        torch.testing.assert_close(pasted[:, ~kept], out[:, ~kept])  # and the same fill
    other = dict(kw, image=torch.rand_like(kw["image"]))
    assert not torch.allclose(out, pipe.generate(prompt, batch_size=2, seed=0, output="tensor", **other).images)

    files = {}
    for name, t in kw.items():
        files[name] = tmp_path / f"{name}.png"
        Image.fromarray((t[0] * 255).byte().numpy()).save(files[name])
    cmd = {"inpaint": ["inpaint", str(run), str(files["image"]), str(files.get("mask"))],
           "edges": ["generate", str(run), "--image", str(files["image"])],
           "lowres": ["upscale", str(run), str(files["image"])]}[concat]
    assert main(cmd + ([prompt] if prompt else []) + ["--n", "2", "--steps", "2", "--out", str(tmp_path / "o.png")]
                + (["--overlay"] if concat == "inpaint" else [])) == 0
    assert Image.open(tmp_path / "o.png").size[0] > 8
    scores = evaluate_concat(run, n=6, batch=4)
    assert set(scores) == {"inpaint": {"kept_mae", "autoencoder_kept_mae", "hole_mae"}, "edges": {"edge_f1"},
                           "lowres": {"psnr", "bicubic_psnr"}}[concat]
    assert all(v == v for v in scores.values())  # finite numbers, not NaN


def test_bad_spatial_conditions_get_one_line_errors(tmp_path, tiny_cfg, data, capsys):
    tiny_cfg.condition = ConditionConfig(encoder="none", concat="inpaint")
    run = train(tiny_cfg, tmp_path / "run", steps=1)
    capsys.readouterr()  # the training progress
    img, odd = tmp_path / "img.png", tmp_path / "odd.png"
    Image.new("L", (8, 8)).save(img), Image.new("L", (5, 5)).save(odd)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="give a mask of the image's size"):
        load(run).inpaint(torch.rand(1, 8, 8), torch.rand(1, 4, 4), steps=2)
    cases = [(["inpaint", str(run), str(odd), str(odd)], "is not divisible by the model's factor"),
             (["inpaint", str(run), str(img), str(tmp_path / "junk.png")], "cannot read the image"),
             (["generate", str(run)], "give an image and a mask"),
             (["inpaint", str(run), str(img), str(img), "a cat"], "without text or labels")]
    for args, words in cases:
        assert main(args + ["--out", str(tmp_path / "o.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
    tiny_cfg.condition = None
    plain = train(tiny_cfg, tmp_path / "plain", steps=1)
    capsys.readouterr()
    assert main(["generate", str(plain), "--image", str(img), "--out", str(tmp_path / "o.png")]) == 2
    assert "without a spatial condition" in capsys.readouterr().err
