"""Tokenizers and text encoders against their references (transformers, open_clip; test-only), the conditioner's
masking, guidance arithmetic, and a tiny text-conditioned run end to end."""
import importlib.util

import pytest
import torch
from PIL import Image

from conftest import assert_near
from nanosd import load
from nanosd.cli import main
from nanosd.condition import ConditionConfig, Conditioner
from nanosd.data import ImageSet
from nanosd.io import pip_files
from nanosd.pipeline import Pipeline
from nanosd.request import Request
from nanosd.schedule import Schedule
from nanosd.text import MINILM, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, TextConditioner
from nanosd.recipes import train
from nanosd.unet import UNet

HARD = [
    "a photo of an astronaut riding a horse on mars",
    "Hello,   World!!! 123 4567 3.14159 1,000,000",
    "naïve café résumé Ünïcödé São Paulo Ångström",
    "emoji 🚀🐶😍 and ♥ ★ → ©",
    "it's you're we've I'm they'll she'd DON'T",
    "tabs\tand\nnewlines\r\n  and  spaces ",
    "CAPS and MiXeD, (parentheses) [brackets] {braces} <angle> \"quotes\" `ticks`",
    "中文字符 日本語のテキスト 한국어",
    "ß ǅ İstanbul ﬁ ½ x² ①",
    "e\u0301 (e + combining acute) and é",
    "<|endoftext|> in the middle <|startoftext|>",
    "a " * 100,
    "supercalifragilisticexpialidocious" * 8,
    "",
]


@pytest.fixture(scope="module")
def clip_tokenizer():
    return CLIPTokenizer.from_vocab()


def test_clip_tokenizer_matches_transformers(clip_tokenizer):
    transformers = pytest.importorskip("transformers")
    tok = clip_tokenizer
    merges = [m for m, _ in sorted(tok.ranks.items(), key=lambda kv: kv[1])]
    ref = transformers.CLIPTokenizer(vocab=tok.encoder, merges=merges)
    expected = ref(HARD, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert tok(HARD).tolist() == expected


def test_clip_tokenizer_with_ftfy_matches_open_clip():
    pytest.importorskip("ftfy")
    spec = importlib.util.spec_from_file_location("open_clip_tokenizer", pip_files("open-clip-torch", "open_clip/tokenizer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the tokenizer file alone: open_clip's package import needs torchvision
    ref = module.SimpleTokenizer(str(pip_files("open-clip-torch", "open_clip/bpe_simple_vocab_16e6.txt.gz")))
    texts = HARD[:-4] + ["&amp;lt;b&amp;gt;bold&amp;lt;/b&amp;gt; &quot;quoted&quot;", "mojibake: cafÃ©", "a " * 100]
    ours = CLIPTokenizer.from_vocab(ftfy=True, pad_token="!")  # open_clip pads with id 0, which is "!"
    assert ours(texts).tolist() == ref(texts).tolist()


def test_over_long_text_is_truncated_and_ends_with_the_end_token(clip_tokenizer):
    ids = clip_tokenizer(["a " * 100, "cat"])
    assert ids.shape == (2, 77) and ids[0, -1] == clip_tokenizer.eos and ids[0, 0] == clip_tokenizer.bos
    assert ids[1, :3].tolist() == [clip_tokenizer.bos, clip_tokenizer.encoder["cat</w>"], clip_tokenizer.eos]
    assert (ids[1, 3:] == clip_tokenizer.pad_id).all()


@pytest.fixture(scope="module")
def minilm():
    return TextConditioner("minilm")


def test_wordpiece_matches_transformers(minilm):
    tokenizers = pytest.importorskip("tokenizers")
    ref = tokenizers.Tokenizer.from_file(str(pip_files(*MINILM) / "tokenizer.json"))  # the model's own tokenizer
    ref.no_padding()
    texts = [t for t in HARD if t.strip()] + ["unaffable tokenization", "x\u0000y\u200bz", "hello-world, it's 9:30."]
    assert [minilm.tokenizer.tokens(t) for t in texts] == [e.ids for e in ref.encode_batch(texts)]


def test_minilm_states_match_transformers(minilm):
    transformers = pytest.importorskip("transformers")
    import json

    folder = pip_files(*MINILM)
    ref = transformers.BertModel(transformers.BertConfig(**json.loads((folder / "config.json").read_text())),
                                 add_pooling_layer=False).eval()
    ref.load_state_dict(minilm.model.state_dict(), strict=False)
    prompts = ["a handwritten seven", "the digit 7 written by hand, slightly slanted"]
    context, mask, _ = minilm(prompts)
    ids = torch.zeros(mask.shape, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : mask[i].sum()] = torch.tensor(minilm.tokenizer.tokens(p))
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    assert context.shape == (2, mask.shape[1], 384) and mask[0].sum() < mask[1].sum() == mask.shape[1]
    assert torch.allclose(context[mask], expected[mask], atol=1e-5)
    assert (context[~mask] == 0).all()


def test_clip_text_model_matches_transformers():
    transformers = pytest.importorskip("transformers")
    c = CLIPTextConfig(vocab_size=1000, width=64, layers=2, heads=4, max_length=77)
    torch.manual_seed(0)
    ours = CLIPTextModel(c).eval()
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=1)).eval()
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=False)  # the same names
    assert not unexpected and all("position_ids" in k for k in missing)
    ids = torch.randint(0, 1000, (2, 77))
    with torch.no_grad():
        assert torch.allclose(ours(ids), ref(input_ids=ids).last_hidden_state, atol=1e-5)
        penultimate = ref(input_ids=ids, output_hidden_states=True).hidden_states[-2]
        assert torch.allclose(ours(ids, skip=1), ref.final_layer_norm(penultimate), atol=1e-5)


def test_padding_is_masked_out_of_cross_attention(minilm):
    """A prompt's prediction does not depend on how far its batch was padded for a longer prompt."""
    cond = Conditioner(ConditionConfig(encoder="minilm"))
    torch.manual_seed(0)
    unet = wake(UNet(load_cfg_unet(cond)).eval())
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([500])
    with torch.no_grad():
        alone = unet(x, t, **cond(["a seven"]))
        padded = unet(torch.cat([x, x]), torch.cat([t, t]), **cond(["a seven", "a much longer prompt about a seven"]))
    assert cond(["a seven", "a much longer prompt"])["context_mask"][0].sum() == 4
    assert_near(alone[0], padded[0], 1e-5)  # batch 1 against batch 2: other kernels, so a relative bound
    assert not torch.allclose(padded[0], padded[1], atol=1e-3)


def wake(unet):
    """The output layers start at zero: give them weights that pass a signal."""
    for p in unet.parameters():
        if not p.any():
            torch.nn.init.normal_(p, std=0.1)
    return unet


def load_cfg_unet(cond):
    from nanosd.unet import UNetConfig

    return UNetConfig(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[0, 1], num_heads=2,
                      **cond.unet_options(1, 1))


def test_guidance_arithmetic(tiny_cfg):
    """scale 1 is the conditional prediction, 0 the unconditional one, and s extrapolates linearly between."""
    tiny_cfg.condition = ConditionConfig(encoder="labels", classes=["a", "b"])
    cond = Conditioner(tiny_cfg.condition)
    tiny_cfg.unet.num_classes = 3
    torch.manual_seed(0)
    unet = wake(UNet(tiny_cfg.unet).eval())
    pipe = Pipeline(unet, Schedule("linear"), tiny_cfg, conditioner=cond)
    c, u = pipe.encode_prompts(Request(["a", "b"]).resolve(pipe))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor(300)
    with torch.no_grad():
        eps = {s: pipe.denoiser(c, u, s)(x, t) for s in (0.0, 1.0, 4.0)}
        e_c, e_u = unet(x, t.expand(2), **c), unet(x, t.expand(2), **u)
    # the guided batch is [uncond; cond] (4 images), the references 2: other GEMM blocking, so relative bounds
    assert_near(eps[1.0], e_c, 1e-5), assert_near(eps[0.0], e_u, 1e-5)
    assert_near(eps[4.0], e_u + 4 * (e_c - e_u), 1e-4)
    assert not torch.allclose(e_c, e_u)


@pytest.mark.parametrize("encoder", ["minilm", "clip", "labels"])
def test_tiny_conditioned_run_end_to_end(tmp_path, tiny_cfg, monkeypatch, encoder):
    data = ImageSet(torch.rand(32, 1, 8, 8) * 2 - 1, torch.arange(32) % 2, ["cat", "dog"],
                    [[f"a {c}", f"the {c}"] for c in ["cat", "dog"] * 16])
    monkeypatch.setattr("nanosd.recipes.load_dataset", lambda *a, **k: data)
    tiny_cfg.condition = ConditionConfig(encoder=encoder, drop_prob=0.5,
                                         clip=CLIPTextConfig(width=32, layers=1, heads=2, max_length=16))
    tiny_cfg.train.sample_every = 3
    run = train(tiny_cfg, tmp_path / "run", steps=4)
    assert (run / "samples.png").exists()
    pipe = load(run)
    prompt = "cat" if encoder == "labels" else "a photo of a cat"
    a = pipe.generate(prompt, batch_size=2, seed=1, output="tensor").images
    b = pipe.generate(prompt, "dog" if encoder == "labels" else "a dog", batch_size=2, seed=1, cfg_scale=5.0,
                      output="tensor").images
    assert a.shape == (2, 1, 8, 8) and not torch.allclose(a, b)
    assert main(["generate", str(run), prompt, "--negative", "dog", "--cfg", "2", "--n", "2", "--steps", "3",
                 "--out", f"{tmp_path / 'out'}/"]) == 0
    params = Image.open(tmp_path / "out" / "00000.png").text["parameters"].splitlines()
    assert params[0] == prompt and params[1] == "Negative prompt: dog" and "CFG scale: 2.0" in params[2]
    if encoder != "labels":  # the attention figure reads the prompt's half of the guided batch, not the empty one's
        from nanosd.explain import attention_maps

        _, tokens, maps = attention_maps(pipe, prompt)
        assert len(tokens) >= 5 and len(maps) == 5
        assert all((m.sum(0) - 1).abs().max() < 1e-4 for _, m in maps)  # over every position (CLIP's padding too)
        shares = torch.stack([m[:len(tokens)].mean((1, 2)) for _, m in maps])  # (steps, tokens)
        assert (shares[:, 2:] > 1e-3).all()  # the words after "[CLS] a" (the empty prompt has two tokens) are seen
        assert main(["explain", "attention", str(run), prompt, "--out", str(tmp_path / "att.png")]) == 0
        assert main(["explain", "seeds", str(run), prompt, "--out", str(tmp_path / "seeds.png")]) == 0
        assert Image.open(tmp_path / "seeds.png").size[0] > 600
        with pytest.MonkeyPatch.context() as m:  # where precision="auto" picks bf16, the figures draw from it too
            m.setenv("NANOSD_PRECISION", "bf16")
            assert main(["explain", "attention", str(run), prompt, "--out", str(tmp_path / "att16.png")]) == 0


def test_bad_prompts_get_one_line_errors(tmp_path, tiny_cfg, capsys, monkeypatch):
    data = ImageSet(torch.rand(16, 1, 8, 8) * 2 - 1, torch.arange(16) % 2, ["cat", "dog"],
                    [[c] for c in ["cat", "dog"] * 8])
    monkeypatch.setattr("nanosd.recipes.load_dataset", lambda *a, **k: data)
    tiny_cfg.condition = ConditionConfig(encoder="clip", clip=CLIPTextConfig(width=32, layers=1, heads=2, max_length=16))
    run = train(tiny_cfg, tmp_path / "run", steps=1)
    capsys.readouterr()  # the training progress
    for args, words in (([""], "non-empty prompt"), (["cat", "--sampler", "k_lms"], "unknown sampler"),
                        (["cat", "--sampler", "euler", "--eta", "0.5"], "always runs at eta 0"), ([], "non-empty prompt")):
        assert main(["generate", str(run), *args, "--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1
    tiny_cfg.condition = None
    plain = train(tiny_cfg, tmp_path / "plain", steps=1)
    capsys.readouterr()
    assert main(["generate", str(plain), "a cat", "--out", str(tmp_path / "y.png")]) == 2
    assert "without text or labels" in capsys.readouterr().err


def test_an_sdxl_shaped_model_trains_here(tmp_path, tiny_cfg, monkeypatch):
    """Linear projections, transformer depth per level, the pooled prompt and SDXL's size ids through label_emb:
    the one trainer trains it (some samples as enlarged half-size originals, told so), and the size ids reach
    the U-Net when sampling."""
    from dataclasses import replace

    data = ImageSet(torch.rand(32, 1, 8, 8) * 2 - 1, torch.arange(32) % 2, ["cat", "dog"],
                    [[f"a {c}"] for c in ["cat", "dog"] * 16])
    monkeypatch.setattr("nanosd.recipes.load_dataset", lambda *a, **k: data)
    tiny_cfg.unet = replace(tiny_cfg.unet, attention_levels=[0, 1], transformer_depth=[1, 2], linear_proj=True)
    tiny_cfg.condition = ConditionConfig(encoder="clip", micro="size", micro_dim=8, micro_lowres=0.5,
                                         clip=CLIPTextConfig(width=32, layers=1, heads=2, max_length=16, projection=16))
    run = train(tiny_cfg, tmp_path / "run", steps=3)
    pipe = load(run)
    u = pipe.cfg.unet
    assert u.adm_in_channels == 16 + 6 * 8 and u.linear_proj and pipe.unet.label_emb[0][0].in_features == 64
    assert len(pipe.unet.middle_block[1].transformer_blocks) == 2 and pipe.unet.input_blocks[1][1].proj_in.weight.ndim == 2
    kw = dict(batch_size=2, seed=1, output="tensor")
    full = pipe.generate("a cat", **kw).images
    half = pipe.generate("a cat", original_size=(4, 4), **kw).images
    assert torch.equal(full, pipe.generate("a cat", original_size=(8, 8), **kw).images)  # the default: the true size
    assert not torch.allclose(full, half)
    x0 = torch.randn(4, 1, 8, 8)
    low, ids = pipe.conditioner.low_resolution(x0, torch.Generator().manual_seed(0))
    halves = ids[:, 0] == 4
    assert halves.any() and (~halves).any() and torch.equal(low[~halves], x0[~halves])
    assert torch.equal(low[halves], torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(x0[halves], 2),
                                                                    scale_factor=2))


def test_a_lora_trains_on_a_frozen_run_and_loads_as_a1111_would(tmp_path, tiny_cfg, monkeypatch):
    """A LoRA recipe (lora.base = a run) trains only the deltas with the one trainer, writes them in kohya's format;
    the LoRA run loads as its base patched; at weight 0 the base comes back exactly."""
    from dataclasses import replace

    from nanosd.config import LoraConfig
    from nanosd.io import load_tensors

    digits = ImageSet(torch.rand(32, 1, 8, 8) * 2 - 1, torch.arange(32) % 2, ["cat", "dog"],
                      [[f"a {c}"] for c in ["cat", "dog"] * 16])
    items = ImageSet(-torch.rand(32, 1, 8, 8), torch.arange(32) % 2, ["sneaker", "bag"],
                     [[f"a {c}"] for c in ["sneaker", "bag"] * 16])
    tiny_cfg.condition = ConditionConfig(encoder="clip", clip=CLIPTextConfig(width=32, layers=1, heads=2, max_length=16))
    monkeypatch.setattr("nanosd.recipes.load_dataset", lambda *a, **k: digits)
    base = train(tiny_cfg, tmp_path / "base", steps=3)
    before = {k: v.clone() for k, v in load_tensors(base / "model.safetensors").items()}
    monkeypatch.setattr("nanosd.recipes.load_dataset", lambda *a, **k: items)
    lora_cfg = replace(tiny_cfg, lora=LoraConfig(base=str(base), rank=2, alpha=4.0),
                       train=replace(tiny_cfg.train, lr=1e-2), sample=replace(tiny_cfg.sample, prompts=[]))
    run = train(lora_cfg, tmp_path / "lora", steps=4)
    after = load_tensors(base / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base is untouched
    tensors = load_tensors(run / "lora.safetensors")
    assert tensors and all(k.startswith("lora_unet_") for k in tensors)
    assert any(k.endswith("lora_up.weight") and v.abs().max() > 0 for k, v in tensors.items())  # it learned
    kw = dict(batch_size=2, seed=1, output="tensor")
    plain = load(base)
    patched = load(run)
    assert patched.cfg.sample.prompts  # the LoRA run's grids prompt its own data
    with_lora = patched.generate("a sneaker", **kw).images
    assert not torch.allclose(with_lora, plain.generate("a sneaker", **kw).images)
    plain.load_lora(run / "lora.safetensors", 0.0)
    assert torch.equal(plain.generate("a sneaker", **kw).images, load(base).generate("a sneaker", **kw).images)
    plain.unload_loras()
    plain.load_lora(run / "lora.safetensors", 1.0)
    assert torch.equal(plain.generate("a sneaker", **kw).images, with_lora)
