import copy

import numpy as np
import pytest
import torch

from nanosd import load
from nanosd.autoencoder import Autoencoder, AutoencoderConfig, AutoencoderLoss, DiagonalGaussian, psnr, ssim
from nanosd.cli import main
from nanosd.config import load_config
from nanosd.recipes import encode_dataset, train

from test_train import image_folder  # noqa: F401  (fixture)


@pytest.mark.parametrize("ch_mult, f", [([1, 2], 2), ([1, 2, 2], 4), ([1, 1, 2, 2], 8)])
def test_encoder_and_decoder_shapes_for_each_factor(ch_mult, f):
    ae = Autoencoder(AutoencoderConfig(in_channels=3, ch=32, ch_mult=ch_mult, z_channels=4))
    assert ae.cfg.factor == f
    x = torch.randn(2, 3, 32, 32)
    post = ae.encode(x)
    assert post.mean.shape == post.std.shape == (2, 4, 32 // f, 32 // f)
    assert ae.decode(post.sample()).shape == x.shape
    with pytest.raises(ValueError, match=f"not divisible by the autoencoder's factor {f}"):
        ae.encode(torch.randn(1, 3, 33, 32))


def test_sd_v1_vae_layout_and_size():
    ae = Autoencoder(AutoencoderConfig(in_channels=3, ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2))
    assert sum(p.numel() for p in ae.parameters()) == 83_653_863
    keys = set(ae.state_dict())
    for k in ["encoder.conv_in.weight", "encoder.down.0.block.1.conv2.weight", "encoder.down.2.downsample.conv.weight",
              "encoder.down.1.block.0.nin_shortcut.weight", "encoder.mid.attn_1.q.weight", "encoder.norm_out.weight",
              "quant_conv.weight", "post_quant_conv.weight", "decoder.up.3.upsample.conv.weight",
              "decoder.up.0.block.2.conv1.weight", "decoder.mid.block_2.norm2.bias", "decoder.conv_out.weight"]:
        assert k in keys, k


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.05)])
def test_decoding_by_bands_of_rows_is_decoding_whole(monkeypatch, dtype, tol):
    """Sampling decodes large images image by image in bands of rows (memory); the same numbers as whole, also
    for odd sizes, several images and channels-last weights."""
    import nanosd.autoencoder as autoencoder

    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderConfig(in_channels=3, ch=32, ch_mult=[1, 2, 2], num_res_blocks=1, norm_groups=8))
    with torch.no_grad():  # a trained autoencoder's norms are not the identity
        for m in ae.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    ae = ae.eval().to(dtype, memory_format=torch.channels_last)
    z = torch.randn(2, 4, 5, 7) * 3 + 1
    with torch.no_grad():
        whole = ae.decode(z).float()
        banded = []
        stats = autoencoder._group_stats
        monkeypatch.setattr(autoencoder, "_group_stats", lambda *a: banded.append(1) or stats(*a))
        for band in (1, 5000):  # one row, and a few rows, per band
            monkeypatch.setattr(autoencoder, "BAND_BYTES", band)
            got = ae.decode(z).float()
            assert got.shape == whole.shape == (2, 3, 20, 28) and banded
            assert (got - whole).abs().max() < tol * whole.abs().max()
    ae.train()  # training takes the whole path (and its gradients)
    assert ae.decode(z.to(dtype)).requires_grad


def test_an_fp16_vae_that_overflows_turns_fp32(capsys):
    """SDXL's VAE overflows fp16 (diffusers' force_upcast, A1111's --no-half-vae): an fp16 autoencoder whose
    decode or encode is not finite turns fp32 and computes again; one that stays finite stays fp16."""
    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderConfig(in_channels=3, ch=32, ch_mult=[1, 2], num_res_blocks=1, norm_groups=8)).eval()
    z, x = torch.randn(1, 4, 4, 4), torch.rand(1, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        fine = copy.deepcopy(ae).half()
        assert torch.isfinite(fine.decode(z)).all() and fine.quant_conv.weight.dtype == torch.float16
        for conv in (ae.decoder.conv_in, ae.encoder.conv_in):  # activations past 65504 on the residual path
            conv.weight.mul_(1e5)
        exact = ae.decode(z), ae.encode(x).mean
        assert all(torch.isfinite(e).all() for e in exact)
        plain = (lambda m: m.decoder(m.post_quant_conv(z.half())), lambda m: m.quant_conv(m.encoder(x.half())))
        for run, unguarded in zip((lambda m: m.decode(z), lambda m: m.encode(x).mean), plain):
            half = copy.deepcopy(ae).half()
            assert not torch.isfinite(unguarded(half)).all()  # fp16 does overflow here
            got = run(half)
            assert half.quant_conv.weight.dtype == torch.float32 and "overflowed in fp16" in capsys.readouterr().err
            assert (got.float() - run(ae)).abs().max() < 1e-3 * run(ae).abs().max()


def test_kl_against_its_closed_form():
    g = torch.Generator().manual_seed(0)
    moments = torch.randn(3, 8, 4, 4, generator=g)
    post = DiagonalGaussian(moments)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(post.mean, post.std),
                                            torch.distributions.Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(post.kl(), ref, rtol=1e-5, atol=1e-5)
    zero = DiagonalGaussian(torch.zeros(1, 8, 2, 2))
    assert zero.kl().item() == 0.0 and torch.equal(zero.mode(), zero.mean)


def test_psnr_and_ssim():
    a = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert ssim(a, a).allclose(torch.ones(2)) and psnr(a, a).min() > 90
    noisy = (a + 0.1 * torch.randn(a.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert 15 < psnr(a, noisy).mean() < 25 and ssim(a, noisy).mean() < 0.95


def test_discriminator_learns_only_from_its_own_loss():
    cfg = AutoencoderConfig(in_channels=1, ch=32, ch_mult=[1, 2], disc_weight=0.5, disc_start=0)
    ae, loss = Autoencoder(cfg), AutoencoderLoss(cfg)
    x = {"image": torch.rand(4, 1, 16, 16) * 2 - 1}
    terms = loss(ae, x, torch.Generator().manual_seed(0), step=0)
    assert {"rec", "kl", "g", "d", "loss"} <= set(terms)
    terms["loss"].backward()
    combined = [p.grad.clone() for p in loss.discriminator.parameters()]
    loss.zero_grad(), ae.zero_grad()
    loss(ae, x, torch.Generator().manual_seed(0), step=0)["d"].backward()
    for a, b in zip(combined, (p.grad for p in loss.discriminator.parameters())):
        torch.testing.assert_close(a, b)
    assert ae.decoder.conv_out.weight.grad is None  # the critic's loss does not reach the autoencoder


@pytest.fixture
def latent_cfg(image_folder):  # noqa: F811
    return load_config(values={
        "data": {"name": str(image_folder), "size": 8},
        "autoencoder": {"ch": 32, "ch_mult": [1, 2], "z_channels": 3},
        "autoencoder_train": {"batch_size": 8, "steps": 4, "sample_every": 0, "warmup_steps": 1},
        "unet": {"model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
                 "num_heads": 2},
        "train": {"batch_size": 8, "steps": 3, "sample_every": 0, "log_every": 1},
        "sample": {"steps": 4, "n": 4},
    })


def test_tiny_autoencoder_then_latent_diffusion_end_to_end(tmp_path, latent_cfg, capsys):
    run = train(latent_cfg, tmp_path / "run")
    assert (run / "autoencoder" / "model.safetensors").exists() and (run / "autoencoder" / "reconstructions.png").exists()
    pipe = load(run)
    assert pipe.autoencoder is not None and pipe.cfg.unet.in_channels == 3
    assert pipe.generate(batch_size=2, seed=0, output="latent").images.shape == (2, 3, 4, 4)
    assert pipe.generate(batch_size=2, seed=0, output="tensor").images.shape == (2, 1, 8, 8)
    # the latent cache round trip, and the scale factor
    from nanosd.data import load_dataset

    data = load_dataset(latent_cfg.data.name, 8)
    z1 = encode_dataset(pipe.autoencoder, data, run / "autoencoder", pipe.cfg)
    z2 = encode_dataset(pipe.autoencoder, data, run / "autoencoder", pipe.cfg)
    assert torch.equal(z1, z2) and z1.shape == (24, 3, 4, 4)
    assert pipe.cfg.diffusion.scale_factor == pytest.approx(1 / z1.std().item(), rel=1e-4)
    assert (z1 * pipe.cfg.diffusion.scale_factor).std().item() == pytest.approx(1.0, rel=1e-4)
    # --autoencoder reuses it; the new run records a copy
    other = tmp_path / "cfg.toml"
    from nanosd.config import dump_config

    other.write_text(dump_config(latent_cfg))
    assert main(["train", str(other), "--out", str(tmp_path / "reuse"), "--autoencoder", str(run), "--steps", "2"]) == 0
    assert (tmp_path / "reuse" / "autoencoder" / "model.safetensors").read_bytes() == \
        (run / "autoencoder" / "model.safetensors").read_bytes()
    assert main(["generate", str(tmp_path / "reuse"), "--n", "2", "--out", str(tmp_path / "g.png")]) == 0


def test_a_missing_or_mismatched_autoencoder_is_named(tmp_path, latent_cfg, capsys):
    run = train(latent_cfg, tmp_path / "run")
    capsys.readouterr()  # drop the training's progress bars
    cfg_file = run / "autoencoder" / "config.toml"
    cfg_file.write_text(cfg_file.read_text().replace("z_channels = 3", "z_channels = 5"))
    assert main(["generate", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"latent model {run}: its autoencoder {run / 'autoencoder'} does not match" in err and err.count("\n") == 1
    (run / "autoencoder" / "model.safetensors").unlink()
    assert main(["generate", str(run)]) == 2
    err = capsys.readouterr().err
    assert "its autoencoder" in err and "is missing" in err


def test_frechet_distance_is_zero_on_itself_and_invariant_to_shared_moves():
    from nanosd.fid import frechet_distance, statistics

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 16)), rng.normal(loc=0.3, size=(500, 16)) * 1.5
    assert abs(frechet_distance(*statistics(a), *statistics(a))) < 1e-6
    d = frechet_distance(*statistics(a), *statistics(b))
    assert d > 1
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))  # a rotation and a shift applied to both sets
    assert frechet_distance(*statistics(a @ q + 5), *statistics(b @ q + 5)) == pytest.approx(d, rel=1e-6)
    assert frechet_distance(*statistics(b), *statistics(a)) == pytest.approx(d, rel=1e-6)
    # |mu1 - mu2|^2 when only the means differ
    assert frechet_distance(*statistics(a), *statistics(a + 0.5)) == pytest.approx(16 * 0.25, rel=1e-6)


def test_fid_with_the_inception_network(tmp_path):
    from nanosd.fid import features, fid

    g = torch.Generator().manual_seed(0)
    images = torch.rand(8, 1, 28, 28, generator=g)
    f = features(images)
    assert f.shape == (8, 2048) and np.isfinite(f).all()
    assert np.allclose(f, features(images.expand(-1, 3, -1, -1)))  # gray is RGB with equal channels
    same = fid(images, images)
    assert abs(same) < 1e-3 and fid(images, torch.rand(8, 1, 28, 28, generator=g) * 0.2) > same + 1
