"""Figures that show what the model does: the forward process and the reverse trajectory."""
from pathlib import Path

import torch

from .schedule import SCHEDULES, Schedule


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _show(ax, image, title=None):
    """image (C, H, W) in [-1, 1]."""
    im = ((image.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy()
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
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def reverse_figure(out, run, n_show=8, seed=0):
    """One sampling run: x_t (top) and the predicted x_0 (bottom) at evenly spaced steps."""
    from .pipeline import load

    plt = _plt()
    pipe = load(run)
    frames = []
    pipe.generate(1, seed=seed, output="tensor", callback=lambda i, t, x, x0: frames.append((int(t), x[0], x0[0])))
    pick = sorted(set(round(i * (len(frames) - 1) / (n_show - 1)) for i in range(n_show)))
    fig, axes = plt.subplots(2, len(pick), figsize=(1.4 * len(pick), 3.2), squeeze=False)
    for c, i in enumerate(pick):
        t, x, x0 = frames[i]
        _show(axes[0, c], x, f"t={t}")
        _show(axes[1, c], x0)
    axes[0, 0].set_ylabel("x_t", fontsize=9), axes[1, 0].set_ylabel("predicted x_0", fontsize=9)
    fig.suptitle(f"Reverse process: {pipe.cfg.sample.sampler}, {len(frames)} steps, seed {seed}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


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
            ax.imshow(z[r, k].numpy(), cmap="RdBu_r")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(f"z[{k}]", fontsize=8)
        _show(axes[r, -1], rec[r], "D(E(x))" if r == 0 else None)
    f = pipe.autoencoder.cfg.factor
    fig.suptitle(f"{x.shape[-1]} px images, {c}x{z.shape[-1]}x{z.shape[-1]} latents (f={f}), reconstructions",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def run(what, run_dir=None, out=None):
    if what == "forward":
        return forward_figure(out or "forward.png")
    figures = {"reverse": reverse_figure, "latent": latent_figure}
    if what not in figures:
        raise ValueError(f"unknown figure {what!r}: choose forward, reverse or latent")
    if run_dir is None:
        raise ValueError(f"explain {what} needs a run folder: nanosd explain {what} RUN")
    return figures[what](out or Path(run_dir) / f"{what}.png", run_dir)
