"""Stable Diffusion v1 checkpoints against the reference (diffusers 0.42.1 + transformers 5.24.0), with random
weights built from config dicts: components, samplers and whole pipelines, in both file layouts."""
import json
import pickle

import pytest
import torch
from PIL import Image

from conftest import assert_near
import nanosd
from nanosd.samplers import SAMPLERS
from nanosd.text import CLIPTokenizer

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      steps_offset=1, clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True)
FAMILIES = {"ddpm": ("DDPMScheduler", {}), "ddim": ("DDIMScheduler", {}), "plms": ("PNDMScheduler", {}),
            "euler": ("EulerDiscreteScheduler", {}), "euler_a": ("EulerAncestralDiscreteScheduler", {}),
            "heun": ("HeunDiscreteScheduler", {}), "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
            "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
            "unipc": ("UniPCMultistepScheduler", {}), "lcm": ("LCMScheduler", {})}


def tiny_reference(folder, in_channels=4, seed=0, vae_channels=(8, 16)):
    """diffusers' own tiny test configuration (GroupNorm(2), per-level heads, a 5-layer CLIP), saved as a folder;
    a VAE of four levels (f = 8, as SD's) where the test needs one."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=2)
    levels = len(vae_channels)
    vae = diffusers.AutoencoderKL(block_out_channels=list(vae_channels), in_channels=3, out_channels=3, latent_channels=4,
                                  down_block_types=["DownEncoderBlock2D"] * levels,
                                  up_block_types=["UpDecoderBlock2D"] * levels,
                                  norm_num_groups=2)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
        num_attention_heads=4, num_hidden_layers=5, pad_token_id=1, vocab_size=49408))
    CLIPTokenizer.from_vocab().save(folder / "tok")
    tokenizer = transformers.CLIPTokenizer(str(folder / "tok" / "vocab.json"), str(folder / "tok" / "merges.txt"),
                                           model_max_length=77)
    scheduler = diffusers.PNDMScheduler.from_config(SD15_SCHEDULER)
    cls = diffusers.StableDiffusionInpaintPipeline if in_channels == 9 else diffusers.StableDiffusionPipeline
    pipe = cls(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler, safety_checker=None,
               feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "sd")
    conf = folder / "sd" / "scheduler" / "scheduler_config.json"  # as real SD 1.5 folders: no timestep_spacing, so
    conf.write_text(json.dumps({k: v for k, v in json.loads(conf.read_text()).items() if k != "timestep_spacing"}))
    return pipe.to(torch.float32), folder / "sd"  # each sampler takes its own default


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    ref, folder = tiny_reference(tmp_path_factory.mktemp("sd"))
    return ref, nanosd.load(folder), folder


PROMPTS = ["a photo of a cat", "a red (house:1.0) by the sea"]  # weights of 1.0 encode as the plain text
PLAIN = ["a photo of a cat", "a red house by the sea"]  # what diffusers, which knows no weights, is given
NEGATIVES = ["blurry", ""]


def reference_images(ref, name, **kw):
    cls, extra = FAMILIES[name]
    ref.scheduler = getattr(diffusers, cls).from_config({**SD15_SCHEDULER, **extra})
    kw = {"num_inference_steps": 4, "guidance_scale": 6.0, "height": 64, "width": 64, "output_type": "pt", **kw}
    return ref(generator=torch.Generator().manual_seed(7), **kw).images


def test_components_match_the_reference(sd):
    ref, pipe, _ = sd
    torch.manual_seed(1)
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 9, 32)
    t = torch.tensor([10.0, 900.0])
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, context=ctx), ref.unet(x, t, encoder_hidden_states=ctx).sample,
                                   rtol=1e-5, atol=1e-5)
        img = torch.rand(2, 3, 32, 32) * 2 - 1
        ours, theirs = pipe.vae.encode(img), ref.vae.encode(img).latent_dist
        torch.testing.assert_close(ours.mean, theirs.mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.logvar, theirs.logvar, rtol=1e-5, atol=1e-5)
        z = torch.randn(2, 4, 16, 16)
        torch.testing.assert_close(pipe.vae.decode(z), ref.vae.decode(z).sample, rtol=1e-5, atol=1e-5)
        ids = pipe.tokenizer(PLAIN)
        assert ids.tolist() == ref.tokenizer(PLAIN, padding="max_length", max_length=77).input_ids
        out = ref.text_encoder(ids, output_hidden_states=True)
        torch.testing.assert_close(pipe.text_encoder(ids), out.last_hidden_state, rtol=1e-5, atol=1e-5)
        skip2 = ref.text_encoder.final_layer_norm(out.hidden_states[-2])
        torch.testing.assert_close(pipe.text_encoder(ids, skip=1), skip2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(SAMPLERS) + ["dpmpp_2m_karras"])  # a sampler with a schedule type
def test_text_to_image_matches_the_reference_for_every_sampler(sd, name):
    ref, pipe, _ = sd
    theirs = reference_images(ref, name, prompt=PLAIN, negative_prompt=NEGATIVES)
    ours = pipe.generate(PROMPTS, NEGATIVES, steps=4, sampler=name, cfg_scale=6.0, seed=7, height=64, width=64,
                         output="tensor").images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert theirs.std() > 0.02 and not torch.allclose(theirs[0], theirs[1], atol=1e-2)  # pictures, not flat grey


def test_clip_skip_latents_and_one_prompt_for_a_batch(sd):
    """diffusers 0.42.1's own clip_skip reads text_encoder.text_model, which transformers 5 no longer has:
    its embeddings are made here as its encode_prompt would (the penultimate layer, then the final LayerNorm)."""
    ref, pipe, _ = sd
    latents = torch.randn(3, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ids = ref.tokenizer(["a cat", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        states = ref.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        embeds = ref.text_encoder.final_layer_norm(states)
    theirs = reference_images(ref, "euler", prompt_embeds=embeds[:1].repeat(3, 1, 1),
                              negative_prompt_embeds=embeds[1:].repeat(3, 1, 1), latents=latents)
    ours = pipe.generate("a cat", batch_size=3, steps=4, sampler="euler", cfg_scale=6.0, seed=7, height=64,
                         width=64, clip_skip=2, latents=latents, output="tensor").images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)




def init_image(seed=0, size=64):
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 3, size // 8, size // 8, generator=g)
    return torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear")  # smooth, like a photo


# not plms: diffusers' PNDM, started part-way, averages its first eps across the wrong pair of timesteps and
# then runs one step behind the schedule; nanosd's PLMS starts afresh at the first step it takes
@pytest.mark.parametrize("name", ["ddim", "euler_a", "dpmpp_2m", "heun", "unipc"])
def test_img2img_matches_the_reference(sd, name):
    ref, pipe, folder = sd
    img2img = diffusers.StableDiffusionImg2ImgPipeline.from_pipe(ref)
    image = init_image()
    theirs = reference_images(img2img, name, prompt=PLAIN, negative_prompt=NEGATIVES, image=image * 2 - 1,
                              strength=0.6, num_inference_steps=5)
    ours = pipe.img2img(image, PROMPTS, NEGATIVES, strength=0.6, steps=5, sampler=name, cfg_scale=6.0, seed=7,
                        output="tensor").images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def mask_image(size=64):
    m = torch.zeros(1, 1, size, size)
    m[..., size // 4: 3 * size // 4, size // 8: size // 2] = 1
    return m


@pytest.mark.parametrize("name", ["ddim", "euler", "dpmpp_2m"])
def test_inpaint_with_a_standard_unet_matches_the_reference(sd, name):
    ref, pipe, _ = sd
    inpaint = diffusers.StableDiffusionInpaintPipeline.from_pipe(ref)
    image, mask = init_image(1), mask_image()
    theirs = reference_images(inpaint, name, prompt=PLAIN, negative_prompt=NEGATIVES, image=image, mask_image=mask)
    ours = pipe.inpaint(image, mask, PROMPTS, NEGATIVES, steps=4, sampler=name, cfg_scale=6.0, seed=7,
                        output="tensor").images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name, strength", [("euler_a", 1.0), ("unipc", 1.0), ("ddim", 0.7)])
def test_the_9_channel_inpainting_unet_matches_the_reference(tmp_path, name, strength):
    ref, folder = tiny_reference(tmp_path, in_channels=9, seed=1)
    pipe = nanosd.load(folder)
    assert pipe.cfg.unet.cond_channels == 5 and pipe.conditioner.cfg.concat == "inpaint"
    image, mask = init_image(2), mask_image()
    theirs = reference_images(ref, name, prompt=PLAIN, negative_prompt=NEGATIVES, image=image, mask_image=mask,
                              strength=strength)
    ours = pipe.inpaint(image, mask, PROMPTS, NEGATIVES, steps=4, sampler=name, cfg_scale=6.0, seed=7,
                        strength=strength, output="tensor").images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    single = nanosd.load(nanosd.save(pipe, tmp_path / "inpainting.safetensors"), config=folder)
    assert single.cfg.unet.cond_channels == 5  # the 9-channel U-Net, from the shapes


def test_single_file_round_trip_and_diffusers_reads_it(sd, tmp_path):
    ref, pipe, folder = sd
    path = nanosd.save(pipe, tmp_path / "model.safetensors")
    again = nanosd.load(path, config=folder)  # GroupNorm(2) is not in the shapes: the tiny model needs its config
    from safetensors.torch import load_file

    keys = load_file(path)
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert keys["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # the original [C, C, 1, 1]
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
    kw = dict(steps=3, sampler="euler", cfg_scale=5.0, seed=2, height=64, width=64, output="tensor")
    want = pipe.generate(PROMPTS, **kw).images
    torch.testing.assert_close(again.generate(PROMPTS, **kw).images, want, atol=0, rtol=0)
    single = diffusers.StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True,
                                                                safety_checker=None, requires_safety_checker=False)
    # its single-file scheduler config says timestep_spacing "leading"; nanosd keeps each family's default
    single.scheduler = diffusers.EulerDiscreteScheduler.from_config(SD15_SCHEDULER)
    theirs = single(PLAIN, num_inference_steps=3, guidance_scale=5.0, height=64, width=64, output_type="pt",
                    generator=torch.Generator().manual_seed(2)).images
    torch.testing.assert_close(want, theirs, atol=1e-4, rtol=0)
    # and back to a diffusers folder, which diffusers reads
    out = nanosd.save(again, tmp_path / "folder")
    back = diffusers.StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    back.scheduler = diffusers.EulerDiscreteScheduler.from_config(back.scheduler.config)
    theirs = back(PLAIN, num_inference_steps=3, guidance_scale=5.0, height=64, width=64, output_type="pt",
                  generator=torch.Generator().manual_seed(2)).images
    torch.testing.assert_close(want, theirs, atol=1e-4, rtol=0)


class Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_ckpt_files_load_weights_only_with_their_ema(sd, tmp_path):
    import numpy as np

    _, pipe, folder = sd
    tensors = pipe.state_dict()
    ema = {"model_ema." + ("diffusion_model." + k[len("model.diffusion_model."):]).replace(".", ""): v * 0.5
           for k, v in tensors.items() if k.startswith("model.diffusion_model.")}
    torch.save({"state_dict": {**tensors, **ema, "model_ema.num_updates": torch.tensor(3)},
                "global_step": np.int64(1000), "epoch": np.float64(2.0)}, tmp_path / "m.ckpt")
    plain, averaged = (nanosd.load(tmp_path / "m.ckpt", config=folder, ema=e) for e in (False, True))
    w = "input_blocks.1.0.in_layers.2.weight"
    assert torch.equal(plain.unet.state_dict()[w], pipe.unet.state_dict()[w])
    assert torch.equal(averaged.unet.state_dict()[w], pipe.unet.state_dict()[w] * 0.5)
    with pytest.raises(ValueError, match="no EMA weights"):
        nanosd.load(nanosd.save(pipe, tmp_path / "x.safetensors"), config=folder, ema=True)


def test_bad_checkpoints_and_requests_get_one_line_errors(sd, tmp_path, capsys):
    from nanosd.cli import main

    _, pipe, folder = sd
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": Hostile(marker)}, f)
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Hostile(marker)}, tmp_path / "evil2.ckpt")
    good = nanosd.save(pipe, tmp_path / "good.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    from safetensors.torch import save_file

    save_file({"unet.out.2.weight": torch.zeros(1)}, tmp_path / "other.safetensors")
    cases = [(["generate", str(tmp_path / "evil.ckpt"), "a cat"], "cannot be read safely"),
             (["generate", str(tmp_path / "evil2.ckpt"), "a cat"], "cannot be read safely"),
             (["generate", str(tmp_path / "cut.safetensors"), "a cat"], "unreadable or truncated"),
             (["generate", str(tmp_path / "other.safetensors"), "a cat"], "not a Stable Diffusion checkpoint"),
             (["generate", str(folder), "a cat", "--size", "62x64", "--steps", "1"], "not divisible by the model's factor"),
             (["generate", str(folder), "a cat", "--sampler", "k_lms"], "unknown sampler 'k_lms'"),
             (["generate", str(folder), "a cat", "--size", "big"], "must be WIDTHxHEIGHT")]
    for args, words in cases:
        assert main(args + ["--out", str(tmp_path / "o.png")]) == 2, args
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
    assert not marker.exists()  # the pickle's code never ran
    with pytest.raises(ValueError, match="other.safetensors does not match the model: missing"):
        nanosd.load(folder, vae=tmp_path / "other.safetensors")


def test_cli_generates_img2img_inpaints_and_converts(sd, tmp_path, capsys):
    from nanosd.cli import main

    _, pipe, folder = sd
    out = tmp_path / "a.png"
    assert main(["generate", str(folder), "a (red:1.2) house", "--negative", "blurry", "--steps", "2", "--sampler",
                 "DPM++ 2M Karras", "--cfg", "7", "--seed", "1", "--size", "64x64", "--out", str(out)]) == 0
    im = Image.open(out)
    assert im.size == (64, 64)
    assert im.text["parameters"].splitlines() == [
        "a (red:1.2) house", "Negative prompt: blurry",
        "Steps: 2, Sampler: DPM++ 2M Karras, CFG scale: 7.0, Seed: 1, Size: 64x64, Model: sd, Seed mode: diffusers"]
    mask = Image.new("L", (64, 64))
    mask.paste(255, (16, 16, 48, 48))
    mask.save(tmp_path / "mask.png")
    assert main(["img2img", str(folder), str(out), "a house", "--strength", "0.5", "--steps", "4", "--seed", "1",
                 "--out", str(tmp_path / "b.png")]) == 0
    assert "Denoising strength: 0.5" in Image.open(tmp_path / "b.png").text["parameters"]
    assert main(["inpaint", str(folder), str(out), str(tmp_path / "mask.png"), "a door", "--steps", "2",
                 "--out", str(tmp_path / "c.png")]) == 0
    kept = torch.tensor(list(Image.open(tmp_path / "c.png").convert("L").getdata()), dtype=torch.float).reshape(64, 64)
    assert kept.shape == (64, 64)
    assert main(["convert", str(folder), str(tmp_path / "s.safetensors")]) == 0
    assert main(["convert", str(tmp_path / "s.safetensors"), str(tmp_path / "d"), "--config", str(folder)]) == 0
    back = nanosd.load(tmp_path / "d")
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), pipe.state_dict().values()))


@pytest.mark.slow
def test_full_size_sd15_saved_by_nanosd_loads_in_diffusers_and_matches(tmp_path):
    """SD v1.5 at full size with random weights: the parameter counts, and the same image from the same latents
    through diffusers' from_single_file (a local config folder) as through nanosd."""
    from nanosd.formats import diffusers as diffusers_format, sd
    from nanosd.pipeline import build

    from nanosd.autoencoder import Autoencoder
    from nanosd.condition import Conditioner
    from nanosd.unet import UNet

    cfg = sd.preset("sd1")
    torch.manual_seed(0)
    unet, vae, cond = UNet(cfg.unet), Autoencoder(cfg.autoencoder), Conditioner(cfg.condition)
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, cond.text_encoder)]
    assert counts == [859_520_964, 83_653_863, 123_060_480]
    with torch.no_grad():  # wake the U-Net's zero-initialised output layers: every weight matters to the comparison
        for p in unet.parameters():
            p.normal_(0, 0.02) if p.ndim > 1 else p.normal_(0, 0.01)
    parts = {"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": cond.text_encoder.state_dict()}
    pipe = build(cfg, parts, "random SD v1.5")
    del unet, vae, cond, parts
    path = nanosd.save(pipe, tmp_path / "sd15.safetensors")
    diffusers_format.write(tmp_path / "config", pipe, weights=False)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    kw = dict(steps=2, sampler="euler", cfg_scale=7.5, height=128, width=128, latents=latents, output="tensor")
    ours = pipe.generate(["a cat", "a dog"], ["", "blurry"], **kw).images
    del pipe
    ref = diffusers.StableDiffusionPipeline.from_single_file(str(path), config=str(tmp_path / "config"),
                                                             local_files_only=True, safety_checker=None,
                                                             requires_safety_checker=False)
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(SD15_SCHEDULER)
    theirs = ref(["a cat", "a dog"], negative_prompt=["", "blurry"], num_inference_steps=2, guidance_scale=7.5,
                 height=128, width=128, latents=latents, output_type="pt").images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert theirs.std() > 0.01


def test_half_precision_files_bf16_runs_tokenizer_json_and_a_separate_vae(sd, tmp_path):
    from safetensors.torch import save_file

    ref, pipe, folder = sd
    kw = dict(steps=2, sampler="euler", cfg_scale=5.0, seed=3, height=64, width=64, output="tensor")
    want = pipe.generate(PROMPTS, **kw).images
    for dtype in (torch.float16, torch.bfloat16):  # stored in half precision, computed in fp32
        half = nanosd.load(nanosd.save(pipe, tmp_path / f"{dtype}.safetensors", dtype=dtype), config=folder)
        assert half.unet.out[2].weight.dtype == torch.float32
        assert (half.generate(PROMPTS, **kw).images - want).abs().mean() < 2e-2
    bf16 = nanosd.load(folder, precision="bf16")
    assert (bf16.generate(PROMPTS, **kw).images - want).abs().mean() < 5e-2
    # a tokenizer folder with tokenizer.json only
    ref.tokenizer.save_pretrained(tmp_path / "tok")
    for f in ("vocab.json", "merges.txt"):
        (tmp_path / "tok" / f).unlink(missing_ok=True)
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    text = ["an (unusual) prompt, with punctuation!", "ünïcödé and 123 numbers"]
    assert CLIPTokenizer.from_folder(tmp_path / "tok")(text).tolist() == \
        ref.tokenizer(text, padding="max_length", max_length=77).input_ids
    # a fine-tuned VAE in another file: diffusers' names, or the original's with first_stage_model.
    torch.manual_seed(5)
    other = diffusers.AutoencoderKL.from_config(ref.vae.config)
    save_file(other.state_dict(), tmp_path / "vae.safetensors")
    swapped = nanosd.load(folder, vae=tmp_path / "vae.safetensors")
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(swapped.vae.decode(z), other.decode(z).sample, rtol=1e-5, atol=1e-5)
    save_file({"first_stage_model." + k: v.contiguous() for k, v in swapped.vae.state_dict().items()}, tmp_path / "vae2.safetensors")
    again = nanosd.load(folder, vae=tmp_path / "vae2.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(again.vae.state_dict().values(), swapped.vae.state_dict().values()))


def test_long_and_weighted_prompts_are_encoded_as_a1111_does(sd):
    _, pipe, _ = sd
    c = pipe.conditioner.text
    words = " ".join(f"word{i}" for i in range(50))  # over 75 tokens: two chunks of 77 positions
    n = len(c.tokenizer.ids(words))
    assert 75 < n <= 150
    with torch.no_grad():
        (long, short), _ = c.encode_clip([words, "a cat"])
        assert long.shape == (154, 32)
        first = c.tokenizer.ids(words)[:75]
        # all chunks of the batch in one pass against one chunk alone: other batch shapes, so relative bounds
        assert_near(long[:77], c.model(c.tokenizer.pack([first]))[0], 1e-5)
        assert_near(short[:77], c.model(c.tokenizer(["a cat"]))[0], 1e-5)  # padded with an empty chunk
        assert_near(short[77:], c.model(c.tokenizer([""]))[0], 1e-5)
        norm = c.model.final_layer_norm  # this random CLIP's LayerNorm has no bias: its states' mean is ~1e-8
        bias = norm.bias.detach().clone()
        try:
            norm.bias.add_(0.05)  # a real CLIP's states have a clear mean, which A1111 restores after weighting
            (plain, heavy), _ = c.encode_clip(["a cat on a mat", "a (cat:1.5) on a mat"])
            assert torch.allclose(heavy.mean(), plain.mean(), rtol=1e-4)  # the mean is restored
            assert not torch.allclose(heavy[2], plain[2])  # "cat" (position 2) weighs more
            norm.bias.zero_()  # next to no mean: the ratio would be noise or infinite (the U-Net then draws NaN)
            (plain, heavy), _ = c.encode_clip(["a cat on a mat", "a (cat:1.5) on a mat"])
            assert torch.isfinite(heavy).all() and torch.allclose(heavy[2], 1.5 * plain[2], atol=1e-5)
        finally:
            norm.bias.copy_(bias)


def test_tiled_decode_blends_tiles_into_the_untiled_image(sd):
    """With a decoder that acts locally (here: each latent pixel to an f x f block), feathered tiles add up to
    exactly the untiled decode: the tiling covers every pixel once in weight. A real VAE's tiles differ a little
    (GroupNorm and attention see one tile); that is what the feathering hides."""
    _, pipe, _ = sd
    local = type("Local", (), {"decode": lambda self, z: z[:, :3].repeat_interleave(2, -1).repeat_interleave(2, -2),
                               "cfg": pipe.vae.cfg})()
    tiled = nanosd.Pipeline(pipe.unet, pipe.schedule, pipe.cfg, pipe.vae, pipe.conditioner)
    tiled.autoencoder = local
    z = torch.randn(2, 4, 40, 56)
    whole = tiled.decode(z, tile=64)
    for tile, overlap in ((16, 4), (24, 8), (40, 16)):
        torch.testing.assert_close(tiled.decode(z, tile=tile, overlap=overlap), whole, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # and the real VAE: same shape, finite, close to the untiled decode on average
        real = pipe.decode(z[:1] * 0.1, tile=16, overlap=4)
        assert real.shape == (1, 3, 80, 112) and torch.isfinite(real).all()


def test_compiled_unet_matches_the_exact_path(sd):
    """The fast paths against fp32 eager on the tiny model: torch.compile (fp32, and bf16 with its tolerance)."""
    _, pipe, folder = sd
    kw = dict(steps=2, sampler="dpmpp_2m", cfg_scale=5.0, seed=4, height=64, width=64, output="tensor")
    want = pipe.generate(PROMPTS, **kw).images
    fast = nanosd.load(folder, compile=True)
    torch.testing.assert_close(fast.generate(PROMPTS, **kw).images, want, atol=1e-4, rtol=0)
    fast = nanosd.load(folder, precision="bf16", compile=True)
    assert (fast.generate(PROMPTS, **kw).images - want).abs().mean() < 5e-2
