"""One trainer for every model: the loss is passed in. AdamW, EMA, clipping, a step or wall-clock budget,
atomic safetensors checkpoints, exact resume, metrics in JSONL, sample grids at intervals.

Every random draw of step k (batch order, t, noise, dropout) comes from generators seeded by (seed, k),
so a resumed run needs only the weights, the optimizer moments and k to continue exactly where it stopped.
"""
import copy
import json
import math
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import atomic_path, load_tensors, save_tensors
from .config import Config, TrainConfig, dump_config, load_config
from .data import load_dataset
from .schedule import Schedule
from .unet import UNet

STATE = "train_state.safetensors"
WEIGHTS = "model.safetensors"
CONFIG = "config.toml"
METRICS = "metrics.jsonl"


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63)


class Trainer:
    def __init__(self, run_dir, model, loss_fn, data, cfg: TrainConfig, *, on_sample=None, device="cpu"):
        self.run_dir, self.cfg, self.data, self.loss_fn = Path(run_dir), cfg, data, loss_fn
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.on_sample = on_sample
        self.step, self.elapsed = 0, 0.0
        if not cfg.steps and not cfg.minutes:
            raise ValueError("no training budget: set train.steps or --minutes")
        if len(data) < cfg.batch_size:
            raise ValueError(f"data set has {len(data)} images, fewer than train.batch_size={cfg.batch_size}")

    # --- state ---
    def state_tensors(self):
        t = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        t.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        for i, s in self.opt.state_dict()["state"].items():
            t.update({f"optim.{i}.{k}": v for k, v in s.items()})
        return t

    def save(self):
        meta = {"step": str(self.step), "elapsed": repr(self.elapsed)}
        save_tensors(self.state_tensors(), self.run_dir / STATE, metadata=meta)
        save_tensors(self.ema.state_dict(), self.run_dir / WEIGHTS, metadata=meta)

    def resume(self) -> bool:
        path = self.run_dir / STATE
        if not path.exists():
            return False
        from safetensors import safe_open

        t = load_tensors(path)
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        self.model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
        self.ema.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("ema.")})
        opt_state = self.opt.state_dict()
        for k, v in t.items():
            if k.startswith("optim."):
                _, i, name = k.split(".", 2)
                opt_state["state"].setdefault(int(i), {})[name] = v
        self.opt.load_state_dict(opt_state)
        self.step, self.elapsed = int(meta["step"]), float(meta["elapsed"])
        # the log continues as if the run had never stopped
        log = self.run_dir / METRICS
        if log.exists():
            lines = [ln for ln in log.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step]
            log.write_text("".join(ln + "\n" for ln in lines))
        return True

    # --- the loop ---
    def batch(self, step):
        n, B = len(self.data), self.cfg.batch_size
        per_epoch = n // B
        epoch, i = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(self.cfg.seed, -1 - epoch)))
        idx = perm[i * B:(i + 1) * B]
        batch = {"image": self.data.images[idx].to(self.device)}
        if self.data.labels is not None:
            batch["label"] = self.data.labels[idx].to(self.device)
        return batch

    def done(self):
        c = self.cfg
        return (c.steps and self.step >= c.steps) or (c.minutes and self.elapsed >= c.minutes * 60)

    def train_step(self):
        c = self.cfg
        seed = step_seed(c.seed, self.step)
        torch.manual_seed(seed)  # dropout
        g = torch.Generator(self.device).manual_seed(seed)
        batch = self.batch(self.step)
        lr = c.lr * min(1.0, (self.step + 1) / max(1, c.warmup_steps))
        for group in self.opt.param_groups:
            group["lr"] = lr
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=c.bf16):
            loss = self.loss_fn(self.model, batch, g)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if c.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        self.opt.step()
        decay = min(c.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()), 1 - decay)
        self.step += 1
        return loss.item(), lr

    def fit(self):
        c = self.cfg
        total = c.steps or None
        bar = tqdm(total=total, initial=self.step, unit="step", dynamic_ncols=True)
        log = open(self.run_dir / METRICS, "a")
        old_term = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM saves like Ctrl-C
        losses, t_log = [], time.perf_counter()
        try:
            while not self.done():
                t0 = time.perf_counter()
                loss, lr = self.train_step()
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss} at step {self.step}: lower train.lr or enable grad_clip")
                self.elapsed += time.perf_counter() - t0
                losses.append(loss)
                bar.update(1)
                if self.step % c.log_every == 0 or self.done():
                    ips = len(losses) * c.batch_size / (time.perf_counter() - t_log)
                    rec = {"step": self.step, "loss": sum(losses) / len(losses), "lr": lr,
                           "images_per_s": round(ips, 1), "elapsed_s": round(self.elapsed, 1)}
                    log.write(json.dumps(rec) + "\n"), log.flush()
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{ips:.0f}")
                    losses, t_log = [], time.perf_counter()
                if self.step % c.checkpoint_every == 0 and not self.done():
                    self.save()
                if self.on_sample and c.sample_every and self.step % c.sample_every == 0 and not self.done():
                    t0 = time.perf_counter()
                    self.on_sample(self.step, self.ema)
                    self.elapsed += time.perf_counter() - t0  # the wall-clock budget includes the grids
        except KeyboardInterrupt:
            self.save()
            bar.close()
            raise KeyboardInterrupt(f"interrupted at step {self.step}; checkpoint saved in {self.run_dir}: "
                                    f"resume with 'nanosd train {self.run_dir}'") from None
        finally:
            signal.signal(signal.SIGTERM, old_term)
            log.close()
        bar.close()
        self.save()
        if self.on_sample:
            self.on_sample(self.step, self.ema)


# --- the diffusion recipe ---

def diffusion_loss(unet, batch, g, *, schedule: Schedule, prediction="eps", weighting="none"):
    """L_simple = E_{t, eps} || target - net(x_t, t) ||^2 with t uniform, target eps (or v, or x0)."""
    x0 = batch["image"]
    t = torch.randint(0, schedule.timesteps, (x0.shape[0],), generator=g, device=g.device)
    noise = torch.randn(x0.shape, generator=g, device=g.device)
    out = unet(schedule.q_sample(x0, t, noise), t)
    target = schedule.target(prediction, x0, noise, t)
    per_image = F.mse_loss(out.float(), target, reduction="none").mean(dim=(1, 2, 3))
    if weighting == "min_snr":  # Min-SNR-gamma, expressed for each prediction target
        snr = schedule.alphas_cumprod.to(t.device)[t] / (1 - schedule.alphas_cumprod.to(t.device)[t])
        w = snr.clamp(max=5.0) / {"eps": snr, "v": snr + 1, "x0": torch.ones_like(snr)}[prediction]
        per_image = per_image * w
    return per_image.mean()


def train(cfg: Config | None, run_dir, *, minutes=None, steps=None, progress=True):
    """Train (or resume) the recipe `cfg` in `run_dir`. With cfg None, resume the run folder's own config."""
    from .pipeline import Pipeline, save_grid

    run_dir = Path(run_dir)
    stored = run_dir / CONFIG
    if cfg is None:
        if not stored.exists():
            raise FileNotFoundError(f"{run_dir} is not a run folder (no {CONFIG}): pass a config file to start a run")
        cfg = load_config(stored)
    elif stored.exists() and (run_dir / STATE).exists():
        old = load_config(stored)
        old.train.steps, old.train.minutes = cfg.train.steps, cfg.train.minutes
        if dump_config(old) != dump_config(cfg):
            raise ValueError(f"run folder {run_dir} holds a run of another config: choose a new --out, "
                             f"or resume it with 'nanosd train {run_dir}'")
    if minutes is not None:
        cfg.train.minutes = minutes
    if steps is not None:
        cfg.train.steps = steps

    data = load_dataset(cfg.data.name, cfg.data.size)
    cfg.unet.in_channels = data.images.shape[1]
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(stored) as p:
        p.write_text(dump_config(cfg))

    schedule = Schedule(cfg.diffusion.schedule, cfg.diffusion.timesteps)
    torch.manual_seed(cfg.train.seed)  # the initial weights
    unet = UNet(cfg.unet)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def loss_fn(model, batch, g):
        return diffusion_loss(model, batch, g, schedule=schedule, prediction=cfg.diffusion.prediction,
                              weighting=cfg.diffusion.loss_weighting)

    def on_sample(step, ema):
        pipe = Pipeline(ema, schedule, cfg)
        images = pipe.generate(cfg.sample.n, seed=0, output="tensor")
        save_grid(images, run_dir / "samples" / f"step_{step:07d}.png")
        save_grid(images, run_dir / "samples.png")

    trainer = Trainer(run_dir, unet, loss_fn, data, cfg.train, on_sample=on_sample, device=device)
    if trainer.resume():
        print(f"resuming {run_dir} from step {trainer.step} ({trainer.elapsed / 60:.1f} min trained)")
    print(f"{sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M-parameter U-Net, {len(data)} images "
          f"of {tuple(data.images.shape[1:])}, run folder {run_dir}")
    trainer.fit()
    return run_dir
