"""How well a spatial-condition model keeps to its condition, on held-out images.

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
    pipe = load(run)
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
