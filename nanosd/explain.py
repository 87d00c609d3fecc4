"""Figures that show what the model does: the forward process and the reverse trajectory."""
from pathlib import Path

import torch

from .schedule import SCHEDULES, Schedule


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out):
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _show(ax, image, title=None):
    """image (C, H, W) in [-1, 1]."""
    im = ((image.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).float().cpu().numpy()
    ax.imshow(im[..., 0] if im.shape[-1] == 1 else im, cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([]), ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def forward_figure(out, image=None, ts=(0, 50, 100, 250, 500, 750, 999), seed=0):
    """One real image noised at several t under each schedule, beside the alpha-bar and SNR curves."""
    plt = _plt()
    if image is None:
        from .data import load_dataset

        image = load_dataset("mnist", 28, split="test").images[0]
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(seed))
    fig = plt.figure(figsize=(2 + 1.3 * len(ts) + 7, 1.5 * len(SCHEDULES)))
    grid = fig.add_gridspec(len(SCHEDULES), len(ts) + 2, width_ratios=[1] * len(ts) + [3, 3])
    for r, name in enumerate(SCHEDULES):
        s = Schedule(name)
        for c, t in enumerate(ts):
            ax = fig.add_subplot(grid[r, c])
            _show(ax, s.q_sample(image[None], torch.tensor([t]), noise[None])[0], f"t={t}" if r == 0 else None)
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
    ab_ax, snr_ax = fig.add_subplot(grid[:, -2]), fig.add_subplot(grid[:, -1])
    for name in SCHEDULES:
        ab = Schedule(name).alphas_cumprod
        ab_ax.plot(ab, label=name)
        snr_ax.plot((ab / (1 - ab)).log10(), label=name)
    ab_ax.set(title="ᾱ_t", xlabel="t"), snr_ax.set(title="log10 SNR = log10 ᾱ/(1−ᾱ)", xlabel="t")
    ab_ax.legend(fontsize=8), snr_ax.legend(fontsize=8)
    fig.suptitle("Forward process: x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε")
    return _save(plt, fig, out)


def reverse_figure(out, run, prompt=None, n_show=8, seed=0):
    """One sampling run: x_t (top) and the predicted x_0 (bottom) at evenly spaced steps."""
    from .pipeline import load

    plt = _plt()
    pipe = load(run)
    frames = []
    pipe.generate(prompt, batch_size=1, seed=seed, output="tensor",
                  callback=lambda i, t, x, x0: frames.append((int(t), x[0], x0[0])))
    pick = sorted(set(round(i * (len(frames) - 1) / (n_show - 1)) for i in range(n_show)))
    fig, axes = plt.subplots(2, len(pick), figsize=(1.4 * len(pick), 3.2), squeeze=False)
    seen = (lambda z: pipe.decode(z[None].float())[0]) if pipe.autoencoder else (lambda x: x)  # latents as images
    with torch.no_grad():
        for c, i in enumerate(pick):
            t, x, x0 = frames[i]
            _show(axes[0, c], seen(x), f"t={t}")
            _show(axes[1, c], seen(x0))
    axes[0, 0].set_ylabel("D(z_t)" if pipe.autoencoder else "x_t", fontsize=9)
    axes[1, 0].set_ylabel("predicted D(z_0)" if pipe.autoencoder else "predicted x_0", fontsize=9)
    fig.suptitle(f"Reverse process: {pipe.cfg.sample.sampler}, {len(frames)} steps, seed {seed}", fontsize=10)
    return _save(plt, fig, out)


@torch.no_grad()
def latent_figure(out, run, n=6):
    """Held-out images, each channel of their latents z = E(x), and the reconstructions D(z), side by side."""
    from .data import load_dataset
    from .pipeline import load

    plt = _plt()
    pipe = load(run)
    if pipe.autoencoder is None:
        raise ValueError(f"{run} is a pixel-space model: explain latent needs a latent model (with an autoencoder)")
    x = load_dataset(pipe.cfg.data.name, pipe.cfg.data.size, split="test").spread(n)
    z = pipe.autoencoder.encode(x).mode()
    rec = pipe.autoencoder.decode(z)
    c = z.shape[1]
    fig, axes = plt.subplots(n, c + 2, figsize=(1.3 * (c + 2), 1.3 * n), squeeze=False)
    for r in range(n):
        _show(axes[r, 0], x[r], "x" if r == 0 else None)
        for k in range(c):
            ax = axes[r, 1 + k]
            ax.imshow(z[r, k].float().numpy(), cmap="RdBu_r")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(f"z[{k}]", fontsize=8)
        _show(axes[r, -1], rec[r], "D(E(x))" if r == 0 else None)
    f = pipe.autoencoder.cfg.factor
    fig.suptitle(f"{x.shape[-1]} px images, {c}x{z.shape[-1]}x{z.shape[-1]} latents (f={f}), reconstructions",
                 fontsize=10)
    return _save(plt, fig, out)


def attention_maps(pipe, prompt, seed=0):
    """(image, tokens, [(t, maps)]): the prompt's image and, after each sampling step, every token's
    cross-attention map (averaged over heads and layers, at the latent size; over the tokens, each pixel's sums
    to 1), read from the conditional half of the guided batch."""
    import torch.nn.functional as F

    from .unet import BasicTransformerBlock

    text = pipe.conditioner.text if pipe.conditioner else None
    if text is None:
        raise ValueError("explain attention needs a text-conditioned model, and this is not one")
    if not prompt:
        raise ValueError('explain attention needs a prompt: nanosd explain attention RUN "a prompt"')
    layers = [m for m in pipe.unet.modules() if isinstance(m, BasicTransformerBlock) and m.has_context]
    size, maps = pipe.cfg.latent_size, []

    def step(i, t, x, x0):  # average this step's maps over layers: the conditional half of the guided batch
        per_layer = []
        for block in layers:
            w = block.attn2.probe[0][-x.shape[0]:]  # the batch is [uncond; cond]
            side = int(w.shape[1] ** 0.5)
            per_layer.append(F.interpolate(w.transpose(1, 2).reshape(w.shape[0], -1, side, side), size=(size, size),
                                           mode="bilinear"))
            block.attn2.probe.clear()
        maps.append((int(t), torch.stack(per_layer).mean(0)[0]))

    for block in layers:
        block.attn2.probe = []
    try:
        image = pipe.generate(prompt, seed=seed, output="tensor", callback=step).images[0]
    finally:
        for block in layers:
            block.attn2.probe = None
    return image, text.tokenizer.token_strings(prompt), maps


def attention_figure(out, run, prompt=None, n_steps=4, seed=0):
    """Each prompt token's cross-attention map at a few sampling steps, over the image they lead to."""
    import torch.nn.functional as F

    from .pipeline import load

    plt = _plt()
    image, tokens, maps = attention_maps(load(run), prompt, seed)
    pick = sorted({round(i * (len(maps) - 1) / max(1, n_steps - 1)) for i in range(n_steps)})
    fig, axes = plt.subplots(len(pick), len(tokens) + 1, figsize=(1.3 * (len(tokens) + 1), 1.4 * len(pick)),
                             squeeze=False)
    for r, k in enumerate(pick):
        t, m = maps[k]
        mass = m[:len(tokens)].sum(0).mean()  # the prompt's tokens' (CLIP's padding takes the rest)
        _show(axes[r, 0], image * 2 - 1, "image" if r == 0 else None)
        axes[r, 0].set_ylabel(f"t={t}", fontsize=8)
        for c, tok in enumerate(tokens):
            ax = axes[r, c + 1]
            _show(ax, image * 2 - 1, tok if r == 0 else None)
            heat = F.interpolate(m[c][None, None], size=image.shape[-2:], mode="bilinear")[0, 0]
            # each token on its own scale (as DAAM draws them), or [CLS] would swamp the words; its share of the
            # prompt's attention says how much it is looked at
            heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-8)
            ax.imshow(heat.float().numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            ax.text(0.03, 0.03, f"{(m[c].mean() / mass).item():.0%}", transform=ax.transAxes, fontsize=7,
                    color="white", bbox=dict(facecolor="black", alpha=0.6, pad=1, linewidth=0))
    fig.suptitle(f"cross-attention of '{prompt}': each token's map on its own scale, its share of the "
                 "prompt's attention in the corner", fontsize=9)
    return _save(plt, fig, out)


def concat_figure(out, run, n=8, seed=0):
    """A spatial-condition model on held-out images: the condition, the sample, the original."""
    from .data import load_dataset
    from .pipeline import load

    plt = _plt()
    pipe = load(run)
    if not pipe.conditioner or not pipe.conditioner.cfg.concat:
        raise ValueError(f"explain concat needs a model with a spatial condition, and {run} has none")
    pixels = load_dataset(pipe.cfg.data.name, pipe.cfg.data.size, split="test").spread(n)
    rows = condition_rows(pipe, pixels, pipe.grid_prompts(len(pixels)), seed)
    fig, axes = plt.subplots(3, len(pixels), figsize=(1.2 * len(pixels), 3.9), squeeze=False)
    kind = pipe.conditioner.cfg.concat
    for r, name in enumerate([{"inpaint": "masked", "edges": "edge map", "lowres": "low-res"}[kind], "sample",
                              "original"]):
        for c in range(len(pixels)):
            _show(axes[r, c], rows[r * len(pixels) + c] * 2 - 1)
        axes[r, 0].set_ylabel(name, fontsize=9)
    fig.suptitle(f"{kind}: condition, sample, original (held-out images)", fontsize=10)
    return _save(plt, fig, out)


def control_figure(out, run, n=10, seed=0):
    """A ControlNet run on held-out images: the control made from each, the frozen model's sample for the image's
    caption with the ControlNet and without it (the same seed), the original."""
    from .controlnet import Control, held_out, open_run

    plt = _plt()
    cfg, pipe, net = open_run(run)
    images, _, hints, prompts = held_out(cfg, n, pipe.prompted)
    kw = dict(batch_size=len(images), seed=seed, output="tensor")
    rows = [("control", hints), ("ControlNet", pipe.generate(prompts, control=[Control(net, hints)], **kw).images),
            ("without", pipe.generate(prompts, **kw).images), ("original", (images + 1) / 2)]
    fig, axes = plt.subplots(len(rows), len(images), figsize=(1.2 * len(images), 1.25 * len(rows) + 0.5),
                             squeeze=False)
    for r, (name, shown) in enumerate(rows):
        for col in range(len(images)):
            _show(axes[r, col], shown[col] * 2 - 1)
        axes[r, 0].set_ylabel(name, fontsize=9)
    for col in range(len(images)):
        if prompts:
            axes[0, col].set_title(prompts[col], fontsize=6)
    fig.suptitle(f"{cfg.controlnet.kind} ControlNet on a frozen model, held-out images (prompt above, the same seed "
                 "per column)", fontsize=10)
    return _save(plt, fig, out)


def size_figure(out, run, seed=5, sides=(None, 0.5)):
    """SDXL's size conditioning: the same prompts and seeds, told the original was the true size, or half (as a
    share of the training images were)."""
    from .pipeline import load

    plt = _plt()
    pipe = load(run)
    if not pipe.conditioner or pipe.conditioner.cfg.micro != "size":
        raise ValueError(f"explain size needs a model with size conditioning (condition.micro = \"size\"); {run} has none")
    prompts = pipe.grid_prompts(10) or None
    size = pipe.cfg.data.size
    fig, axes = plt.subplots(len(sides), 10, figsize=(12, 1.3 * len(sides)), squeeze=False)
    for r, side in enumerate(sides):
        original = None if side is None else (int(size * side),) * 2
        images = pipe.generate(prompts, batch_size=10, seed=seed, original_size=original, output="tensor").images
        for c in range(10):
            _show(axes[r, c], images[c] * 2 - 1)
        axes[r, 0].set_ylabel(f"original {original[1]}x{original[0]}" if original else "true size", fontsize=9)
    fig.suptitle("the same prompts and seeds, told the original was this size", fontsize=10)
    return _save(plt, fig, out)


def seeds_figure(out, run, prompt=None, seed=1, subseed=2, steps=8):
    """A1111's seeding on a trained model: the same prompt and seed under each schedule type (DPM++ 2M, few steps),
    and a variation seed's pull from 0 to 1 (the slerp of two seeds' noise)."""
    from .pipeline import load

    plt = _plt()
    pipe = load(run)
    prompt = prompt or (pipe.grid_prompts(1) or [None])[0]
    kinds = ("Uniform", "Karras", "Exponential", "SGM Uniform", "Align Your Steps")
    kw = dict(steps=steps, sampler="DPM++ 2M", noise="a1111", output="tensor", batch_size=6)
    rows = [(f"{k}", pipe.generate(prompt, scheduler=k, seed=seed, **kw).images) for k in kinds]
    pulls = torch.linspace(0, 1, 6).tolist()
    rows.append(("variation", torch.cat([pipe.generate(prompt, seed=seed, subseed=subseed, subseed_strength=w,
                                                       **{**kw, "batch_size": 1}).images for w in pulls])))
    fig, axes = plt.subplots(len(rows), 6, figsize=(7.5, 1.25 * len(rows) + 0.5), squeeze=False)
    for r, (name, shown) in enumerate(rows):
        for c in range(6):
            _show(axes[r, c], shown[c] * 2 - 1, f"{pulls[c]:.1f}" if name == "variation" else
                  (f"seed {seed + c}" if r == 0 else None))
        axes[r, 0].set_ylabel(name, fontsize=8)
    fig.suptitle(f"A1111 seeding: \"{prompt}\", DPM++ 2M, {steps} steps: each schedule type (image i: seed + i),\n"
                 f"and seed {seed} pulled toward variation seed {subseed}", fontsize=8)
    return _save(plt, fig, out)


def run(what, run_dir=None, out=None, prompt=None):
    if what == "forward":
        return forward_figure(out or "forward.png")
    figures = {"reverse": reverse_figure, "latent": latent_figure, "attention": attention_figure,
               "concat": concat_figure, "size": size_figure, "control": control_figure, "seeds": seeds_figure}
    if what not in figures:
        raise ValueError(f"unknown figure {what!r}: choose forward, {', '.join(figures)}")
    if run_dir is None:
        raise ValueError(f"explain {what} needs a run folder: nanosd explain {what} RUN")
    extra = {"prompt": prompt} if what in ("attention", "reverse", "seeds") else {}
    return figures[what](out or Path(run_dir) / f"{what}.png", run_dir, **extra)


def sample_from_derived(pipe, pixels: torch.Tensor, prompts=None, seed=0):
    """For a model with a spatial condition: samples conditioned on what images in [-1, 1] give, derived as in
    training (a random hole, the edges, the image made smaller). Returns (samples, condition image, mask), the
    samples and the condition image in [0, 1]."""
    c = pipe.conditioner
    image, mask = c.derive(pixels, torch.Generator().manual_seed(seed))
    shown = image if c.cfg.concat == "edges" else (image + 1) / 2
    samples = pipe.generate(prompts, batch_size=len(pixels), seed=seed, image=shown, mask=mask, output="tensor").images
    return samples, shown, mask


def condition_rows(pipe, pixels: torch.Tensor, prompts=None, seed=0) -> torch.Tensor:
    """Rows of (condition, sample, original) for images in [-1, 1] (see sample_from_derived)."""
    samples, show, mask = sample_from_derived(pipe, pixels, prompts, seed)
    if pipe.conditioner.cfg.concat == "inpaint":
        show = show * (1 - mask) + 0.5 * mask  # the hole in gray
    show = torch.nn.functional.interpolate(show, size=samples.shape[-2:], mode="nearest")
    return torch.cat([show.expand(-1, samples.shape[1], -1, -1), samples, (pixels + 1) / 2])
