"""SD 2.x (v-prediction) and SDXL against the reference (diffusers 0.42.1 + transformers 5.24.0), with random
weights of tiny shapes built from config dicts and saved as diffusers folders: text-to-image for four samplers,
img2img, 9-channel inpainting, and the single files nanosd writes read back by diffusers' from_single_file."""
import dataclasses
import json

import numpy as np
import pytest
import torch

import nanosd
from conftest import assert_near
from nanosd.text import CLIPTokenizer

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1, clip_sample=False, set_alpha_to_one=False)
SAMPLERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
            "dpmpp_2m": "DPMSolverMultistepScheduler"}
PROMPTS = ["a photo of a cat", "a red house by the sea"]
NEGATIVES = ["blurry", ""]


def clip(projection=0, width=32):
    c = transformers.CLIPTextConfig(bos_token_id=49406, eos_token_id=49407, hidden_size=width, intermediate_size=37,
                                    num_attention_heads=4, num_hidden_layers=5, pad_token_id=1, vocab_size=49408,
                                    hidden_act="gelu", projection_dim=projection or width)
    return (transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel)(c)


def reference(family, folder, in_channels=4, seed=0):
    """A tiny pipeline of the family: SD 2.x with linear projections, OpenCLIP's GELU and v-prediction; SDXL with
    two text encoders (the second wider, as bigG is, projected and pooled), per-level depth and the size ids,
    `leading` spacing as real SDXL folders carry."""
    torch.manual_seed(seed)
    xl, refiner = family == "sdxl", family == "sdxl-refiner"
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32 + 48 if xl else 48 if refiner else 32, attention_head_dim=(2, 4), norm_num_groups=2,
        use_linear_projection=True,
        **(dict(transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=40 + (5 if refiner else 6) * 8) if xl or refiner else {}))
    vae = diffusers.AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
                                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                                  norm_num_groups=2, scaling_factor=0.13025 if xl else 0.18215)
    CLIPTokenizer.from_vocab().save(folder / "tok")
    tok = lambda pad: transformers.CLIPTokenizer(str(folder / "tok" / "vocab.json"), str(folder / "tok" / "merges.txt"),
                                                 model_max_length=77, pad_token=pad)
    if refiner:  # the second encoder alone, the aesthetic score among the ids
        scheduler = diffusers.EulerDiscreteScheduler.from_config({**SCHEDULER, "timestep_spacing": "leading"})
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=vae, text_encoder=None, text_encoder_2=clip(projection=40, width=48), tokenizer=None,
            tokenizer_2=tok("!"), unet=unet, scheduler=scheduler, requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False)
        cls = type(pipe)
    elif xl:
        scheduler = diffusers.EulerDiscreteScheduler.from_config({**SCHEDULER, "timestep_spacing": "leading"})
        cls = diffusers.StableDiffusionXLInpaintPipeline if in_channels == 9 else diffusers.StableDiffusionXLPipeline
        pipe = cls(vae=vae, text_encoder=clip(), text_encoder_2=clip(projection=40, width=48), tokenizer=tok("<|endoftext|>"),
                   tokenizer_2=tok("!"), unet=unet, scheduler=scheduler)
    else:
        scheduler = diffusers.DDIMScheduler.from_config({**SCHEDULER, "prediction_type": "v_prediction"})
        cls = diffusers.StableDiffusionInpaintPipeline if in_channels == 9 else diffusers.StableDiffusionPipeline
        pipe = cls(vae=vae, text_encoder=clip(), tokenizer=tok("<|endoftext|>"), unet=unet, scheduler=scheduler,
                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / family)  # the reference as its users have it: loaded from the folder
    return cls.from_pretrained(folder / family, local_files_only=True).to(torch.float32), folder / family


@pytest.fixture(scope="module", params=["sd2", "sdxl"])
def family(request, tmp_path_factory):
    ref, folder = reference(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, ref, nanosd.load(folder), folder


def images(ref, name, **kw):
    ref.scheduler = getattr(diffusers, SAMPLERS[name]).from_config(ref.scheduler.config)
    kw = {"num_inference_steps": 4, "guidance_scale": 6.0, "height": 64, "width": 64, "output_type": "pt", **kw}
    return ref(generator=torch.Generator().manual_seed(7), **kw).images


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_text_to_image_matches_the_reference(family, name):
    fam, ref, pipe, _ = family
    assert pipe.family == fam
    theirs = images(ref, name, prompt=PROMPTS, negative_prompt=NEGATIVES)
    ours = pipe.generate(PROMPTS, NEGATIVES, steps=4, sampler=name, cfg_scale=6.0, seed=7, height=64, width=64,
                         output="tensor").images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert theirs.std() > 0.02 and not torch.allclose(theirs[0], theirs[1], atol=1e-2)  # pictures, not flat grey
    theirs = images(ref, name, prompt=PROMPTS, negative_prompt=NEGATIVES, output_type="latent")
    ours = pipe.generate(PROMPTS, NEGATIVES, steps=4, sampler=name, cfg_scale=6.0, seed=7, height=64, width=64,
                         output="latent").images
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()


@pytest.mark.parametrize("family", ["sdxl"], indirect=True)
def test_sdxl_without_a_negative_prompt_guides_from_zeros_and_takes_its_size_ids(family):
    _, ref, pipe, _ = family
    theirs = images(ref, "euler", prompt=PROMPTS, original_size=(128, 96), crops_coords_top_left=(8, 4))
    ours = pipe.generate(PROMPTS, steps=4, sampler="euler", cfg_scale=6.0, seed=7, height=64, width=64,
                         original_size=(128, 96), crops_coords_top_left=(8, 4), output="tensor")
    torch.testing.assert_close(ours.images, theirs, atol=1e-4, rtol=0)
    plain = pipe.generate(PROMPTS, steps=4, sampler="euler", cfg_scale=6.0, seed=7, height=64, width=64,
                          output="tensor").images
    assert (plain - ours.images).abs().max() > 1e-3  # the ids reach the U-Net
    with pytest.raises(ValueError, match="aesthetic_score: this model is not conditioned on it"):
        pipe.generate("a cat", aesthetic_score=7.0)


def init_image(seed=0, size=64):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(torch.rand(1, 3, size // 8, size // 8, generator=g), size=(size, size),
                                           mode="bilinear")


@pytest.mark.parametrize("name", ["ddim", "euler_a"])
def test_img2img_matches_the_reference(family, name):
    fam, ref, pipe, _ = family
    cls = diffusers.StableDiffusionXLImg2ImgPipeline if fam == "sdxl" else diffusers.StableDiffusionImg2ImgPipeline
    image = init_image()
    theirs = images(cls.from_pipe(ref), name, prompt=PROMPTS, negative_prompt=NEGATIVES, image=image * 2 - 1,
                    strength=0.6, num_inference_steps=5)
    ours = pipe.img2img(image, PROMPTS, NEGATIVES, strength=0.6, steps=5, sampler=name, cfg_scale=6.0, seed=7,
                        output="tensor").images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fam", ["sd2", "sdxl"])
def test_nine_channel_inpainting_matches_the_reference(fam, tmp_path):
    ref, folder = reference(fam, tmp_path, in_channels=9, seed=1)
    pipe = nanosd.load(folder)
    image, mask = init_image(2), torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 8:32] = 1
    kw = dict(image=image * 2 - 1, mask_image=mask, num_inference_steps=4)
    if fam == "sdxl":
        kw["strength"] = 1.0
    theirs = images(ref, "euler", prompt=PROMPTS, negative_prompt=NEGATIVES, **kw)
    ours = pipe.inpaint(image, mask, PROMPTS, NEGATIVES, steps=4, sampler="euler", cfg_scale=6.0, seed=7,
                        output="tensor").images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_the_single_file_nanosd_writes_is_read_by_diffusers(family, tmp_path):
    """The original layout (OpenCLIP's cond_stage_model.model.* for SD 2.x; conditioner.embedders.* for SDXL),
    read by diffusers' from_single_file with a config folder, and by nanosd, gives the same image."""
    fam, ref, pipe, folder = family
    path = nanosd.save(pipe, tmp_path / "model.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        names = list(f.keys())
    openclip = "conditioner.embedders.1.model." if fam == "sdxl" else "cond_stage_model.model."
    assert any(k.startswith(openclip + "transformer.resblocks.0.attn.in_proj_weight") for k in names)
    config = tmp_path / "config"
    nanosd.formats.diffusers.write(config, pipe, weights=False)
    cls = diffusers.StableDiffusionXLPipeline if fam == "sdxl" else diffusers.StableDiffusionPipeline
    theirs_pipe = cls.from_single_file(str(path), config=str(config), local_files_only=True,
                                       **({} if fam == "sdxl" else dict(safety_checker=None)))
    theirs = images(theirs_pipe.to(torch.float32), "euler", prompt=PROMPTS, negative_prompt=NEGATIVES)
    again = nanosd.load(path, config=config)
    assert again.family == fam
    ours = again.generate(PROMPTS, NEGATIVES, steps=4, sampler="euler", cfg_scale=6.0, seed=7, height=64, width=64,
                          output="tensor").images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    folder2 = nanosd.save(again, tmp_path / "back")  # and as a diffusers folder again
    assert json.loads((folder2 / "model_index.json").read_text())["_class_name"] == cls.__name__


def test_the_sdxl_refiner_refines_as_the_reference_does_and_refuses_to_start_from_noise(tmp_path):
    ref, folder = reference("sdxl-refiner", tmp_path)
    pipe = nanosd.load(folder)
    assert pipe.family == "sdxl-refiner" and pipe.text_encoder_2 is None
    image = init_image(3)
    theirs = images(ref, "euler", prompt=PROMPTS, image=image, strength=0.5, num_inference_steps=6,
                    aesthetic_score=7.0)
    ours = pipe.img2img(image, PROMPTS, strength=0.5, steps=6, sampler="euler", cfg_scale=6.0, seed=7,
                        aesthetic_score=7.0, output="tensor").images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="the SDXL refiner refines an image"):
        pipe.generate("a cat")
    with pytest.raises(ValueError, match="target_size: this model is not conditioned on it"):
        pipe.img2img(image, "a cat", target_size=(64, 64))


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl", "sdxl-refiner"])
def test_full_size_files_are_told_apart_and_their_architecture_read_from_shapes(name):
    """The published shapes (on the meta device: no memory), written in the original layout, read back: the family
    and every config as the preset has it; the U-Net sizes are the published ones."""
    from nanosd.condition import Conditioner
    from nanosd.formats import sd
    from nanosd.unet import UNet

    cfg = sd.preset(name)
    assert cfg.data.size == {"sd1": 512, "sd2": 512, "sdxl": 1024, "sdxl-refiner": 1024}[name]  # default sizes
    if name == "sd2":
        assert sd.preset("sd2", prediction="v").data.size == 768  # 768-v
        depth = dataclasses.replace(cfg.unet, cond_channels=1)  # SD 2's depth model: refused in one line
        with pytest.raises(ValueError, match="reads 1 extra input channels .a depth, upscaler or instruct-pix2pix"):
            sd.config(depth, cfg.autoencoder, cfg.condition.clip, None, {}, family=sd.SD2)
    with torch.device("meta"):
        unet, cond = UNet(cfg.unet), Conditioner(cfg.condition)
        vae = nanosd.autoencoder.Autoencoder(cfg.autoencoder)
    counts = {"sd1": 859_520_964, "sd2": 865_910_724, "sdxl": 2_567_463_684, "sdxl-refiner": 2_259_526_660}
    assert sum(p.numel() for p in unet.parameters()) == counts[name]
    parts = {"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": cond.text_encoder.state_dict()}
    if cfg.condition.clip2:
        parts["text_encoder_2"] = cond.text_encoder_2.state_dict()
    family = sd.FAMILIES[name]
    tensors = sd.join(parts, family)
    assert sd.detect(tensors, "x") is family
    u, v, t, t2 = sd.infer(sd.split(tensors, family), family)
    assert (u, v, t, t2) == (cfg.unet, cfg.autoencoder, cfg.condition.clip, cfg.condition.clip2)


def test_files_that_are_not_checkpoints_get_one_line_errors(family, tmp_path, capsys):
    from safetensors.torch import save_file

    from nanosd.cli import main

    fam, _, pipe, folder = family
    good = nanosd.save(pipe, tmp_path / "good.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])
    z = lambda: torch.zeros(2, 2)  # noqa: E731
    files = {"lora": {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": z(),
                      "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": z()},
             "vae": {"encoder.conv_in.weight": z(), "decoder.conv_in.weight": z()},
             "sd3": {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": z()},
             "flux": {"double_blocks.0.img_attn.qkv.weight": z()},
             "auraflow": {"model.diffusion_model.double_layers.0.attn.w1q.weight": z()}}
    for name, tensors in files.items():
        save_file(tensors, tmp_path / f"{name}.safetensors")
    loads = "nanosd loads SD 1.x, SD 2.x, SDXL and the SDXL refiner"
    cases = [("cut", "unreadable or truncated"), ("lora", f"is a LoRA, not a whole checkpoint (adapters do not load yet): {loads}"),
             ("vae", "is a VAE, not a checkpoint: give it as --vae"),
             ("sd3", f"is a Stable Diffusion 3 checkpoint: {loads}"), ("flux", f"is a Flux checkpoint: {loads}"),
             ("auraflow", "is an AuraFlow checkpoint (Pony v7 and kin)")]
    for name, words in cases:
        assert main(["generate", str(tmp_path / f"{name}.safetensors"), "a cat", "--out", str(tmp_path / "o.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
    with pytest.raises(ValueError, match="this VAE file is a whole checkpoint"):
        nanosd.load(folder, vae=good)
    with pytest.raises(ValueError, match=f"is an {fam} model, not sd1"):
        nanosd.load(folder, family="sd1")


def test_cli_generates_and_converts_every_family(family, tmp_path, capsys):
    """convert both ways, generate from the single file (its configs given), the SDXL options on the command line,
    and for an SD 2.x single file the one line saying which prediction was assumed."""
    from PIL import Image

    from nanosd.cli import main

    fam, _, pipe, folder = family
    single, config, out = tmp_path / "m.safetensors", tmp_path / "config", tmp_path / "a.png"
    assert main(["convert", str(folder), str(single)]) == 0
    nanosd.formats.diffusers.write(config, pipe, weights=False)
    extra = ["--original-size", "96x128", "--crop", "0x8"] if fam == "sdxl" else ["--guidance-rescale", "0.7"]
    capsys.readouterr()
    args = ["--steps", "2", "--size", "64x64", "--seed", "1", "--out", str(out)] + extra
    assert main(["generate", str(single), "a (red:1.2) house", "--config", str(config), "--family", fam] + args) == 0
    from_single = np.asarray(Image.open(out).convert("RGB"))
    assert main(["generate", str(folder), "a (red:1.2) house"] + args) == 0
    assert Image.open(out).size == (64, 64)
    assert (np.asarray(Image.open(out).convert("RGB")) == from_single).all()
    assert ("Guidance rescale: 0.7" in Image.open(out).info["parameters"]) == (fam == "sd2")
    assert main(["convert", str(single), str(tmp_path / "back"), "--config", str(config)]) == 0
    back = nanosd.load(tmp_path / "back")
    assert back.family == fam
    for (k, a), b in zip(pipe.unet.state_dict().items(), back.unet.state_dict().values()):
        assert torch.equal(a, b), k
    if fam == "sd2":
        capsys.readouterr()
        # a tiny file's GroupNorm groups cannot be told from shapes: refused, after saying what was assumed
        assert main(["generate", str(single), "a cat", "--steps", "1", "--size", "64x64", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[0].startswith("nanosd: note: m.safetensors: an SD 2.x file does not say") and "eps assumed" in err[0]


def test_zero_terminal_snr_and_guidance_rescale_match_the_reference(tmp_path):
    """A v-prediction fine-tune of the zero-SNR kind: the folder's scheduler rescales the betas and spaces the
    timesteps from the end (trailing); the pipeline rescales the guided prediction (guidance_rescale)."""
    ref, folder = reference("sd2", tmp_path, seed=2)
    conf = folder / "scheduler" / "scheduler_config.json"
    conf.write_text(json.dumps({**json.loads(conf.read_text()), "rescale_betas_zero_snr": True,
                                "timestep_spacing": "trailing"}))
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True).to(torch.float32)
    pipe = nanosd.load(folder)
    assert pipe.schedule.alphas_cumprod[-1].item() == 2.0**-24
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    torch.testing.assert_close(pipe.schedule.betas[:-1], ref.scheduler.betas[:-1], rtol=1e-6, atol=1e-9)
    for rescale in (0.0, 0.7):
        theirs = ref(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=4, guidance_scale=6.0, height=64,
                     width=64, output_type="pt", guidance_rescale=rescale,
                     generator=torch.Generator().manual_seed(7)).images
        ours = pipe.generate(PROMPTS, NEGATIVES, steps=4, sampler="euler", cfg_scale=6.0, seed=7, height=64,
                             width=64, guidance_rescale=rescale, output="tensor").images
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert (ours - pipe.generate(PROMPTS, NEGATIVES, steps=4, sampler="euler", cfg_scale=6.0, seed=7, height=64,
                                 width=64, output="tensor").images).abs().max() > 1e-3  # the rescale acts


def test_sdxl_in_bf16_long_prompts_and_the_a1111_api(family):
    """bf16 stays near fp32; a prompt over 75 tokens is encoded in chunks by both encoders, pooled from the first;
    the A1111 API answers with the model's own size when none is asked (1024 for real SDXL)."""
    from nanosd.server import create_app
    from test_server import call, start

    fam, _, pipe, folder = family
    kw = dict(steps=3, sampler="euler", cfg_scale=5.0, seed=3, height=64, width=64, output="tensor")
    fp32 = pipe.generate("a lighthouse", **kw).images
    bf16 = nanosd.load(folder, precision="bf16").generate("a lighthouse", **kw).images
    assert (bf16 - fp32).abs().mean() < 0.02
    words = " ".join(f"word{i}" for i in range(50))  # over 75 tokens: two chunks
    c = pipe.conditioner
    with torch.no_grad():
        context = c([words, "a cat"], micro=torch.full((2, 6), 64.0) if fam == "sdxl" else None)["context"]
        assert context.shape == (2, 154, 32 + (48 if fam == "sdxl" else 0))
        if fam == "sdxl":
            _, pooled = c.text2.encode_clip([words])
            _, alone = c.text2.model.encode(c.text2.tokenizer.pack([c.text2.tokenizer.ids(words)[:75]]))
            assert_near(pooled, alone, 1e-5)
    url, server = start(create_app(pipe, "tiny"))
    try:
        status, body = call(url, "/sdapi/v1/txt2img", {"prompt": "a cat", "steps": 2, "seed": 1})
    finally:
        server.should_exit = True
    assert status == 200, body
    info = json.loads(body["info"])
    assert (info["width"], info["height"]) == (pipe.cfg.data.size,) * 2


def test_controlnets_of_the_family_match_the_reference(family, tmp_path):
    """A ControlNet made from the family's U-Net (SD 2.x: linear projections; SDXL: the pooled text and size ids
    reach it too), its zero convolutions filled, as diffusers' ControlNet pipeline of the family runs it."""
    from PIL import Image

    fam, ref, pipe, _ = family
    torch.manual_seed(3)
    cn = diffusers.ControlNetModel.from_unet(ref.unet, conditioning_embedding_out_channels=(16, 32))  # f = 2
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                p.normal_(0, 0.3)
    cn.save_pretrained(tmp_path / "cn")
    net = nanosd.load_controlnet(tmp_path / "cn", base=pipe)
    g = torch.Generator().manual_seed(0)
    control = Image.fromarray(((torch.rand(16, 16, generator=g) > 0.7).byte() * 255).numpy()).resize((64, 64)).convert("RGB")
    cls = diffusers.StableDiffusionXLControlNetPipeline if fam == "sdxl" else diffusers.StableDiffusionControlNetPipeline
    cp = cls(**{k: v for k, v in ref.components.items() if k not in ("image_encoder",)}, controlnet=cn)
    kw = {"num_inference_steps": 4, "guidance_scale": 6.0, "height": 64, "width": 64, "output_type": "pt"}
    cp.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    expected = cp(PROMPTS, negative_prompt=NEGATIVES, image=control, controlnet_conditioning_scale=0.8,
                  control_guidance_end=0.75, generator=torch.Generator().manual_seed(7), **kw).images
    ours = pipe.generate(PROMPTS, NEGATIVES, steps=4, sampler="euler", cfg_scale=6.0, seed=7, height=64, width=64,
                         control=[nanosd.Control(net, control, 0.8, end=0.75)], output="tensor").images
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    plain = pipe.generate(PROMPTS, NEGATIVES, steps=4, sampler="euler", cfg_scale=6.0, seed=7, height=64, width=64,
                          output="tensor").images
    assert (ours - plain).abs().max() > 0.05
