"""The `nanosd` command: a thin shell over the trainer, the pipeline, the data and the figures."""
import argparse
import sys
from pathlib import Path


def cmd_train(a):
    from .config import load_config
    from .train import train

    if Path(a.config).is_dir():  # resume a run folder
        if a.overrides:
            raise ValueError("overrides cannot change a run being resumed: start a new run with a config file")
        run = train(None, a.config, minutes=a.minutes, steps=a.steps, autoencoder=a.autoencoder)
    else:
        cfg = load_config(a.config, a.overrides)
        out = a.out or Path("runs") / Path(a.config).stem
        run = train(cfg, out, minutes=a.minutes, steps=a.steps, autoencoder=a.autoencoder)
    print(f"done: {run} (weights {run}/model.safetensors, samples {run}/samples.png)")


def cmd_generate(a):
    from .pipeline import infotext, load, save_grid, save_png, to_pil

    pipe = load(a.model)
    image, mask = (open_image(p) if p else None for p in (a.image, getattr(a, "mask", None)))
    prompt, nrow = a.prompt, None
    if a.prompts:  # a row of --n images for each line of the file
        if a.prompt:
            raise ValueError("give a prompt or --prompts FILE, not both")
        lines = [line.strip() for line in Path(a.prompts).read_text(encoding="utf-8").splitlines() if line.strip()]
        prompt, nrow = [p for p in lines for _ in range(a.n)], a.n
    images = pipe.generate(prompt, a.negative, batch_size=a.n, steps=a.steps, sampler=a.sampler, cfg_scale=a.cfg,
                           seed=a.seed, eta=a.eta, image=image, mask=mask, output="tensor")
    name = Path(a.model).name
    out = Path(a.out)
    if a.out.endswith("/") or out.is_dir():
        if out.is_dir() and any(out.iterdir()):
            raise ValueError(f"output folder {out} is not empty: give a new or empty folder (nothing is overwritten)")
        out.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(images):
            save_png(to_pil(im), out / f"{i:05d}.png", f"{infotext(pipe, im.shape[-2:], name, i)}, Batch pos: {i}")
        print(f"wrote {len(images)} images to {out}/")
    else:
        if out.suffix.lower() != ".png":
            raise ValueError(f"--out {a.out} must be a .png file (a grid) or a folder ending in '/'")
        save_grid(images, out, infotext(pipe, images.shape[-2:], name), nrow=nrow)
        print(f"wrote a grid of {len(images)} images to {out}")


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


def cmd_eval(a):
    from .fid import evaluate_run

    score, floor = evaluate_run(a.run, n=a.n, seed=a.seed)
    print(f"FID {score:.2f} at N={a.n} (real-vs-real floor at the same N: {floor:.2f})")


def cmd_eval_concat(a):
    from .metrics import evaluate_concat

    scores = evaluate_concat(a.run, n=a.n, seed=a.seed)
    print(", ".join(f"{k} {v:.4f}" for k, v in scores.items()) + f" (N={a.n} held-out images)")


def cmd_explain(a):
    from . import explain

    out = explain.run(a.what, a.run, a.out, a.prompt)
    print(f"wrote {out}")


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
    t.set_defaults(fn=cmd_train)

    def sampling(g, image=True):
        g.add_argument("--negative", help="negative prompt (classifier-free guidance steers away from it)")
        g.add_argument("--cfg", type=float, help="guidance scale (default: the run's condition.guidance)")
        g.add_argument("--prompts", help="a text file of prompts, one per line: a row of --n images for each")
        if image:
            g.add_argument("--image", help="the spatial condition of a model trained with one (an edge map, ...)")
        g.add_argument("--n", type=int, default=16)
        g.add_argument("--steps", type=int)
        g.add_argument("--sampler", help="ddpm or ddim (default: the run's)")
        g.add_argument("--eta", type=float)
        g.add_argument("--seed", type=int)
        g.add_argument("--out", default="samples.png", help="FILE.png for a grid, or DIR/ for one PNG per image")
        g.set_defaults(fn=cmd_generate)

    g = sub.add_parser("generate", help="sample images from a trained model")
    g.add_argument("model", help="a run folder")
    g.add_argument("prompt", nargs="?", help="conditioned models: the prompt (text, or a class name)")
    sampling(g)
    g = sub.add_parser("inpaint", help="fill the white part of MASK in IMAGE (an inpainting model)")
    g.add_argument("model", help="a run folder")
    g.add_argument("image")
    g.add_argument("mask", help="white = the hole to fill, black = keep")
    g.add_argument("prompt", nargs="?", help="the prompt, for text-conditioned inpainting models")
    sampling(g, image=False)
    g = sub.add_parser("upscale", help="super-resolve IMAGE (a super-resolution model)")
    g.add_argument("model", help="a run folder")
    g.add_argument("image", help="the low-resolution image")
    g.add_argument("prompt", nargs="?", help="the prompt, for text-conditioned models")
    sampling(g, image=False)

    d = sub.add_parser("data", help="data sets")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dg = dsub.add_parser("get", help="fetch a data set into the cache")
    dg.add_argument("name", help="mnist, fashion-mnist or emoji")
    dg.set_defaults(fn=cmd_data)

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

    e = sub.add_parser("explain", help="figures: forward, reverse, latent, attention, concat")
    e.add_argument("what", choices=["forward", "reverse", "latent", "attention", "concat"])
    e.add_argument("run", nargs="?", help="run folder (all but forward)")
    e.add_argument("prompt", nargs="?", help="attention: the prompt")
    e.add_argument("--out", help="output PNG")
    e.set_defaults(fn=cmd_explain)

    a, extra = p.parse_known_args(argv)  # overrides may come after the options too
    bad = [x for x in extra if "=" not in x or x.startswith("-") or a.command != "train"]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        a.overrides = a.overrides + extra
    try:
        a.fn(a)
    except KeyboardInterrupt as e:
        print(f"nanosd: {e}" if str(e) else "nanosd: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"nanosd: error: {e}", file=sys.stderr)
        return 2
    return 0
