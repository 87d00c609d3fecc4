"""How well a spatial-condition model (or a ControlNet) keeps to its condition, on held-out images.

inpaint: the error outside the hole against the autoencoder's own error there (D(E(x)) vs x), and inside it.
lowres:  PSNR of the upscaled image against plain bicubic upscaling of the same low-resolution input.
edges:   how well the sample's own edges agree with the edge map it was given (F1).
"""
import torch
import torch.nn.functional as F

from .autoencoder import psnr
from .condition import edge_map
from .data import load_dataset
from .explain import sample_from_derived
from .pipeline import load


@torch.no_grad()
def evaluate_concat(run, n=200, seed=0, batch=50) -> dict:
    pipe = load(run, "fp32")  # a measurement: the same arithmetic on every CPU
    c = pipe.conditioner
    if c is None or not c.cfg.concat:
        raise ValueError(f"{run} has no spatial condition: this measures inpainting, edge-map and upscaling models")
    x = load_dataset(pipe.cfg.data.name, pipe.cfg.data.size, split="test").spread(n)
    prompts = pipe.grid_prompts(len(x))
    out = {}
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        y, shown, mask = sample_from_derived(pipe, xb, prompts[i:i + batch] if prompts else None, seed + i)
        y = y * 2 - 1
        if c.cfg.concat == "inpaint":
            rec = pipe.decode(c.to_model_space(xb)) if pipe.autoencoder else xb
            keep = (1 - mask).expand_as(xb)
            terms = {"kept_mae": ((y - xb).abs() * keep).sum() / keep.sum(),
                     "autoencoder_kept_mae": ((rec - xb).abs() * keep).sum() / keep.sum(),
                     "hole_mae": ((y - xb).abs() * (1 - keep)).sum() / (1 - keep).sum().clamp(min=1)}
        elif c.cfg.concat == "lowres":
            bicubic = F.interpolate(shown * 2 - 1, size=xb.shape[-2:], mode="bicubic").clamp(-1, 1)
            terms = {"psnr": psnr((y + 1) / 2, (xb + 1) / 2).mean(),
                     "bicubic_psnr": psnr((bicubic + 1) / 2, (xb + 1) / 2).mean()}
        else:
            e = edge_map(y)
            tp = (e * shown).sum()  # the edge map itself, 0 and 1
            terms = {"edge_f1": 2 * tp / (e.sum() + shown.sum()).clamp(min=1)}
        for k, v in terms.items():
            out[k] = out.get(k, 0.0) + float(v) * len(xb) / len(x)
    return out


@torch.no_grad()
def evaluate_control(run, n=200, seed=0, batch=50, out=None) -> dict:
    """A ControlNet run on held-out images, each with its own caption: the edge F1 of the samples' own controls
    (the run's preprocessor applied to them) against the control given, with the ControlNet and without it (the
    same seeds and prompts). With `out`, the samples are written as OUT/{control,plain}/LABEL/NNNNN.png for an
    independent judge of the prompt."""
    from pathlib import Path

    from .controlnet import Control, held_out, open_run
    from .images import save_png, to_pil
    from .preprocess import control_images

    cfg, pipe, net = open_run(run)
    x, labels, hints, prompts = held_out(cfg, n, pipe.prompted)
    c = cfg.controlnet
    sums = {"control": 0.0, "plain": 0.0}
    for i in range(0, len(x), batch):
        hb = hints[i:i + batch, :1]
        kw = dict(batch_size=len(hb), seed=seed + i, output="tensor")
        if prompts:
            kw["prompt"] = prompts[i:i + batch]
        for name, control in (("control", [Control(net, hints[i:i + batch])]), ("plain", [])):
            y = pipe.generate(control=control, **kw).images
            e = control_images(y * 2 - 1, c.kind, c.a, c.b)[:, :1].float() / 255
            tp = (e * hb).sum((1, 2, 3))
            sums[name] += float((2 * tp / (e.sum((1, 2, 3)) + hb.sum((1, 2, 3))).clamp(min=1)).sum())
            if out is not None:
                for j, im in enumerate(y):
                    label = int(labels[i + j]) if labels is not None else 0
                    save_png(to_pil(im), Path(out) / name / str(label) / f"{i + j:05d}.png")
    return {f"edge_f1_{k}": v / len(x) for k, v in sums.items()}
