"""LoRA files against the reference (diffusers' load_lora_weights, through peft): random kohya-format LoRAs on tiny
SD 1.x and SDXL pipelines, touching attention, feed-forward, projections and convolutions of the U-Net and the text
encoders, alpha different from rank; weights, several at once, merging, unloading, prompt tags, bad files."""
import pytest
import torch
from safetensors.torch import save_file

import nanosd

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from test_families import reference  # noqa: E402
from test_sd import tiny_reference  # noqa: E402

PROMPTS, NEGATIVES = ["a photo of a cat", "a red house by the sea"], ["blurry", ""]
KW = dict(steps=4, sampler="euler", cfg_scale=6.0, seed=7, height=64, width=64, output="tensor")


def kohya_lora(pipe, path, seed, rank=4, alpha=2.0):
    """Random deltas for a spread of modules, under kohya's names: SD 1.x files name the U-Net as diffusers does,
    SDXL files as the original checkpoint does; the text encoders by transformers' names."""
    g = torch.Generator().manual_seed(seed)
    xl = pipe.family == "sdxl"
    unet = ["input_blocks_4_1_transformer_blocks_0_attn1_to_q", "input_blocks_4_1_transformer_blocks_1_attn2_to_k",
            "middle_block_1_transformer_blocks_0_ff_net_0_proj", "output_blocks_1_1_proj_out",
            "input_blocks_1_0_in_layers_2", "output_blocks_3_0_emb_layers_1"] if xl else \
        ["down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", "down_blocks_1_attentions_1_proj_in",
         "mid_block_attentions_0_transformer_blocks_0_attn2_to_v", "up_blocks_0_attentions_2_transformer_blocks_0_ff_net_2",
         "up_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0", "down_blocks_0_resnets_1_conv1",
         "up_blocks_1_resnets_0_time_emb_proj"]
    text = ["self_attn_q_proj", "self_attn_out_proj", "mlp_fc1"]
    names = [f"lora_unet_{n}" for n in unet] + [f"lora_te{1 if xl else ''}_text_model_encoder_layers_1_{n}" for n in text]
    if xl:
        names += [f"lora_te2_text_model_encoder_layers_2_{n}" for n in text]
    from nanosd.adapters import targets

    where, tensors = targets(pipe), {}
    for n in names:
        part, name = where[n]
        m = dict(getattr(pipe, part).named_modules())[name]
        if isinstance(m, torch.nn.Conv2d):
            down = torch.randn(rank, m.in_channels, *m.kernel_size, generator=g) * 0.2
            up = torch.randn(m.out_channels, rank, 1, 1, generator=g) * 0.2
        else:
            down = torch.randn(rank, m.in_features, generator=g) * 0.2
            up = torch.randn(m.out_features, rank, generator=g) * 0.2
        tensors.update({f"{n}.lora_down.weight": down, f"{n}.lora_up.weight": up, f"{n}.alpha": torch.tensor(alpha)})
    save_file(tensors, path)
    return path


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def model(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    ref, folder = tiny_reference(tmp) if request.param == "sd1" else reference("sdxl", tmp)
    return ref, nanosd.load(folder), tmp


def theirs(ref, loras=(), weights=()):
    ref.unload_lora_weights()
    for i, path in enumerate(loras):
        ref.load_lora_weights(str(path), adapter_name=f"l{i}")
    if loras:
        ref.set_adapters([f"l{i}" for i in range(len(loras))], adapter_weights=list(weights))
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    return ref(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=4, guidance_scale=6.0, height=64, width=64,
               output_type="pt", generator=torch.Generator().manual_seed(7)).images


def test_loras_match_the_reference_and_unload_exactly(model):
    ref, pipe, tmp = model
    a, b = kohya_lora(pipe, tmp / "a.safetensors", 1), kohya_lora(pipe, tmp / "b.safetensors", 2, rank=2, alpha=8.0)
    base = pipe.generate(PROMPTS, NEGATIVES, **KW).images
    for weight in (0.7, 1.0):
        lora = pipe.load_lora(a, weight)
        assert len(lora.deltas) == sum(k.endswith(".alpha") for k in nanosd.io.read_checkpoint(a))  # every module
        ours = pipe.generate(PROMPTS, NEGATIVES, **KW).images
        torch.testing.assert_close(ours, theirs(ref, [a], [weight]), atol=1e-4, rtol=0)
        assert (ours - base).abs().max() > 1e-2  # the LoRA acts
        pipe.unload_loras()
        assert torch.equal(pipe.generate(PROMPTS, NEGATIVES, **KW).images, base)
    pipe.load_lora(a, 0.7)
    pipe.load_lora(b, 0.5, merge=True)
    torch.testing.assert_close(pipe.generate(PROMPTS, NEGATIVES, **KW).images, theirs(ref, [a, b], [0.7, 0.5]),
                               atol=1e-4, rtol=0)
    pipe.unload_loras()
    assert torch.equal(pipe.generate(PROMPTS, NEGATIVES, **KW).images, base)


def test_a_prompt_tag_applies_a_lora_to_that_generation_only(model):
    _, pipe, tmp = model
    kohya_lora(pipe, tmp / "style.safetensors", 3)
    pipe.lora_dirs = [tmp]
    tagged = pipe.generate([p + " <lora:style:0.7>" for p in PROMPTS], NEGATIVES, **KW)
    pipe.load_lora(tmp / "style.safetensors", 0.7)
    loaded = pipe.generate(PROMPTS, NEGATIVES, **KW).images
    pipe.unload_loras()
    torch.testing.assert_close(tagged.images, loaded, atol=1e-6, rtol=0)
    assert "<lora:style:0.7>" in tagged.infotext(0)
    import hashlib

    data = (tmp / "style.safetensors").read_bytes()  # A1111's hash: the tensor data after the header
    digest = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]
    assert tagged.infotext(0).endswith(f'Lora hashes: "style: {digest}"')
    assert (pipe.generate(PROMPTS, NEGATIVES, **KW).images - loaded).abs().max() > 1e-2  # gone again
    two = pipe.generate([p + " <lora:style:0.7:0.7>" for p in PROMPTS], NEGATIVES, **KW).images  # TE_W:UNET_W
    assert torch.equal(two, tagged.images)
    off = pipe.generate([p + " <lora:style:0:0>" for p in PROMPTS], NEGATIVES, **KW).images
    assert torch.equal(off, pipe.generate(PROMPTS, NEGATIVES, **KW).images)  # the tag is not read as text
    unet_only = pipe.generate([p + " <lora:style:0:0.7>" for p in PROMPTS], NEGATIVES, **KW).images
    assert not torch.equal(unet_only, off) and not torch.equal(unet_only, two)
    with pytest.raises(FileNotFoundError, match="<lora:missing> names no file missing.safetensors"):
        pipe.generate("a cat <lora:missing:1>")


def test_bad_lora_files_get_one_line_errors_and_the_model_still_works(model, tmp_path):
    _, pipe, tmp = model
    base = pipe.generate(PROMPTS, NEGATIVES, **KW).images
    good = kohya_lora(pipe, tmp_path / "good.safetensors", 4)
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:200])
    save_file({"lora_unet_nothing_here.lora_down.weight": torch.zeros(2, 3),
               "lora_unet_nothing_here.lora_up.weight": torch.zeros(3, 2)}, tmp_path / "none.safetensors")
    key = ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" if pipe.family == "sdxl"
           else "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q")
    save_file({f"{key}.lora_down.weight": torch.zeros(2, 1280), f"{key}.lora_up.weight": torch.zeros(1280, 2)},
              tmp_path / "other.safetensors")
    from test_sd import Hostile

    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1), "payload": Hostile(tmp_path / "pwned")},
               tmp_path / "evil.pt")
    for name, words in (("cut.safetensors", "unreadable or truncated"), ("none.safetensors", "matches no layer of"),
                        ("other.safetensors", "is a LoRA for another model"), ("evil.pt", "cannot be read safely")):
        with pytest.raises(ValueError, match=words):
            pipe.load_lora(tmp_path / name)
    assert not (tmp_path / "pwned").exists()  # the pickle's code never ran
    assert not pipe.loras and torch.equal(pipe.generate(PROMPTS, NEGATIVES, **KW).images, base)


def test_cli_and_server_take_loras(model, tmp_path, capsys):
    """--lora FILE:W in generate equals load_lora; convert --lora bakes it in; the server lists --lora-dir's files
    (GET /sdapi/v1/loras) and applies tags in API prompts."""
    import base64
    import io
    import json

    import numpy as np
    from PIL import Image

    from nanosd.cli import main
    from nanosd.server import create_app
    from test_server import call, start

    ref, pipe, tmp = model
    path = kohya_lora(pipe, tmp_path / "ink.safetensors", 5)
    folder = tmp / ("sd" if pipe.family == "sd1" else "sdxl")
    args = ["a cat", "--steps", "3", "--size", "64x64", "--seed", "2", "--sampler", "euler", "--cfg", "7"]
    assert main(["generate", str(folder)] + args + ["--lora", f"{path}:0.8", "--out", str(tmp_path / "a.png")]) == 0
    pipe.load_lora(path, 0.8)
    expected = pipe.generate("a cat", steps=3, height=64, width=64, seed=2, sampler="euler", cfg_scale=7.0).images[0]
    a1111 = pipe.generate("a cat", steps=3, height=64, width=64, seed=2, sampler="euler", cfg_scale=7.0,
                          noise="a1111").images[0]  # the server seeds as A1111 does
    pipe.unload_loras()
    assert (np.asarray(Image.open(tmp_path / "a.png").convert("RGB")) == np.asarray(expected)).all()
    assert main(["convert", str(folder), str(tmp_path / "out" / "baked.safetensors"), "--lora", f"{path}:0.8"]) == 0
    from nanosd.formats import sd as layouts

    baked = layouts.split(nanosd.io.read_checkpoint(tmp_path / "out" / "baked.safetensors"), pipe.layout)["unet"]
    base = pipe.unet.state_dict()
    changed = [k for k in base if not torch.equal(base[k], baked[k])]
    assert changed and all(k.endswith("weight") for k in changed)
    pipe.lora_dirs = [tmp_path]
    url, server = start(create_app(pipe, "tiny"))
    try:
        status, listed = call(url, "/sdapi/v1/loras")
        assert status == 200 and [x["name"] for x in listed] == ["ink"]
        body = {"prompt": "a cat <lora:ink:0.8>", "steps": 3, "seed": 2, "width": 64, "height": 64,
                "sampler_name": "Euler", "cfg_scale": 7.0}
        status, out = call(url, "/sdapi/v1/txt2img", body)
        assert status == 200, out
        served = Image.open(io.BytesIO(base64.b64decode(out["images"][0]))).convert("RGB")
        assert np.abs(np.asarray(served, dtype=float) - np.asarray(a1111, dtype=float)).max() <= 1
        assert "<lora:ink:0.8>" in json.loads(out["info"])["infotexts"][0]
    finally:
        server.should_exit = True
        pipe.lora_dirs = []


def test_lycoris_kinds_follow_their_formulas(model, tmp_path):
    """LoCon with a Tucker middle, LoHa and LoKr (whole and factored) on a linear and a 3x3 convolution layer,
    against the formulas: out = base(x) + w * scale * delta(x), scale = alpha / dim as A1111 has it."""
    _, pipe, _ = model
    g = torch.Generator().manual_seed(9)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.3  # noqa: E731
    lin, conv = "input_blocks.4.1.transformer_blocks.0.attn1.to_q", "input_blocks.1.0.in_layers.2"  # 3x3
    mods = dict(pipe.unet.named_modules())
    L, C = mods[lin], mods[conv]
    o, i = L.weight.shape
    co, ci = C.weight.shape[:2]
    key = lambda name: "lora_unet_" + name.replace(".", "_")  # noqa: E731  (our own names work as keys too)
    w1a, w1b, w2a, w2b = r(o, 2), r(2, i), r(o, 2), r(2, i)
    loha = {f"{key(lin)}.hada_w1_a": w1a, f"{key(lin)}.hada_w1_b": w1b, f"{key(lin)}.hada_w2_a": w2a,
            f"{key(lin)}.hada_w2_b": w2b, f"{key(lin)}.alpha": torch.tensor(1.0)}
    down, mid, up = r(2, ci, 1, 1), r(2, 2, 3, 3), r(co, 2, 1, 1)
    locon = {f"{key(conv)}.lora_down.weight": down, f"{key(conv)}.lora_mid.weight": mid,
             f"{key(conv)}.lora_up.weight": up, f"{key(conv)}.alpha": torch.tensor(4.0)}
    k1, k2a, k2b = r(2, 2), r(o // 2, 3), r(3, i // 2)
    lokr = {f"{key(lin)}.lokr_w1": k1, f"{key(lin)}.lokr_w2_a": k2a, f"{key(lin)}.lokr_w2_b": k2b,
            f"{key(lin)}.alpha": torch.tensor(6.0)}
    c1, c2 = r(2, 2), r(co // 2, ci // 2, 3, 3)
    lokr_conv = {f"{key(conv)}.lokr_w1": c1, f"{key(conv)}.lokr_w2": c2}
    x, xc = torch.randn(1, 5, i), torch.randn(1, ci, 8, 8)
    F = torch.nn.functional
    expected = {
        "loha": (L, x, (w1a @ w1b) * (w2a @ w2b) * (1.0 / 2)),
        "lokr": (L, x, torch.kron(k1, k2a @ k2b) * (6.0 / 3)),
        "locon": (C, xc, None),
        "lokr_conv": (C, xc, torch.kron(c1[:, :, None, None], c2) * 1.0),  # two whole factors: no scale
    }
    for name, tensors in (("loha", loha), ("lokr", lokr), ("locon", locon), ("lokr_conv", lokr_conv)):
        save_file(tensors, tmp_path / f"{name}.safetensors")
        m, inp, dw = expected[name]
        with torch.no_grad():
            base = m(inp)
            if name == "locon":  # down 1x1, the Tucker middle with the layer's padding, up 1x1; alpha / rank
                want = base + 0.6 * 2.0 * F.conv2d(F.conv2d(F.conv2d(inp, down), mid, padding=1), up)
            elif m is C:
                want = base + 0.6 * F.conv2d(inp, dw, padding=1)
            else:
                want = base + 0.6 * inp @ dw.T
            pipe.load_lora(tmp_path / f"{name}.safetensors", 0.6)
            got = m(inp)
            pipe.unload_loras()
            pipe.load_lora(tmp_path / f"{name}.safetensors", 0.6, merge=True)
            merged = m(inp)
            pipe.unload_loras()
            assert torch.equal(m(inp), base)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(merged, want, rtol=1e-4, atol=1e-4)
        assert (want - base).abs().max() > 1e-2


def test_a_diffusers_peft_lora_matches_the_reference(model):
    """diffusers' own LoRA format (unet.* / text_encoder.* with lora_A / lora_B, no alpha: scale 1)."""
    ref, pipe, tmp = model
    kohya = nanosd.io.read_checkpoint(kohya_lora(pipe, tmp / "k.safetensors", 11))
    from nanosd.adapters import targets

    where, peft = targets(pipe), {}
    dotted = {v: k for k, v in where.items() if k.startswith(("unet.", "text_encoder"))}  # (part, ours) -> theirs
    for key, v in kohya.items():
        stem, suffix = key.split(".", 1)
        if suffix == "alpha":
            continue
        peft[f"{dotted[where[stem]]}.{'lora_A' if 'down' in suffix else 'lora_B'}.weight"] = v
    save_file(peft, tmp / "peft.safetensors")
    lora = pipe.load_lora(tmp / "peft.safetensors", 0.8)
    assert len(lora.deltas) == len(peft) // 2 and {s for _, _, s in lora.deltas.values()} == {1.0}
    ours = pipe.generate(PROMPTS, NEGATIVES, **KW).images
    pipe.unload_loras()
    torch.testing.assert_close(ours, theirs(ref, [tmp / "peft.safetensors"], [0.8]), atol=1e-4, rtol=0)


def test_textual_inversion_matches_the_reference(model, tmp_path):
    """A two-vector embedding (A1111's .pt for SD 1.x, clip_l + clip_g safetensors for SDXL) used by its file's
    stem in the prompt and the negative prompt; an embedding of another width is refused in one line."""
    ref, pipe, tmp = model
    g = torch.Generator().manual_seed(4)
    ref.unload_lora_weights()
    if pipe.family == "sdxl":
        l, big = torch.randn(2, 32, generator=g), torch.randn(2, 48, generator=g)
        path = tmp_path / "inkstyle.safetensors"
        save_file({"clip_l": l, "clip_g": big}, path)
        ref.load_textual_inversion(l, token="inkstyle", text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
        ref.load_textual_inversion(big, token="inkstyle", text_encoder=ref.text_encoder_2, tokenizer=ref.tokenizer_2)
    else:
        path = tmp_path / "inkstyle.pt"
        torch.save({"string_to_param": {"*": torch.randn(2, 32, generator=g)}, "string_to_token": {"*": 265},
                    "name": "inkstyle", "step": 100}, path)
        ref.load_textual_inversion(str(path), token="inkstyle")
    prompts, negatives = ["a photo of inkstyle cat", "a red house"], ["inkstyle", ""]
    base = pipe.generate(prompts, negatives, **KW).images
    assert pipe.load_embedding(path) == "inkstyle"
    ours = pipe.generate(prompts, negatives, **KW).images
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    expected = ref(prompts, negative_prompt=negatives, num_inference_steps=4, guidance_scale=6.0, height=64, width=64,
                   output_type="pt", generator=torch.Generator().manual_seed(7)).images
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
    assert (ours - base).abs().max() > 1e-2
    assert pipe.embeddings["inkstyle"]["vectors"] == 2
    from nanosd.server import create_app
    from test_server import call, start

    url, server = start(create_app(pipe, "tiny"))
    try:
        status, listed = call(url, "/sdapi/v1/embeddings")
    finally:
        server.should_exit = True
    assert status == 200 and listed["loaded"]["inkstyle"]["shape"] == 32
    save_file({"emb_params": torch.randn(2, 99)}, tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match="wide.safetensors is an embedding for another model"):
        pipe.load_embedding(tmp_path / "wide.safetensors")


def test_a_lora_and_an_embedding_trained_here_on_an_sd_checkpoint_are_read_by_diffusers(tmp_path):
    """lora.base = a Stable Diffusion folder: the deltas train on its frozen U-Net (its VAE's latents, its CLIP on
    the captions), and the kohya file (diffusers' U-Net names for SD 1.x) gives in diffusers the image it gives
    in nanosd; with lora.embedding, a new token's vectors train instead (A1111's emb_params file)."""
    from PIL import Image

    from nanosd.config import load_config
    from nanosd.recipes import train

    ref, folder = tiny_reference(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(8):
        pixels = (torch.rand(8, 8, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(pixels).resize((64, 64), Image.BILINEAR).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(["a red square", "a blue circle"][i % 2])
    cfg = load_config(values={"data": {"name": str(images), "size": 64},
                              "lora": {"base": str(folder), "rank": 4, "alpha": 4.0},
                              "train": {"batch_size": 4, "lr": 5e-2, "warmup_steps": 1, "steps": 3, "sample_every": 0,
                                        "checkpoint_every": 100, "ema_decay": 0.0},
                              "sample": {"steps": 2, "n": 2}})
    run = train(cfg, tmp_path / "lora")
    tensors = nanosd.io.read_checkpoint(run / "lora.safetensors")
    assert any(k.startswith("lora_unet_down_blocks_1_attentions_0_") for k in tensors)  # kohya's SD 1.x names
    pipe = nanosd.load(folder)
    lora = pipe.load_lora(run / "lora.safetensors", 1.0)
    assert len(lora.deltas) == len(tensors) // 3
    ours = pipe.generate(PROMPTS, NEGATIVES, **KW).images
    pipe.unload_loras()
    assert (ours - pipe.generate(PROMPTS, NEGATIVES, **KW).images).abs().max() > 1e-3  # it learned something
    torch.testing.assert_close(ours, theirs(ref, [run / "lora.safetensors"], [1.0]), atol=1e-4, rtol=0)

    # textual inversion, trained: one new token's vectors (the captions get the token first), read by diffusers
    cfg.lora.embedding, cfg.lora.vectors, cfg.lora.init = "squiggle", 2, "shape"
    tokens = train(cfg, tmp_path / "token")
    learned = nanosd.io.read_checkpoint(tokens / "squiggle.safetensors")["emb_params"]
    start = pipe.text_encoder.embeddings.token_embedding.weight[pipe.tokenizer.ids("shape")[0]]
    assert learned.shape == (2, 32) and (learned - start).abs().max() > 1e-3  # it moved from its start
    again = nanosd.load(tokens)  # the run: its base with the embedding
    prompts = ["a photo of squiggle", "a red house"]
    ours = again.generate(prompts, NEGATIVES, **KW).images
    ref.unload_lora_weights()
    ref.load_textual_inversion(str(tokens / "squiggle.safetensors"), token="squiggle")
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    expected = ref(prompts, negative_prompt=NEGATIVES, num_inference_steps=4, guidance_scale=6.0, height=64, width=64,
                   output_type="pt", generator=torch.Generator().manual_seed(7)).images
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


def test_dora_follows_its_formula(model, tmp_path):
    """kohya's dora_scale (DoRA's magnitude m, Liu et al. 2024) on a linear and a 3x3 convolution layer, against
    the formula peft uses: W' = m (W + s dW) / |W + s dW| with the norm per output channel, the bias kept
    (diffusers 0.42.1 drops dora_scale from kohya files, so it is no reference here)."""
    _, pipe, _ = model
    g = torch.Generator().manual_seed(13)
    mods = dict(pipe.unet.named_modules())
    F = torch.nn.functional
    for name in ("input_blocks.4.1.transformer_blocks.0.attn1.to_q", "input_blocks.1.0.in_layers.2"):
        m = mods[name]
        conv = isinstance(m, torch.nn.Conv2d)
        out_ch, in_ch = m.weight.shape[:2]
        down = torch.randn(4, in_ch, *(m.kernel_size if conv else ()), generator=g) * 0.2
        up = torch.randn(out_ch, 4, *((1, 1) if conv else ()), generator=g) * 0.2
        magnitude = m.weight.detach().flatten(1).norm(dim=1) * (1 + 0.3 * torch.rand(out_ch, generator=g))
        key = "lora_unet_" + name.replace(".", "_")
        save_file({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0),
                   f"{key}.dora_scale": magnitude}, tmp_path / "dora.safetensors")
        s = 0.8 * 2.0 / 4
        dw = torch.einsum("or,rikl->oikl", up.flatten(1), down) if conv else up @ down
        v = m.weight.detach() + s * dw
        w = v * (magnitude / v.flatten(1).norm(dim=1)).view(-1, *[1] * (v.ndim - 1))
        x = torch.randn(2, in_ch, 8, 8, generator=g) if conv else torch.randn(2, 5, in_ch, generator=g)
        with torch.no_grad():
            base = m(x)
            want = F.conv2d(x, w, m.bias, m.stride, m.padding) if conv else F.linear(x, w, m.bias)
            for merge in (False, True):
                pipe.load_lora(tmp_path / "dora.safetensors", 0.8, merge=merge)
                got = m(x)
                pipe.unload_loras()
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            assert torch.equal(m(x), base) and (want - base).abs().max() > 1e-2


def test_options_that_would_mean_nothing_are_refused(model, tmp_path, capsys):
    """Never ignored silently: folders on convert, an embedding for a model without CLIP, guidance rescale on a
    model without prompts."""
    from nanosd.cli import main

    _, pipe, tmp = model
    folder = tmp / ("sd" if pipe.family == "sd1" else "sdxl")
    assert main(["convert", str(folder), str(tmp_path / "x.safetensors"), "--lora-dir", str(tmp_path)]) == 2
    assert "--lora-dir and --embedding-dir serve prompts" in capsys.readouterr().err
    unprompted = nanosd.Pipeline(pipe.unet, pipe.schedule, pipe.cfg, pipe.autoencoder)
    with pytest.raises(ValueError, match="embeddings are read by CLIP text encoders"):
        unprompted.load_embedding(tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="guidance_rescale rescales classifier-free guidance"):
        unprompted.generate(guidance_rescale=0.5)
