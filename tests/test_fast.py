"""Speed: precision="auto", and the options that do less work per image (cfg_end, DeepCache, ToMe, the tiny
decoder, the fast preset), each against the exact path on tiny models."""
import platform
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
from PIL import Image

import nanosd
from nanosd import fast
from nanosd.autoencoder import TinyDecoder
from nanosd.cli import main
from nanosd.images import read_parameters
from nanosd.recipes import distill_tiny_decoder, train
from nanosd.request import FAST, Request, from_infotext

from test_latent import latent_cfg  # noqa: F401  (fixture)
from test_server import model  # noqa: F401  (fixture: a tiny text-conditioned run)
from test_train import image_folder  # noqa: F401  (fixture)

OFF = dict(cfg_end=1.0, cache_interval=1, cache_depth=None, tome=0.0, decoder="full")


@pytest.fixture(scope="module")
def pipe(model):  # noqa: F811
    """The tiny run with its zero-initialised layers (after one step: still near zero) given random weights, so that
    the prompt and every block matter."""
    pipe = nanosd.load(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            if p.abs().max() < 1e-2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return pipe


@contextmanager
def calls(part, dim=0):
    """The sizes (batch, or tokens with dim=1) of the inputs a module ran on, while the block runs."""
    seen = []
    hook = part.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[dim]))
    try:
        yield seen
    finally:
        hook.remove()


def test_every_option_is_off_by_default_and_written_only_when_on(pipe):
    r = Request("a cat", steps=4, seed=0).resolve(pipe)
    assert {k: getattr(r, k) for k in OFF} == OFF
    for key in ("CFG end", "DeepCache", "Token merging", "Decoder"):
        assert key not in r.infotext()
    on = Request("a cat", steps=4, seed=0, cfg_end=0.5, cache_interval=2, tome=0.25).resolve(pipe)
    text = on.infotext()
    assert "CFG end: 0.5" in text and "DeepCache interval: 2, DeepCache depth: 1" in text
    assert "Token merging ratio: 0.25" in text  # A1111's key
    fields, rest = from_infotext(text)
    assert (fields["cfg_end"], fields["cache_interval"], fields["cache_depth"], fields["tome"]) == (0.5, 2, 1, 0.25)
    assert not rest and on.resolve(pipe) == on  # resolving again changes nothing


def test_cfg_end_stops_guidance_after_its_fraction_of_the_steps(pipe):
    kw = dict(prompt="a cat", steps=6, seed=3, cfg_scale=4.0, output="tensor")
    path = {}
    with calls(pipe.unet.out) as seen:
        for end in (1.0, 0.5):
            states = []
            out = pipe.generate(**kw, cfg_end=end, callback=lambda i, t, x, x0: states.append(x.clone())).images
            path[end] = states, out
    assert seen == [2] * 6 + [2] * 3 + [1] * 3  # guided: [uncond; cond]; after half the steps the cond half alone
    (exact, a), (ended, b) = path[1.0], path[0.5]
    for i in range(3):  # the guided steps are the exact path's
        assert torch.equal(exact[i], ended[i])
    assert not torch.equal(exact[-1], ended[-1])
    with pytest.raises(ValueError, match="no classifier-free guidance to end"):
        pipe.generate(**dict(kw, cfg_scale=1.0), cfg_end=0.5)
    with pytest.raises(ValueError, match=r"cfg_end is the fraction of steps guided, in \(0, 1\]"):
        pipe.generate(**kw, cfg_end=0)


def test_deepcache_reuses_deep_features_exactly_and_runs_the_shallow_blocks_only(pipe):
    unet, g = pipe.unet, torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 1, 8, 8, generator=g), torch.tensor([500, 500])
    ctx = pipe.conditioner(["a cat", "a dog"])["context"]
    cache = fast.FeatureCache(interval=3, depth=1)
    with torch.no_grad(), calls(unet.middle_block) as middle, calls(unet.input_blocks[1]) as shallow, \
            calls(unet.input_blocks[2]) as deep:
        full = unet(x, t, context=ctx, cache=cache)
        again = unet(x, t, context=ctx, cache=cache)  # the same input: the cached features are exactly its own
        moved = unet(x + 0.5, t, context=ctx, cache=cache)
        fresh = unet(x + 0.5, t, context=ctx)
        unet(x, t, context=ctx, cache=cache)  # the third call of the cache's interval: a full one again
    assert len(middle) == 3 and len(deep) == 3 and len(shallow) == 5  # full, full, full (the uncached call) ...
    assert torch.allclose(full, again, atol=1e-6)
    assert not torch.allclose(moved, fresh, atol=1e-4) and not torch.allclose(moved, full, atol=1e-4)
    # generation: within a bound of the exact path (smaller than what another seed changes), not equal to it
    kw = dict(prompt="a cat", steps=8, seed=1, output="latent")  # this one-step model's images clip to 0 and 1
    exact, cached = (pipe.generate(**kw, **o).images for o in ({}, {"cache_interval": 2}))
    other_seed = pipe.generate(**dict(kw, seed=2)).images
    assert 0 < (cached - exact).abs().mean() < 0.5 * (other_seed - exact).abs().mean()
    with pytest.raises(ValueError, match="cache_depth is DeepCache's: give cache_interval > 1 too"):
        pipe.generate(**kw, cache_depth=1)
    with pytest.raises(ValueError, match="cache_depth from 0 to 3"):
        pipe.generate(**kw, cache_interval=2, cache_depth=4)


def test_token_merging_merges_similar_tokens_and_restores_the_grid():
    g = torch.Generator().manual_seed(0)
    cells = torch.randn(2, 4, 4, 16, generator=g)  # a 8 x 8 grid whose 2 x 2 cells each hold one token 4 times
    x = cells.repeat_interleave(2, 1).repeat_interleave(2, 2).reshape(2, 64, 16)
    tome = fast.TokenMerging(0.75, 64, torch.Generator().manual_seed(1))
    merge, unmerge = tome(x, (8, 8))
    merged = merge(x)
    assert merged.shape == (2, 16, 16)  # 3/4 of the tokens merged into their cell's destination
    assert torch.allclose(unmerge(merged), x, atol=1e-6)  # nothing lost: each merged token equalled its destination
    assert tome(torch.randn(2, 16, 16), (4, 4)) is None  # another resolution: not merged
    half = fast.TokenMerging(0.5, 64, torch.Generator().manual_seed(1))(torch.randn(2, 64, 16, generator=g), (8, 8))
    assert half[0](x).shape == (2, 32, 16)


def test_token_merging_in_the_unet_within_its_bound(pipe):
    kw = dict(prompt="a cat", steps=6, seed=1, output="latent")
    blocks = [m for m in pipe.unet.modules() if isinstance(m, nanosd.unet.BasicTransformerBlock)]
    with calls(blocks[0].attn1, dim=1) as exact_tokens:
        exact = pipe.generate(**kw).images
    with calls(blocks[0].attn1, dim=1) as tokens:
        merged = pipe.generate(**kw, tome=0.5).images
    assert set(exact_tokens) == {16} and set(tokens) == {8}  # this model's only attended level: 4 x 4, half merged
    assert all(b.tome is None for b in blocks)  # for that generation only
    other_seed = pipe.generate(**dict(kw, seed=2)).images
    assert 0 < (merged - exact).abs().mean() < 0.5 * (other_seed - exact).abs().mean()
    with pytest.raises(ValueError, match="tome .* from 0 to 0.75"):
        pipe.generate(**kw, tome=0.9)


def test_the_fast_preset_fills_what_was_not_given(pipe):
    r = Request("a cat", steps=4, seed=0, fast=True).resolve(pipe)
    assert {k: getattr(r, k) for k in OFF} == {**FAST, "decoder": "full"}
    r = Request("a cat", steps=4, seed=0, fast=True, cfg_end=0.8, tome=0.0).resolve(pipe)
    assert (r.cfg_end, r.tome, r.cache_interval) == (0.8, 0.0, FAST["cache_interval"])
    assert Request("a cat", steps=4, seed=0, fast=True, cfg_scale=1.0).resolve(pipe).cfg_end == 1.0  # unguided
    with pytest.raises(ValueError, match="this model has no tiny decoder"):
        pipe.generate("a cat", steps=2, decoder="tiny")


def test_the_cli_writes_and_replays_the_options(model, tmp_path):  # noqa: F811
    out = tmp_path / "a.png"
    assert main(["generate", str(model), "a cat", "--steps", "4", "--seed", "1", "--fast", "--cfg-end", "0.75",
                 "--out", str(out)]) == 0
    text = read_parameters(Image.open(out), out)
    assert "CFG end: 0.75, DeepCache interval: 3, DeepCache depth: 1, Token merging ratio: 0.5" in text
    again = tmp_path / "b.png"
    assert main(["generate", str(model), "--from", str(out), "--out", str(again)]) == 0
    assert read_parameters(Image.open(again), again) == text


def test_tiny_decoder_equals_diffusers_autoencoder_tiny_in_both_layouts(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from nanosd.io import save_tensors

    torch.manual_seed(0)
    ref = diffusers.AutoencoderTiny().eval()  # TAESD's configuration (random weights)
    theirs = {k: v for k, v in ref.state_dict().items() if k.startswith("decoder.")}
    save_tensors(theirs, tmp_path / "diffusers.safetensors")
    ours = TinyDecoder.from_tensors(theirs, "diffusers' file")
    save_tensors(ours.state_dict(), tmp_path / "taesd_decoder.safetensors")  # TAESD's own numbering
    z = torch.randn(2, 4, 8, 6)
    with torch.no_grad():
        want = ref.decode(z).sample
        assert ours(z).shape == (2, 3, 64, 48)
        assert torch.allclose(ours(z), want, atol=1e-5)
        back = TinyDecoder.from_tensors(nanosd.io.load_tensors(tmp_path / "taesd_decoder.safetensors"), "TAESD's")
        assert torch.allclose(back(z), want, atol=1e-5)
    with pytest.raises(ValueError, match="not a TAESD decoder"):
        TinyDecoder.from_tensors({"conv.weight": torch.zeros(1)}, "x.safetensors")


def test_a_run_distils_its_tiny_decoder_and_samples_with_it(tmp_path, latent_cfg):  # noqa: F811
    run = train(latent_cfg, tmp_path / "run")
    assert main(["train", str(run), "--tiny-decoder", "--steps", "3"]) == 0
    assert (run / "tiny_decoder" / "model.safetensors").exists() and (run / "tiny_decoder" / "decoded.png").exists()
    pipe = nanosd.load(run)
    assert isinstance(pipe.tiny_decoder, TinyDecoder) and pipe.tiny_decoder.factor == 2
    kw = dict(batch_size=2, steps=3, seed=0, output="tensor")
    full, tiny = pipe.generate(**kw).images, pipe.generate(**kw, decoder="tiny").images
    assert tiny.shape == full.shape == (2, 1, 8, 8) and not torch.equal(tiny, full)
    z = pipe.generate(**dict(kw, output="latent")).images
    assert torch.equal(pipe.preview(z[0]), (pipe.decode(z[:1], tiny=True)[0] / 2 + 0.5).clamp(0, 1))  # previews
    with pytest.raises(ValueError, match="latents are not decoded"):
        pipe.generate(**dict(kw, output="latent"), decoder="tiny")
    fast_ = pipe.generate(**kw, fast=True)
    assert fast_.request.decoder == "full" and fast_.request.cfg_end == 1.0  # unconditioned: nothing to end
    with pytest.raises(ValueError, match="distils a latent run's own autoencoder"):
        distill_tiny_decoder(tmp_path)


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_freed_buffers_are_kept_for_reuse():
    """Loading (and training) keeps freed memory in the heap: a step's blocks taken again take no page faults,
    where glibc's default hands them back to the system when freed and faults them in each time."""
    code = """if 1:
        import resource, torch
        from nanosd.fast import keep_freed_buffers
        def faults():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(5):  # a step's activations: three 24 MB blocks, written, then freed
                blocks = [torch.ones(6 << 20) for _ in range(3)]
                del blocks
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        default = faults()
        assert keep_freed_buffers()
        faults()  # the heap grows once
        print(default, faults())"""
    default, kept = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                            check=True).stdout.split())
    assert default >= 4 * 36 and kept * 10 < default  # 36 faults of 2 MB pages at the least, per step after the first


def test_precision_auto_picks_by_the_cpu(monkeypatch, tmp_path):
    monkeypatch.delenv("NANOSD_PRECISION")
    facts = {"name": "test CPU", "physical_cores": 2, "capability": "AVX2", "threads": 2}

    def never(_):
        raise AssertionError("no micro-benchmark where the flags decide")

    monkeypatch.setattr(fast, "measured", never)
    assert fast.choose_precision({**facts, "flags": ["avx2", "fma"]})[0] == "fp32"  # bf16 emulated
    assert fast.choose_precision({**facts, "flags": ["avx512f", "avx512_bf16", "amx_bf16"]})[0] == "bf16"
    for speed, want in (({"fp32": 300.0, "bf16": 160.0}, "fp32"), ({"fp32": 100.0, "bf16": 400.0}, "bf16")):
        monkeypatch.setattr(fast, "measured", lambda f, s=speed: s)
        pick, why = fast.choose_precision({**facts, "flags": ["avx512f", "avx512_bf16"]})
        assert pick == want and "measured matmuls" in why
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "test GPU")  # a GPU: its tensor cores decide
    for bf16, want in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda b=bf16: b)
        assert fast.choose_precision(device="cuda:0") == (want, "test GPU has " + ("bf16 tensor cores" if bf16 else
                                                                                    "no bf16: fp16"))
    monkeypatch.setenv("NANOSD_PRECISION", "fp8")
    with pytest.raises(ValueError, match="NANOSD_PRECISION='fp8': give fp32, bf16 or fp16"):
        fast.choose_precision()


def test_the_micro_benchmark_is_measured_once_and_cached(monkeypatch):
    runs = []
    monkeypatch.setattr(fast, "matmul_gflops", lambda dtype: runs.append(dtype) or 100.0)
    facts = {"name": "test CPU"}
    assert fast.measured(facts) == fast.measured(facts) == {"fp32": 100.0, "bf16": 100.0}
    assert len(runs) == 2  # fp32 and bf16, once


def test_load_auto_and_info(model, monkeypatch, capsys):  # noqa: F811
    monkeypatch.delenv("NANOSD_PRECISION")
    monkeypatch.setattr(fast, "cpu_facts", lambda: {"name": "x", "flags": ["amx_bf16"], "physical_cores": 1,
                                                    "capability": "AMX", "threads": 1})
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    pipe = nanosd.load(model)
    assert pipe.precision == "bf16" and "AMX" in pipe.precision_why
    assert pipe.unet.out[2].weight.dtype == torch.bfloat16
    assert nanosd.load(model, "fp32").unet.out[2].weight.dtype == torch.float32
    assert main(["info"]) == 0
    assert 'precision="auto" -> bf16: the CPU has AMX' in capsys.readouterr().out


def test_options_a_model_cannot_take_are_refused_or_left_out_of_the_preset(tiny_cfg):
    from nanosd.pipeline import Pipeline
    from nanosd.schedule import Schedule
    from nanosd.unet import UNet

    tiny_cfg.unet.attention_levels = []
    plain = Pipeline(UNet(tiny_cfg.unet), Schedule.of(tiny_cfg.diffusion), tiny_cfg)  # no attention, no prompt
    r = Request(steps=3, seed=0, fast=True).resolve(plain)
    assert (r.tome, r.cfg_end, r.cache_interval, r.decoder) == (0.0, 1.0, FAST["cache_interval"], "full")
    assert plain.generate(steps=3, seed=0, fast=True, output="tensor").images.shape == (1, 1, 8, 8)
    with pytest.raises(ValueError, match="no attention to merge tokens in"):
        plain.generate(steps=3, tome=0.5)


def test_convert_refuses_the_options_it_would_ignore(model, tmp_path, capsys):  # noqa: F811
    for option in (["--precision", "bf16"], ["--device", "cpu"]):
        assert main(["convert", str(model), str(tmp_path / "x.safetensors"), *option]) == 2
        assert "--precision, --device and --tiny-decoder are for generate and serve" in capsys.readouterr().err


def test_training_takes_bf16_autocast_where_the_cpu_is_faster(monkeypatch, tmp_path, tiny_cfg, capsys,
                                                               image_folder):  # noqa: F811
    from nanosd import train as trainer
    from nanosd import unet as unet_module

    assert tiny_cfg.train.bf16 == "auto"
    tiny_cfg.data.name = str(image_folder)
    choice = ["fp32"]
    monkeypatch.setattr(trainer, "choose_precision", lambda device=None: (choice[0], "test"))
    seen = []  # the dtypes attention computes in
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(unet_module.F, "scaled_dot_product_attention",
                        lambda q, *a, **k: seen.append(q.dtype) or sdpa(q, *a, **k))
    for pick, want in (("fp32", "fp32"), ("bf16", "bf16 autocast")):
        choice[0] = pick
        run = train(tiny_cfg, tmp_path / pick, steps=2)
        assert f"images/s ({want})" in capsys.readouterr().out
        assert (run / "model.safetensors").is_file()
    # under bf16 autocast, training attention runs in fp32 (torch's CPU flash-attention backward is slow in bf16
    # on short sequences); sampling attention stays in bf16
    net = unet_module.UNet(tiny_cfg.unet)
    x, t = torch.randn(2, tiny_cfg.unet.in_channels, 8, 8), torch.tensor([1, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(x, t).float().sum().backward()
        assert seen and set(seen) == {torch.float32}
        seen.clear()
        with torch.no_grad():
            net(x, t)
        assert seen and set(seen) == {torch.bfloat16}
    tiny_cfg.train.bf16 = "yes"
    with pytest.raises(ValueError, match="train.bf16 = 'yes': give true, false or \"auto\""):
        tiny_cfg.validate()


def test_the_trainer_trains_nchw_whatever_the_weights_and_data_strides(tmp_path, tiny_cfg):
    import dataclasses

    from nanosd.autoencoder import Autoencoder, AutoencoderConfig, AutoencoderLoss
    from nanosd.data import ImageSet
    from nanosd.train import Trainer

    images = torch.rand(32, 8, 8, 1).permute(0, 3, 1, 2) * 2 - 1  # MNIST's strides: (HW, 1, W, 1), channels-last
    data = ImageSet(images, None, [])
    ae_cfg = AutoencoderConfig(in_channels=1, ch=32, ch_mult=[1, 2], num_res_blocks=1)
    for bf16 in (False, True):
        cfg = dataclasses.replace(tiny_cfg.train, bf16=bf16, steps=1)
        ae = Autoencoder(ae_cfg).to(memory_format=torch.channels_last)  # as inference loads weights
        trainer = Trainer(tmp_path / str(bf16), ae, AutoencoderLoss(ae_cfg), data, cfg)
        layout = torch.contiguous_format
        assert trainer.model.decoder.conv_in.weight.is_contiguous(memory_format=layout)
        seen = []  # the first convolution's output: what the network then computes in (its input's strides and
        # its weight's decide it; the batch's own strides would have made it run channels-last)
        trainer.model.encoder.conv_in.register_forward_hook(lambda m, a, out: seen.append(out))
        trainer.train_step()
        assert seen[0].is_contiguous(memory_format=layout) and seen[0].shape[1] == 32


def test_fp16_and_the_device_are_chosen_at_load(pipe, model):  # noqa: F811
    """precision="fp16" (a GPU's, where it has no bf16; it runs on a CPU too) stays near fp32; device= is checked
    where the pipeline is loaded, in one line."""
    half = nanosd.load(model, "fp16", device="cpu")
    assert half.unet.out[2].weight.dtype == half.text_encoder.final_layer_norm.weight.dtype == torch.float16
    half.unet.load_state_dict(pipe.unet.state_dict())  # the fixture's random weights, cast
    kw = dict(prompt="a 3", steps=4, seed=0, height=16, width=16, output="latent")
    exact, got = pipe.generate(**kw).images, half.to("cpu").generate(**kw).images
    assert got.dtype == torch.float32 and 0 < (got - exact).norm() / exact.norm() < 0.01  # fp16 ran, near fp32
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device cuda:0 is not on this machine"):
            nanosd.load(model, device="cuda:0")
    with pytest.raises(ValueError, match="device 'gpu' is not a device: give cpu, cuda or cuda:N"):
        nanosd.load(model, device="gpu")
    with pytest.raises(ValueError, match="nanosd runs on cpu or cuda"):
        nanosd.load(model, device="mps")
