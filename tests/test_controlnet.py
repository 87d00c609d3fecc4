"""ControlNet against the reference (diffusers 0.42.1's ControlNetModel and StableDiffusionControlNet pipelines),
with random weights of diffusers' tiny test shapes; the zero convolutions are filled with random values, so that a
control changes the image and agreement is not agreement on zeros."""
import pytest
import torch
from PIL import Image

import nanosd
from nanosd.unet import UNetConfig
from test_sd import NEGATIVES, PLAIN, PROMPTS, SD15_SCHEDULER, init_image, tiny_reference

diffusers = pytest.importorskip("diffusers")


def reference_controlnet(ref, folder, seed):
    torch.manual_seed(seed)
    cn = diffusers.ControlNetModel.from_unet(ref.unet)
    with torch.no_grad():
        for name, p in cn.named_parameters():  # the zero convolutions, made to act
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                p.normal_(0, 0.3)
    cn.save_pretrained(folder)
    return cn


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cn")
    ref, folder = tiny_reference(tmp, vae_channels=(8, 8, 16, 16))  # f = 8: SD's hint encoder
    pipe = nanosd.load(folder)
    theirs = [reference_controlnet(ref, tmp / f"cn{i}", i) for i in (1, 2)]
    ours = [nanosd.load_controlnet(tmp / f"cn{i}", base=pipe) for i in (1, 2)]
    return ref, pipe, theirs, ours, tmp


def control_image(seed, size=64):
    g = torch.Generator().manual_seed(seed)
    edges = (torch.rand(1, 1, size // 4, size // 4, generator=g) > 0.7).float()
    edges = torch.nn.functional.interpolate(edges, size=(size, size)).expand(1, 3, -1, -1)
    return Image.fromarray((edges[0].permute(1, 2, 0) * 255).byte().numpy())


KW = dict(steps=5, sampler="euler", cfg_scale=6.0, seed=7, height=64, width=64, output="tensor")


def reference(ref, nets, images, scales, start, end, init=None, **kw):
    net = nets[0] if len(nets) == 1 else diffusers.MultiControlNetModel(nets)
    one = len(nets) == 1
    args = dict(controlnet_conditioning_scale=scales[0] if one else scales,
                control_guidance_start=start[0] if one else start, control_guidance_end=end[0] if one else end)
    if init is None:
        cls, args["image"] = diffusers.StableDiffusionControlNetPipeline, images[0] if one else images
    else:
        cls, args["control_image"] = diffusers.StableDiffusionControlNetImg2ImgPipeline, images[0] if one else images
        args.update(image=init, strength=0.6)
    p = cls(**ref.components, controlnet=net)
    p.scheduler = diffusers.EulerDiscreteScheduler.from_config(SD15_SCHEDULER)
    p.set_progress_bar_config(disable=True)
    return p(num_inference_steps=5, guidance_scale=6.0, height=64, width=64, generator=torch.Generator().manual_seed(7),
             output_type="pt", **args, **kw).images


def test_the_controlnet_itself_matches_the_reference(setup):
    _, _, theirs, ours, _ = setup
    torch.manual_seed(0)
    x, t, ctx, hint = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0]), torch.randn(2, 9, 32), torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        down, mid = theirs[0](x, t, ctx, hint, conditioning_scale=0.8, return_dict=False)
        mine = ours[0](x, t, hint, context=ctx, scales=0.8)
    assert len(mine) == len(down) + 1
    for a, b in zip(mine, [*down, mid]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert mid.abs().mean() > 1e-2  # the zero convolutions act


@pytest.mark.parametrize("n, scales, start, end, img2img", [
    (1, [1.0], [0.0], [1.0], False), (1, [0.8], [0.0], [0.6], False), (2, [0.8, 1.0], [0.0, 0.0], [1.0, 0.6], False),
    (1, [0.8], [0.0], [0.6], True), (2, [1.0, 0.8], [0.0, 0.0], [0.6, 1.0], True)])
def test_images_match_the_reference_with_one_and_two_controlnets(setup, n, scales, start, end, img2img):
    ref, pipe, theirs, ours, _ = setup
    images = [control_image(i) for i in range(n)]
    init = init_image() if img2img else None
    expected = reference(ref, theirs[:n], images, scales, start, end, init,
                         prompt=PLAIN, negative_prompt=NEGATIVES)
    controls = [nanosd.Control(net, im, s, a, b) for net, im, s, a, b in zip(ours, images, scales, start, end)]
    got = (pipe.img2img(init, PROMPTS, NEGATIVES, strength=0.6, control=controls, **KW) if img2img else
           pipe.generate(PROMPTS, NEGATIVES, control=controls, **KW)).images
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    plain = (pipe.img2img(init, PROMPTS, NEGATIVES, strength=0.6, **KW) if img2img else
             pipe.generate(PROMPTS, NEGATIVES, **KW)).images
    assert (got - plain).abs().max() > 0.05  # the control changed the picture


def test_guess_mode_scale_zero_and_the_infotext(setup):
    ref, pipe, theirs, ours, _ = setup
    image = control_image(5)
    expected = reference(ref, theirs[:1], [image], [1.0], [0.0], [1.0], prompt=PLAIN, negative_prompt=NEGATIVES,
                         guess_mode=True)
    got = pipe.generate(PROMPTS, NEGATIVES, control=[nanosd.Control(ours[0], image, mode="control")], **KW)
    torch.testing.assert_close(got.images, expected, atol=1e-4, rtol=0)
    assert 'ControlNet 0: "Module: none, Model: cn1, Weight: 1, ' in got.request.infotext()
    assert "Control Mode: ControlNet is more important" in got.request.infotext()
    # guess mode with no prompt at all: the control alone (diffusers: the empty prompt)
    expected = reference(ref, theirs[:1], [image], [1.0], [0.0], [1.0], prompt="", guess_mode=True)
    alone = pipe.generate(control=[nanosd.Control(ours[0], image, mode="control")], **KW)
    torch.testing.assert_close(alone.images, expected, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="give a non-empty prompt"):
        pipe.generate(**KW)  # without a control, a prompt is still asked for
    off = pipe.generate(PROMPTS, NEGATIVES, control=[nanosd.Control(ours[0], image, scale=0.0)], **KW).images
    torch.testing.assert_close(off, pipe.generate(PROMPTS, NEGATIVES, **KW).images, atol=0, rtol=0)
    prompt = pipe.generate(PROMPTS, NEGATIVES, control=[nanosd.Control(ours[0], image, mode="prompt")], **KW).images
    assert (prompt - got.images).abs().max() > 1e-3  # "my prompt is more important": both halves, weighted down


def test_inpainting_with_a_control_keeps_the_unmasked_part(setup):
    _, pipe, _, ours, _ = setup
    image, mask = init_image(), torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1
    out = pipe.inpaint(image, mask, PROMPTS[:1], control=[nanosd.Control(ours[0], control_image(1))], overlay=True,
                       **KW).images
    plain = pipe.inpaint(image, mask, PROMPTS[:1], **KW).images
    assert (out - plain)[..., 16:48, 16:48].abs().max() > 0.05
    torch.testing.assert_close(out * (1 - mask), image * (1 - mask), atol=1e-6, rtol=0)  # overlay


def test_original_layout_round_trip_and_diffusers_reads_it(setup, tmp_path):
    ref, pipe, theirs, ours, tmp = setup
    path = nanosd.save_controlnet(ours[0], tmp_path / "control_tiny.safetensors")
    again = nanosd.load_controlnet(path)  # no base: the architecture from the file
    assert again.hash and again.name == "control_tiny"
    image = control_image(3)
    mine = pipe.generate(PROMPTS, NEGATIVES, control=[nanosd.Control(again, image, 0.8)], **KW).images
    read = diffusers.ControlNetModel.from_single_file(str(path), config=str(tmp / "cn1"), local_files_only=True)
    expected = reference(ref, [read], [image], [0.8], [0.0], [1.0], prompt=PLAIN, negative_prompt=NEGATIVES)
    torch.testing.assert_close(mine, expected, atol=1e-4, rtol=0)
    # a diffusers folder written by nanosd reads back in diffusers
    nanosd.save_controlnet(ours[0], tmp_path / "folder")
    back = diffusers.ControlNetModel.from_pretrained(tmp_path / "folder")
    torch.testing.assert_close(back.controlnet_mid_block.weight, theirs[0].controlnet_mid_block.weight)


def test_difference_files_and_pth_files(setup, tmp_path):
    from nanosd.io import save_tensors

    _, pipe, _, ours, _ = setup
    unet = pipe.unet.state_dict()
    full = {k: v.clone() for k, v in ours[1].state_dict().items()}
    diff = {"control_model." + k: v - unet[k] if k in unet else v for k, v in full.items()}
    save_tensors({**diff, "difference": torch.tensor([])}, tmp_path / "diff.safetensors")
    with pytest.raises(ValueError, match="difference ControlNet: load it with the model"):
        nanosd.load_controlnet(tmp_path / "diff.safetensors")
    net = nanosd.load_controlnet(tmp_path / "diff.safetensors", base=pipe)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, full[k], atol=1e-6, rtol=0)
    torch.save({"control_model." + k: v for k, v in full.items()}, tmp_path / "control.pth")
    net = nanosd.load_controlnet(tmp_path / "control.pth", base=pipe)
    torch.testing.assert_close(net.middle_block_out[0].weight, full["middle_block_out.0.weight"])


def test_bad_controls_get_one_line_errors(setup, tmp_path):
    from nanosd.io import save_tensors

    _, pipe, _, ours, _ = setup
    image = control_image(0)

    def refused(match, **control):
        with pytest.raises(ValueError, match=match) as e:
            pipe.generate(PROMPTS, control=[nanosd.Control(**{"net": ours[0], "image": image, **control})], **KW)
        assert "\n" not in str(e.value)

    refused("the control image is 32x32 px and the image 64x64", image=torch.rand(1, 3, 32, 32))
    refused("3-channel", image=torch.rand(1, 1, 64, 64))
    refused("mode I;16", image=Image.new("I;16", (64, 64)))
    refused("values must be in", image=torch.rand(1, 3, 64, 64) * 3)
    refused("start 0.5 and end 0.2", start=0.5, end=0.2)
    refused("control mode 'loud'", mode="loud")
    refused("the none control takes no thresholds: give no a", a=50)
    refused("the canny control reads no mask", module="canny", image=control_image(0), mask=Image.new("L", (64, 64)))
    refused("the none module detects nothing", processor_res=512)
    other = nanosd.ControlNet(UNetConfig(in_channels=4, model_channels=32, channel_mult=[1, 2], context_dim=64, attention_levels=[1],
                                         norm_groups=2))
    refused("made for another U-Net .*context_dim=64", net=other)
    nanosd.save_controlnet(other, tmp_path / "other.safetensors")
    torch.save({"control_model." + k: v for k, v in other.state_dict().items()}, tmp_path / "other.pth")
    for name in ("other.safetensors", "other.pth"):  # with and without the config in the file
        with pytest.raises(ValueError, match="ControlNet other was made for another U-Net .*context_dim=64"):
            nanosd.load_controlnet(tmp_path / name, base=pipe)
    save_tensors({"control_model.zero_convs.0.0.weight": torch.zeros(1)}, tmp_path / "nohint.safetensors")
    with pytest.raises(ValueError, match="no hint encoder"):
        nanosd.load_controlnet(tmp_path / "nohint.safetensors")
    with pytest.raises(ValueError, match="a ControlNet, not a whole checkpoint"):
        nanosd.load(tmp_path / "nohint.safetensors")


def test_a_controlnet_trained_here_on_an_sd_checkpoint_is_read_by_diffusers(tmp_path):
    """controlnet.base = a Stable Diffusion folder: the ControlNet trains on its frozen U-Net (the canny edges of
    captioned images as controls); the run's diffusers folder gives in diffusers the image it gives in nanosd, and
    the CLI takes the run's single file."""
    from nanosd.cli import main
    from nanosd.config import load_config
    from nanosd.preprocess import canny
    from nanosd.recipes import train

    ref, folder = tiny_reference(tmp_path, vae_channels=(8, 8, 16, 16))
    images = tmp_path / "images"
    images.mkdir()
    for i in range(8):
        im = Image.new("RGB", (64, 64), (20, 20, 20))
        im.paste((200, 180, 40), (8 + 4 * i, 10, 40 + 2 * i, 50))
        im.save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(["a yellow box", "a box"][i % 2])
    cfg = load_config(values={"data": {"name": str(images), "size": 64}, "controlnet": {"base": str(folder)},
                              "train": {"batch_size": 4, "lr": 1e-2, "warmup_steps": 1, "steps": 3, "sample_every": 3,
                                        "checkpoint_every": 100, "ema_decay": 0.0},
                              "sample": {"steps": 2, "n": 2}})
    run = train(cfg, tmp_path / "control")
    assert (run / "samples.png").is_file()  # rows of control, sample, original
    pipe = nanosd.load(folder)
    net = nanosd.load_controlnet(run, base=pipe)  # the run folder: its controlnet.safetensors
    with pytest.raises(ValueError, match="is a ControlNet run: generate with its base"):
        nanosd.load(run)
    assert net.middle_block_out[0].weight.abs().max() > 0  # trained away from zero
    control = Image.open(images / "3.png")
    ours = pipe.generate(PROMPTS, NEGATIVES, control=[nanosd.Control(net, control, module="canny")], **KW).images
    edges = Image.fromarray((torch.from_numpy(canny(control)) * 255).byte().numpy())
    expected = reference(ref, [diffusers.ControlNetModel.from_pretrained(run / "controlnet")], [edges], [1.0], [0.0],
                         [1.0], prompt=PLAIN, negative_prompt=NEGATIVES)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    edges.save(tmp_path / "edges.png")
    assert main(["generate", str(folder), "a box", "--steps", "2", "--size", "64x64", "--controlnet",
                 str(run / "controlnet.safetensors"), "--control-image", str(tmp_path / "edges.png"),
                 "--control-scale", "0.7", "--out", str(tmp_path / "out.png")]) == 0
    info = Image.open(tmp_path / "out.png").text["parameters"]
    assert 'ControlNet 0: "Module: none, Model: controlnet [' in info and "Weight: 0.7" in info


def test_control_images_and_their_command(tmp_path, capsys):
    from nanosd.cli import main
    from nanosd.preprocess import canny, control_image

    picture = Image.new("RGB", (64, 48), (255, 255, 255))
    picture.paste((0, 0, 0), (16, 12, 48, 36))  # a black box on white
    edges = control_image(picture, "canny")
    assert edges.shape == (48, 64, 3) and set(edges.flatten().tolist()) == {0.0, 1.0}
    assert edges[10:14, 20:44].max(axis=0).mean() == 1 and edges[24, 30].max() == 0  # the border, not inside
    drawing = Image.new("RGB", (64, 48), (255, 255, 255))
    drawing.paste((0, 0, 0), (10, 20, 54, 22))  # a pen stroke on paper
    scribble = control_image(drawing, "scribble")
    assert scribble[20, 30, 0] == 1 and scribble[40, 30, 0] == 0  # the stroke is a line, the paper is not
    tile = control_image(picture, "tile", a=4)
    assert 0 < tile[12, 16, 0] < 1  # blurred across the border
    mask = Image.new("L", (64, 48))
    mask.paste(255, (0, 0, 8, 8))
    hole = control_image(picture, "inpaint", mask=mask)
    assert (hole[:8, :8] == -1).all() and (hole[20:, 20:] >= 0).all()
    assert (control_image(picture, "canny", b=150) == canny(picture, 100, 150)).all()  # b alone: a's default
    for bad, match in ((dict(kind="depth"), "unknown control image kind"), (dict(kind="canny", a=200, b=100),
                       "low 200 and high 100"), (dict(kind="inpaint"), "needs a mask"),
                       (dict(kind="scribble", b=3), "takes 1 threshold: give no b")):
        with pytest.raises(ValueError, match=match):
            control_image(picture, **bad)
    picture.save(tmp_path / "p.png")
    assert main(["control-image", str(tmp_path / "p.png"), "--kind", "canny", "--out", str(tmp_path / "c.png")]) == 0
    assert "canny control image, 64x48" in capsys.readouterr().out
    assert (torch.tensor(list(Image.open(tmp_path / "c.png").convert("L").getdata())) > 0).float().mean() > 0.02
    # the CLI's units: options without --controlnet, and counts that do not pair, are refused in one line
    assert main(["generate", "nothing", "x", "--control-image", "c.png"]) == 2
    assert "--control-image without --controlnet" in capsys.readouterr().err
