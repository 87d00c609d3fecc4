"""The `nanosd` command: a thin shell over the trainer, the pipeline, the data and the figures."""
import argparse
import os
import sys
import warnings
from pathlib import Path


def cmd_train(a):
    from .config import load_config
    from .recipes import train

    if a.tiny_decoder:  # a finished latent run: its tiny decoder, distilled
        from .recipes import distill_tiny_decoder

        if a.overrides or a.autoencoder:
            raise ValueError("--tiny-decoder distils a finished run's autoencoder: give the run folder alone")
        print(f"done: {distill_tiny_decoder(a.config, minutes=a.minutes, steps=a.steps)}")
        return
    if Path(a.config).is_dir():  # resume a run folder
        if a.overrides:
            raise ValueError("overrides cannot change a run being resumed: start a new run with a config file")
        run = train(None, a.config, minutes=a.minutes, steps=a.steps, autoencoder=a.autoencoder)
    else:
        cfg = load_config(a.config, a.overrides)
        out = a.out or Path("runs") / Path(a.config).stem
        run = train(cfg, out, minutes=a.minutes, steps=a.steps, autoencoder=a.autoencoder)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks
        from .run import GRID, WEIGHTS

        print(f"done: {run} (weights {run / WEIGHTS}, samples {run / GRID})")


def cmd_generate(a):
    from .images import save_grid, save_png, to_pil
    from .pipeline import load
    from .request import Hires
    from .run import is_run

    control_flags(a)
    replay = replayed(a)
    pipe = load(a.model, precision=a.precision, compile=a.compile, vae=a.vae, ema=a.ema, config=a.config,
                family=a.family, prediction=a.prediction, threads=a.threads, device=a.device)
    if a.tiny_decoder:
        pipe.load_tiny_decoder(a.tiny_decoder)
    pipe.progress = True
    add_loras(pipe, a)
    replayed_prompt = replay.pop("prompt", None)
    # an image replayed is one image; a run folder's default is a grid of 16
    prompt, n, nrow = a.prompt or replayed_prompt, a.n or (16 if is_run(a.model) and not replay else 1), None
    if a.prompts:  # a row of --n images for each line of the file
        if a.prompt:
            raise ValueError("give a prompt or --prompts FILE, not both")
        lines = [line.strip() for line in Path(a.prompts).read_text(encoding="utf-8").splitlines() if line.strip()]
        prompt, nrow = [p for p in lines for _ in range(n)], n
    width, height = _size(a.size, "--size") or (None, None)
    original, crop = _size(a.original_size, "--original-size"), _size(a.crop, "--crop")
    resize_w, resize_h = _size(a.seed_resize_from, "--seed-resize-from") or (None, None)
    hires = {k: v for k, v in (("scale", a.hires_scale), ("upscaler", a.hires_upscaler), ("steps", a.hires_steps),
                               ("strength", a.hires_strength)) if v is not None}
    given = dict(steps=a.steps, sampler=a.sampler, scheduler=a.scheduler, cfg_scale=a.cfg, seed=a.seed, eta=a.eta,
                 clip_skip=a.clip_skip, height=height, width=width, autoguidance=a.autoguidance,
                 guidance_rescale=a.guidance_rescale, original_size=original and original[::-1],
                 crops_coords_top_left=crop and crop[::-1], aesthetic_score=a.aesthetic_score, noise=a.seed_mode,
                 rng=a.rng, subseed=a.subseed, subseed_strength=a.subseed_strength, seed_resize_from_w=resize_w,
                 seed_resize_from_h=resize_h, eta_noise_seed_delta=a.ensd,
                 hires=Hires(**{**vars(replay.get("hires") or Hires()), **hires}) if hires else None,
                 negative_prompt=a.negative, cfg_end=a.cfg_end, cache_interval=a.cache_interval,
                 cache_depth=a.cache_depth, tome=a.tome, decoder=a.decoder, fast=a.fast or None)
    kw = {**replay, **{k: v for k, v in given.items() if v is not None}}  # flags given win over the image's
    negative, strength = kw.pop("negative_prompt", None), kw.pop("strength", None)  # an image's: img2img's only
    strength = getattr(a, "strength", None) if getattr(a, "strength", None) is not None else strength
    kw.update(batch_size=n, output="tensor", control=controls(pipe, a))
    if a.command in ("inpaint", "outpaint"):  # A1111's inpainting options, where given
        kw.update({k: v for k, v in (("mask_blur", a.mask_blur), ("inpainting_fill", a.fill),
                                     ("inpaint_full_res", a.only_masked or None), ("inpaint_full_res_padding", a.padding),
                                     ("inpainting_mask_invert", a.invert_mask or None)) if v is not None})
    image = open_image(a.image) if getattr(a, "image", None) else None
    if a.command == "outpaint" and not a.size:  # the canvas's size, not the image's
        kw.pop("height", None), kw.pop("width", None)
    if a.command == "img2img":
        made = pipe.img2img(image, prompt, negative, strength=0.75 if strength is None else strength, **kw)
    elif a.command == "outpaint":
        made = pipe.outpaint(image, prompt, negative, left=a.left, right=a.right, up=a.up, down=a.down,
                             **({"strength": strength} if strength is not None else {}), **kw)
    elif a.command == "inpaint":
        made = pipe.inpaint(image, open_image(a.mask), prompt, negative, strength=1.0 if strength is None else strength,
                            overlay=a.overlay, **kw)
    else:
        made = pipe.generate(prompt, negative, image=image, **kw)
    images, name = made.images, Path(a.model).stem if Path(a.model).is_file() else Path(a.model).name
    out = Path(a.out)
    if a.out.endswith("/") or out.is_dir():
        if out.is_dir() and any(out.iterdir()):
            raise ValueError(f"output folder {out} is not empty: give a new or empty folder (nothing is overwritten)")
        out.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(images):
            save_png(to_pil(im), out / f"{i:05d}.png", f"{made.infotext(i, name)}, Batch pos: {i}")
        print(f"wrote {len(images)} images to {out}/")
    else:
        if out.suffix.lower() != ".png":
            raise ValueError(f"--out {a.out} must be a .png file (one image, or a grid) or a folder ending in '/'")
        if len(images) == 1:
            save_png(to_pil(images[0]), out, made.infotext(0, name))
            print(f"wrote {out}")
        else:
            save_grid(images, out, made.infotext(0, name), nrow=nrow)
            print(f"wrote a grid of {len(images)} images to {out}")


def replayed(a) -> dict:
    """--from IMAGE: the Request fields its `parameters` give (A1111's or nanosd's); what they cannot replay (the
    model, LoRA hashes, ControlNet units, keys nanosd does not know) is said, one note each."""
    from .images import read_parameters
    from .request import from_infotext

    if not a.from_image:
        return {}
    fields, rest = from_infotext(read_parameters(open_image(a.from_image), a.from_image))
    name = Path(a.model).stem if Path(a.model).is_file() else Path(a.model).name
    for key, value in rest.items():
        if (key, value) == ("Model", name):  # made with this model
            continue
        warnings.warn(f"{a.from_image}: {key}: {value} is not replayed (load that model, LoRA or ControlNet yourself)")
    return fields


def cmd_info(a):
    from .images import read_parameters
    from .request import from_infotext

    if not a.image:  # the machine: what load() chooses here, and why
        import torch

        from .fast import HEAP_KEEP, HEAP_TOP_KEEP, choose_precision, cpu_facts, keep_freed_buffers, measured, set_threads

        set_threads(a.threads)
        facts = cpu_facts()
        print(f"CPU: {facts['name']}, {facts['physical_cores']} physical cores; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, capability {facts['capability']}")
        print(f"flags: {' '.join(facts['flags']) or 'none of avx2, avx512f, avx512_bf16, amx_bf16'}")
        if {"avx512_bf16", "amx_bf16", "bf16"} & set(facts["flags"]):
            speed = measured(facts)
            print(f"matmul (1024², cached): fp32 {speed['fp32']:.0f} GFLOP/s, bf16 {speed['bf16']:.0f} GFLOP/s")
        precision, why = choose_precision(facts)
        print(f'precision="auto" -> {precision}: {why}')
        print(f"freed memory kept for reuse (blocks under {HEAP_KEEP >> 20} MB, the heap's top up to "
              f"{HEAP_TOP_KEEP >> 20} MB): " + ("yes (glibc)" if keep_freed_buffers() else "no (not glibc)"))
        for i in range(torch.cuda.device_count()):  # where load() runs by default when there is one
            precision, why = choose_precision(device=f"cuda:{i}")
            print(f'cuda:{i}: precision="auto" -> {precision}: {why}')
        return

    text = read_parameters(open_image(a.image), a.image)
    fields, rest = from_infotext(text)
    print(text)
    print("\nreplayed by `nanosd generate MODEL --from IMAGE`:")
    for k, v in fields.items():
        print(f"  {k} = {v!r}")
    if rest:
        print("not replayed (the model, LoRAs, ControlNet units, or keys nanosd does not know):")
        for k, v in rest.items():
            print(f"  {k}: {v}")


def add_loras(pipe, a, merge=False):
    """--lora FILE[:W] (each loaded at its weight; merged into the weights for convert) and --lora-dir DIR."""
    from .adapters import setup

    setup(pipe, a.lora, a.lora_dir, merge, a.embedding_dir)


def control_flags(a) -> dict:
    """The --control-* options given, checked against the --controlnet count (before any model loads)."""
    nets = a.controlnet or []
    per_unit = {"image": a.control_image, "scale": a.control_scale, "start": a.control_start, "end": a.control_end,
                "mode": a.control_mode, "module": a.control_module}
    given = [f"--control-{k}" for k, v in per_unit.items() if v]
    if not nets and given:
        raise ValueError(f"{', '.join(given)} without --controlnet: give the ControlNet file they are for")
    for k, v in per_unit.items():
        if v and len(v) not in (1, len(nets)):
            raise ValueError(f"{len(v)} --control-{k} for {len(nets)} --controlnet: give one for all, or one each")
    if nets and not a.control_image:
        raise ValueError("--controlnet needs --control-image IMG (the control: edges, a scribble, ...; "
                         "`nanosd control-image` makes one)")
    return per_unit


def controls(pipe, a):
    """--controlnet FILE --control-image IMG [--control-scale S ...], repeatable: unit i takes the i-th of each
    option given, or the one value given for all."""
    from .controlnet import Control, load_controlnet

    nets, per_unit = a.controlnet or [], control_flags(a)
    loaded = {}
    units = []
    for i, net in enumerate(nets):
        if net not in loaded:
            loaded[net] = load_controlnet(net, base=pipe)
        pick = {k: v[i if len(v) > 1 else 0] for k, v in per_unit.items() if v}
        pick["image"] = open_image(pick["image"])
        units.append(Control(loaded[net], **pick))
    return units


def cmd_control_image(a):
    from .images import save_png
    from .preprocess import control_image, to_image

    made = control_image(open_image(a.image), a.kind, open_image(a.mask) if a.mask else None, a.a, a.b)
    save_png(to_image(made), a.out)
    print(f"wrote {a.out} ({a.kind} control image, {made.shape[1]}x{made.shape[0]})")


def _size(text, flag):
    """WIDTHxHEIGHT (or XxY) as two ints, or None."""
    if not text:
        return None
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"{flag} {text!r} must be WIDTHxHEIGHT, e.g. 512x512") from None
    return w, h


def cmd_convert(a):
    from .pipeline import load, save

    if a.lora_dir or a.embedding_dir:  # folders serve prompts, and convert has none
        raise ValueError("convert bakes --lora FILE[:W] into the checkpoint; --lora-dir and --embedding-dir serve "
                         "prompts when generating: give them to generate or serve")
    if a.tiny_decoder or a.precision != "auto" or a.device:  # convert reads exactly and writes --dtype
        raise ValueError("convert reads the weights in fp32 on the CPU and writes --dtype; --precision, --device and "
                         "--tiny-decoder are for generate and serve: leave them out")
    pipe = load(a.src, "fp32", threads=a.threads, vae=a.vae, ema=a.ema, config=a.config, family=a.family,
                prediction=a.prediction, device="cpu")
    add_loras(pipe, a, merge=True)  # written merged: a checkpoint with the LoRAs baked in
    out = save(pipe, a.dst, dtype={"fp32": None, "fp16": torch_dtype("float16"), "bf16": torch_dtype("bfloat16")}[a.dtype])
    print(f"wrote {out}")


def torch_dtype(name):
    import torch

    return getattr(torch, name)


def open_image(path):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"cannot read the image {path}: {e}") from None


def cmd_data(a):
    from .data import fetch, load_dataset

    path = fetch(a.name)
    ds = load_dataset(a.name, 28 if "mnist" in a.name else 64)
    print(f"{a.name}: {path} ({len(ds)} training images, {len(ds.classes)} classes)")


def cmd_data_shard(a):
    import torch
    from tqdm import tqdm

    from .data import load_dataset
    from .run import autoencoder_dir, is_run, load_autoencoder, weights_key
    from .shards import write_shards

    size = a.size or (28 if "mnist" in a.src else 64)
    data = load_dataset(a.src, size)  # read once, in order
    encode = key = None
    if a.autoencoder:  # a latent run (or its autoencoder/), or a Stable Diffusion model: E(x) beside each image
        if is_run(autoencoder_dir(a.autoencoder)):
            folder = autoencoder_dir(a.autoencoder)
            ae, key = load_autoencoder(folder), weights_key(folder)
        else:
            from .pipeline import load

            ae, key = load(a.autoencoder, "fp32").autoencoder, weights_key(a.autoencoder)

        @torch.no_grad()
        def encode(x):
            return torch.cat([ae.encode(b).mode() for b in x.split(8)])
    batches = data.once(64) if hasattr(data, "once") else \
        (data.take(torch.arange(i, min(i + 64, len(data)))) for i in range(0, len(data), 64))
    out, count = write_shards(tqdm(batches, desc="writing shards", unit="batch", leave=False), a.dst, a.shard_size,
                              classes=data.classes, encode=encode, autoencoder_key=key)
    print(f"wrote {count} samples in {len(list(out.glob('*.tar')))} shards to {out}"
          + (f", with latents of {a.autoencoder}" if encode else "")
          + (f" ({data.skipped} undecodable samples skipped)" if getattr(data, "skipped", 0) else ""))


def cmd_serve(a):
    from .server import serve

    serve(a.model, host=a.host, port=a.port, api_key=a.api_key, family=a.family, prediction=a.prediction,
          config=a.config, loras=a.lora, lora_dirs=a.lora_dir, embedding_dirs=a.embedding_dir,
          controlnet_dirs=a.controlnet_dir or (), models_dir=a.models_dir, outdir=a.outdir, precision=a.precision,
          threads=a.threads, tiny_decoder=a.tiny_decoder, device=a.device)


def cmd_eval(a):
    from .fid import evaluate_run

    score, floor = evaluate_run(a.run, n=a.n, seed=a.seed)
    print(f"FID {score:.2f} at N={a.n} (real-vs-real floor at the same N: {floor:.2f})")


def cmd_eval_concat(a):
    from .metrics import evaluate_concat

    scores = evaluate_concat(a.run, n=a.n, seed=a.seed)
    print(", ".join(f"{k} {v:.4f}" for k, v in scores.items()) + f" (N={a.n} held-out images)")


def cmd_eval_control(a):
    from .metrics import evaluate_control

    scores = evaluate_control(a.run, n=a.n, seed=a.seed, out=a.out)
    print(", ".join(f"{k} {v:.4f}" for k, v in scores.items()) + f" (N={a.n} held-out images)"
          + (f"; samples in {a.out}/" if a.out else ""))


def cmd_explain(a):
    from . import explain

    out = explain.run(a.what, a.run, a.out, a.prompt)
    print(f"wrote {out}")


def load_options(p):
    p.add_argument("--family", choices=["sd1", "sd2", "sdxl", "sdxl-refiner"],
                   help="SD checkpoints: the family (default: told from the file), checked against the file")
    p.add_argument("--prediction", choices=["eps", "v"],
                   help="SD single files: what the U-Net predicts (a file cannot say; SD 2.x 768-v models: v)")
    p.add_argument("--config", help="SD single files: a diffusers folder whose configs describe the architecture")
    p.add_argument("--lora", action="append", help="a LoRA file, FILE or FILE:WEIGHT (repeatable)")
    p.add_argument("--lora-dir", action="append", help="where prompt tags <lora:NAME:W> find NAME.safetensors")
    p.add_argument("--embedding-dir", action="append", help="textual-inversion embeddings, each used in prompts by "
                                                            "its file's stem (repeatable)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto (default): bf16 where this CPU does it faster (`nanosd info`), else fp32 (exact); "
                        "on a GPU bf16, or fp16 where it has no bf16")
    p.add_argument("--threads", type=int, help="torch's threads (default: one per physical core; $NANOSD_THREADS)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: the GPU if there is one)")
    p.add_argument("--tiny-decoder", help="TAESD's decoder file for this model (taesd_decoder.safetensors; "
                                          "taesdxl_decoder for SDXL): previews, and --decoder tiny")


def main(argv=None):
    p = argparse.ArgumentParser(prog="nanosd", description="Stable Diffusion, whole, in one small codebase.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a recipe (or resume a run folder)")
    t.add_argument("config", help="a TOML config such as configs/mnist-pixel.toml, or a run folder to resume")
    t.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=3e-4")
    t.add_argument("--out", help="run folder (default runs/CONFIG_NAME)")
    t.add_argument("--minutes", type=float, help="wall-clock budget in minutes")
    t.add_argument("--steps", type=int, help="budget in optimizer steps")
    t.add_argument("--autoencoder", help="latent recipes: reuse the autoencoder of this run folder")
    t.add_argument("--tiny-decoder", action="store_true", help="a finished latent run folder: distil its "
                   "autoencoder's decoder into a tiny one (TAESD's shape; RUN/tiny_decoder, default 300 steps)")
    t.set_defaults(fn=cmd_train)

    def sampling(g, image=True):
        g.add_argument("--negative", help="negative prompt (classifier-free guidance steers away from it)")
        g.add_argument("--cfg", type=float, help="guidance scale (default: the model's; 7.5 for SD)")
        g.add_argument("--prompts", help="a text file of prompts, one per line: a row of --n images for each")
        if image:
            g.add_argument("--image", help="the spatial condition of a model trained with one (an edge map, ...)")
        g.add_argument("--n", type=int, help="images (default: 16 for a run folder, 1 for an SD checkpoint)")
        g.add_argument("--steps", type=int)
        g.add_argument("--sampler", help="ddpm, ddim, plms, euler, euler_a, heun, dpmpp_2m, unipc, lcm (LCM "
                                         "checkpoints and LCM-LoRAs: 4-8 steps, --cfg 1-2), or A1111's names, "
                                         "with a schedule type if you like ('DPM++ 2M Karras'); default: the model's")
        g.add_argument("--eta", type=float, help="DDIM's eta (0: deterministic, 1: DDPM-like); other samplers refuse it")
        g.add_argument("--autoguidance", type=float, help="run folders trained with train.guide_at: the step away "
                                                          "from the early weights (1: off; default: the run's)")
        g.add_argument("--seed", type=int)
        g.add_argument("--from", dest="from_image", help="replay an A1111 (or nanosd) image: its PNG parameters give "
                                                          "the prompt, seed, sampler, size, ...; flags given win")
        g.add_argument("--seed-mode", choices=["diffusers", "a1111"],
                       help="diffusers (default): one generator for the batch, as diffusers draws; a1111: A1111's "
                            "seeds (a generator per image, seed + i) and k-diffusion's schedules, so that an A1111 "
                            "seed gives its picture")
        g.add_argument("--scheduler", help="the schedule type: Automatic, Karras, Exponential, SGM Uniform, "
                                           "Align Your Steps, ... (A1111's; most need --seed-mode a1111)")
        g.add_argument("--rng", choices=["GPU", "CPU", "NV"], help="A1111's RNG source (default GPU: CUDA's, on any "
                                                                  "device)")
        g.add_argument("--subseed", type=int, help="A1111's variation seed")
        g.add_argument("--subseed-strength", type=float, help="how far toward the variation seed's noise (0-1)")
        g.add_argument("--seed-resize-from", help="A1111's: WIDTHxHEIGHT the seed's noise was drawn at")
        g.add_argument("--ensd", type=int, help="A1111's eta noise seed delta (ancestral samplers)")
        g.add_argument("--hires-scale", type=float, help="A1111's hires fix: upscale by this (2), then redraw")
        g.add_argument("--hires-upscaler", help="Latent (default), Latent (bicubic), Latent (nearest), ..., Lanczos")
        g.add_argument("--hires-steps", type=int, help="the redraw's steps (default: --steps)")
        g.add_argument("--hires-strength", type=float, help="the redraw's denoising strength (0.7)")
        g.add_argument("--size", help="WIDTHxHEIGHT, e.g. 512x512 (default: the model's, or the input image's)")
        g.add_argument("--clip-skip", type=int, help="A1111's Clip skip: 2 reads CLIP's penultimate layer (1)")
        g.add_argument("--guidance-rescale", type=float,
                       help="diffusers' guidance_rescale (zero-terminal-SNR fine-tunes: about 0.7)")
        g.add_argument("--original-size", help="SDXL's size conditioning: WIDTHxHEIGHT (default: the output's)")
        g.add_argument("--crop", help="SDXL's crop conditioning: LEFTxTOP (default: 0x0)")
        g.add_argument("--aesthetic-score", type=float, help="the SDXL refiner's score (default 6)")
        g.add_argument("--fast", action="store_true", help="less work per image, measured to keep quality: "
                                                          "--cfg-end 0.5 --cache-interval 3 --tome 0.5 (flags given "
                                                          "win)")
        g.add_argument("--cfg-end", type=float, help="guide only the first fraction of the steps (1: all)")
        g.add_argument("--cache-interval", type=int, help="DeepCache: the whole U-Net every N-th call, the others "
                                                          "reuse its deep features (1: off)")
        g.add_argument("--cache-depth", type=int, help="DeepCache: the skip below which features are reused (1)")
        g.add_argument("--tome", type=float, help="token merging: the ratio of tokens merged in self-attention at "
                                                  "the largest resolution (0: off; 0.5 typical)")
        g.add_argument("--decoder", choices=["full", "tiny"], help="tiny: the tiny decoder for the final image")
        g.add_argument("--controlnet", action="append", help="a ControlNet (original .safetensors/.pth, a diff "
                                                             "file, or a diffusers folder); repeatable")
        g.add_argument("--control-image", action="append", help="its control image (one per --controlnet, or one)")
        g.add_argument("--control-scale", action="append", type=float, help="its weight (default 1)")
        g.add_argument("--control-start", action="append", type=float, help="the fraction of steps it starts at (0)")
        g.add_argument("--control-end", action="append", type=float, help="the fraction of steps it ends at (1)")
        g.add_argument("--control-mode", action="append", choices=["balanced", "prompt", "control"],
                       help="A1111's control mode: balanced, prompt (my prompt is more important), control "
                            "(ControlNet is more important; diffusers' guess mode)")
        g.add_argument("--control-module", action="append", choices=["none", "canny", "scribble", "inpaint", "tile"],
                       help="make the control from --control-image first (default none: it is the control)")
        load_options(g)
        g.add_argument("--vae", help="SD checkpoints: a VAE file to use instead of the checkpoint's")
        g.add_argument("--ema", action="store_true", help="SD single files: the EMA weights (model_ema.*)")
        g.add_argument("--compile", action="store_true", help="torch.compile the U-Net (the first image pays for it)")
        g.add_argument("--out", default="samples.png", help="FILE.png for an image or a grid, or DIR/ for one PNG each")
        g.set_defaults(fn=cmd_generate)

    model_help = "a run folder, an SD v1.x .safetensors/.ckpt file, or a diffusers folder"
    g = sub.add_parser("generate", help="text-to-image (or sample a trained model)")
    g.add_argument("model", help=model_help)
    g.add_argument("prompt", nargs="?", help="conditioned models: the prompt (text, or a class name)")
    sampling(g)
    g = sub.add_parser("img2img", help="redraw IMAGE after the prompt (SDEdit: noise it, then denoise)")
    g.add_argument("model", help=model_help)
    g.add_argument("image")
    g.add_argument("prompt", nargs="?")
    g.add_argument("--strength", type=float, help="how much of the schedule to redo (0-1]; default 0.75")
    sampling(g, image=False)
    g = sub.add_parser("inpaint", help="fill the white part of MASK in IMAGE")
    g.add_argument("model", help=model_help)
    g.add_argument("image")
    g.add_argument("mask", help="white = the hole to fill, black = keep")
    g.add_argument("prompt", nargs="?", help="the prompt, for text-conditioned models")
    g.add_argument("--strength", type=float, help="default 1")
    g.add_argument("--overlay", action=argparse.BooleanOptionalAction, default=None,
                   help="paste the original pixels back outside the mask (A1111's overlay; default: the run's "
                        "sample.inpaint_overlay)")
    sampling(g, image=False)

    def inpainting(g):
        g.add_argument("--mask-blur", type=int, help="blur the mask by this many px (a soft seam; outpaint: 8)")
        g.add_argument("--fill", choices=["fill", "original", "latent noise", "latent nothing"],
                       help="A1111's masked content: what the hole starts from (original; outpaint: fill)")
        g.add_argument("--only-masked", action="store_true", help="A1111's inpaint area \"only masked\": inpaint the "
                                                                  "mask's box at --size, then paste it back")
        g.add_argument("--padding", type=int, help="only masked: px around the mask's box (0)")
        g.add_argument("--invert-mask", action="store_true", help="inpaint the black part instead")

    inpainting(g)
    g = sub.add_parser("outpaint", help="extend IMAGE on chosen sides and paint the new area")
    g.add_argument("model", help=model_help)
    g.add_argument("image")
    g.add_argument("prompt", nargs="?", help="the prompt, for text-conditioned models")
    for side in ("left", "right", "up", "down"):
        g.add_argument(f"--{side}", type=int, default=0, help=f"px to add on the {side}")
    g.add_argument("--strength", type=float, help="default 1")
    inpainting(g)
    sampling(g, image=False)
    g = sub.add_parser("upscale", help="super-resolve IMAGE (a super-resolution model)")
    g.add_argument("model", help="a run folder")
    g.add_argument("image", help="the low-resolution image")
    g.add_argument("prompt", nargs="?", help="the prompt, for text-conditioned models")
    sampling(g, image=False)

    c = sub.add_parser("convert", help="an SD checkpoint from one layout to the other (single file <-> diffusers)")
    c.add_argument("src", help="an SD v1.x .safetensors/.ckpt file or a diffusers folder")
    c.add_argument("dst", help="DST.safetensors (the original single-file layout) or a new folder (diffusers)")
    c.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="weights of a single file")
    c.add_argument("--vae", help="a VAE file to put in place of the source's")
    c.add_argument("--ema", action="store_true", help="take a single file's EMA weights")
    load_options(c)
    c.set_defaults(fn=cmd_convert)

    sv = sub.add_parser("serve", help="a web page and an A1111-compatible HTTP API over a model")
    sv.add_argument("model", help=model_help)
    sv.add_argument("--host", default="127.0.0.1", help="any other than 127.0.0.1 needs --api-key")
    sv.add_argument("--port", type=int, default=7860)
    sv.add_argument("--api-key", help="every request must then carry it (X-API-Key header)")
    sv.add_argument("--models-dir", help="more checkpoints (files, run folders, diffusers folders): A1111's "
                                         "sd_model_checkpoint option switches among them")
    sv.add_argument("--outdir", default="outputs", help="where requests with save_images write (A1111's outputs/)")
    sv.add_argument("--controlnet-dir", action="append", help="ControlNets the API's units name (A1111's "
                                                              "alwayson_scripts.controlnet; repeatable)")
    load_options(sv)
    sv.set_defaults(fn=cmd_serve)

    i = sub.add_parser("info", help="this machine: its CPU and the arithmetic load() chooses for it; or, given an "
                                    "image, the generation parameters it carries and what --from replays of them")
    i.add_argument("image", nargs="?")
    i.add_argument("--threads", type=int, help="torch's threads to measure with (default: one per physical core)")
    i.set_defaults(fn=cmd_info)

    ci = sub.add_parser("control-image", help="a ControlNet's control image from a picture (canny edges, ...)")
    ci.add_argument("image")
    ci.add_argument("--kind", default="canny", choices=["canny", "scribble", "inpaint", "tile", "none"])
    ci.add_argument("--mask", help="inpaint: the hole (white)")
    ci.add_argument("--a", type=float, help="canny: low threshold (100); scribble: threshold (32); tile: downscale (2)")
    ci.add_argument("--b", type=float, help="canny: high threshold (200)")
    ci.add_argument("--out", default="control.png")
    ci.set_defaults(fn=cmd_control_image)

    d = sub.add_parser("data", help="data sets")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dg = dsub.add_parser("get", help="fetch a data set into the cache")
    dg.add_argument("name", help="mnist, fashion-mnist or emoji")
    dg.set_defaults(fn=cmd_data)
    ds = dsub.add_parser("shard", help="write a data set as WebDataset tar shards (image, captions, label, latents)")
    ds.add_argument("src", help="mnist, fashion-mnist, emoji, a folder of images, or tar shards (a folder, a brace "
                                "pattern, URLs: images of any size are resized and centre-cropped)")
    ds.add_argument("dst", help="a new folder for shard-NNNNNN.tar and index.json")
    ds.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    ds.add_argument("--size", type=int, help="image size (default: 28 for MNIST-like sets, else 64)")
    ds.add_argument("--autoencoder", help="also store E(x) (latent.npy) from this run folder's autoencoder or this "
                                          "Stable Diffusion model's VAE: recipes on the same frozen autoencoder "
                                          "(--autoencoder, or init / a LoRA base) then skip encoding")
    ds.set_defaults(fn=cmd_data_shard)

    v = sub.add_parser("eval", help="metrics of a trained model")
    vsub = v.add_subparsers(dest="eval_command", required=True)
    vf = vsub.add_parser("fid", help="FID of samples against the real data, with the real-vs-real floor")
    vf.add_argument("run")
    vf.add_argument("--n", type=int, default=1000)
    vf.add_argument("--seed", type=int, default=0)
    vf.set_defaults(fn=cmd_eval)
    vc = vsub.add_parser("concat", help="inpainting / edge-map / upscaling models: how they keep to the condition")
    vc.add_argument("run")
    vc.add_argument("--n", type=int, default=200)
    vc.add_argument("--seed", type=int, default=0)
    vc.set_defaults(fn=cmd_eval_concat)

    vn = vsub.add_parser("control", help="a ControlNet run: edge F1 of its samples with and without it")
    vn.add_argument("run")
    vn.add_argument("--n", type=int, default=200)
    vn.add_argument("--seed", type=int, default=0)
    vn.add_argument("--out", help="write the samples here (control/ and plain/, one folder per label)")
    vn.set_defaults(fn=cmd_eval_control)

    e = sub.add_parser("explain", help="figures: forward, reverse, latent, attention, concat, size, control, seeds")
    e.add_argument("what", choices=["forward", "reverse", "latent", "attention", "concat", "size", "control", "seeds"])
    e.add_argument("run", nargs="?", help="run folder (all but forward)")
    e.add_argument("prompt", nargs="?", help="attention, reverse, seeds: the prompt")
    e.add_argument("--out", help="output PNG")
    e.set_defaults(fn=cmd_explain)

    a, extra = p.parse_known_args(argv)  # overrides may come after the options too
    bad = [x for x in extra if "=" not in x or x.startswith("-") or a.command != "train"]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        a.overrides = a.overrides + extra
    try:
        with warnings.catch_warnings():  # notes (what was assumed): one line each, every time
            warnings.simplefilter("always", UserWarning)
            warnings.showwarning = lambda message, *_, **__: print(f"nanosd: note: {message}", file=sys.stderr)
            a.fn(a)
    except KeyboardInterrupt as e:
        print(f"nanosd: {e}" if str(e) else "nanosd: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"nanosd: error: {e}", file=sys.stderr)
        return 2
    return 0
