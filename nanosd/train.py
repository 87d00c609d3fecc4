"""One trainer for every model: the loss is passed in. AdamW, EMA, clipping, a step or wall-clock budget,
atomic safetensors checkpoints, exact resume, metrics in JSONL, sample grids at intervals.

Every random draw of step k (batch order, t, noise, dropout) comes from generators seeded by (seed, k, micro-batch),
so a resumed run needs only the weights, the optimizer moments and k to continue exactly where it stopped.

Under torchrun the same trainer runs on torch.distributed: DistributedDataParallel over gloo (CPU) or nccl (GPU).
The global batch splits into micro-batches of train.micro_batch images; rank r takes its contiguous share of them
(accumulating gradients over its share), so the images seen, their order and every random draw are the same for
any number of processes: N processes and 1 process accumulating over the same micro-batches take the same step.
Rank 0 alone writes checkpoints, logs and grids, and decides when the wall-clock budget is spent.
"""
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import GUIDE, atomic_path, load_tensors, save_tensors
from .condition import ConditionedUNet, Conditioner, bind_conditioner
from .config import Config, TrainConfig, dump_config, load_config
from .data import ImageSet, cache_dir, load_dataset
from .schedule import Schedule
from .unet import UNet

STATE = "train_state.safetensors"
WEIGHTS = "model.safetensors"
CONFIG = "config.toml"
METRICS = "metrics.jsonl"


def step_seed(seed: int, step: int, micro: int = 0) -> int:
    return (seed * 1_000_003 + step + micro * 1_000_000_007) % (2**63)


def distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device): torchrun's environment starts a process group (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu")
    if world > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device


class _Step(torch.nn.Module):
    """The model and the loss's own modules under one root, so that DistributedDataParallel averages the gradients
    of both (the autoencoder's discriminator learns inside its loss)."""

    def __init__(self, model, loss_module, loss_fn):
        super().__init__()
        self.model, self.loss_module = model, loss_module
        object.__setattr__(self, "loss_fn", loss_fn)

    def forward(self, batch, g, step):
        terms = self.loss_fn(self.model, batch, g, step)
        return terms if isinstance(terms, dict) else {"loss": terms}


class Trainer:
    """Trains `model` on `loss_fn(model, batch, generator, step)`, which returns the loss or a dict of terms with
    "loss" among them. A loss that learns (an nn.Module: the autoencoder's discriminator) is optimised too.
    `evaluate(step, ema_model)` writes grids and may return metrics for the log; it runs every sample_every steps."""

    def __init__(self, run_dir, model, loss_fn, data, cfg: TrainConfig, *, evaluate=None, device=None):
        self.run_dir, self.cfg, self.data = Path(run_dir), cfg, data
        self.rank, self.world, auto = distributed()
        self.device = torch.device(device) if device else auto
        self.model = model.to(self.device)
        self.loss_fn = loss_fn.to(self.device) if isinstance(loss_fn, torch.nn.Module) else loss_fn
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.params = list(self.model.parameters()) + list(self.loss_modules().parameters())
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.evaluate = evaluate
        self.step, self.elapsed = 0, 0.0
        if not cfg.steps and not cfg.minutes:
            raise ValueError("no training budget: set train.steps or --minutes")
        if len(data) < cfg.batch_size:
            raise ValueError(f"data set has {len(data)} images, fewer than train.batch_size={cfg.batch_size}")
        self.micro = cfg.micro_batch or cfg.batch_size // self.world
        if cfg.batch_size % self.micro or (cfg.batch_size // self.micro) % self.world:
            raise ValueError(f"train.batch_size={cfg.batch_size} must split into micro-batches of {self.micro} "
                             f"(train.micro_batch), a whole number of them for each of {self.world} processes")
        step = _Step(self.model, self.loss_modules(), self.loss_fn)
        self.forward = step if self.world == 1 else torch.nn.parallel.DistributedDataParallel(
            step, find_unused_parameters=any(True for _ in self.loss_modules().parameters()))

    def loss_modules(self) -> torch.nn.Module:
        return self.loss_fn if isinstance(self.loss_fn, torch.nn.Module) else torch.nn.Module()

    # --- state ---
    def state_tensors(self):
        t = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        t.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        t.update({f"loss.{k}": v for k, v in self.loss_modules().state_dict().items()})
        for i, s in self.opt.state_dict()["state"].items():
            t.update({f"optim.{i}.{k}": v for k, v in s.items()})
        return t

    def save(self):
        if self.rank:  # one writer
            return
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
        self.loss_modules().load_state_dict({k[5:]: v for k, v in t.items() if k.startswith("loss.")})
        opt_state = self.opt.state_dict()
        for k, v in t.items():
            if k.startswith("optim."):
                _, i, name = k.split(".", 2)
                opt_state["state"].setdefault(int(i), {})[name] = v
        self.opt.load_state_dict(opt_state)
        self.step, self.elapsed = int(meta["step"]), float(meta["elapsed"])
        # the log continues as if the run had never stopped
        log = self.run_dir / METRICS
        if log.exists() and self.rank == 0:
            lines = [ln for ln in log.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step]
            log.write_text("".join(ln + "\n" for ln in lines))
        return True

    # --- the loop ---
    def batch(self, step, lo=0, hi=None):
        """Images lo:hi of the global batch of `step`: each epoch a fresh permutation, drawn from (seed, epoch)."""
        n, B = len(self.data), self.cfg.batch_size
        per_epoch = n // B
        epoch, i = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(self.cfg.seed, -1 - epoch)))
        idx = perm[i * B:(i + 1) * B][lo:hi]
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in self.data.take(idx).items()}

    def done(self):
        c = self.cfg
        return bool((c.steps and self.step >= c.steps) or (c.minutes and self.elapsed >= c.minutes * 60))

    def sync_clock(self):
        """Rank 0's elapsed time for every rank: the budget, and the learning rate that follows it, agree."""
        if self.world > 1:
            t = torch.tensor([self.elapsed], dtype=torch.float64)
            dist.broadcast(t, 0)
            self.elapsed = t.item()

    def progress(self):
        """Fraction of the budget spent: of the steps, or of the minutes (whichever is further along)."""
        c = self.cfg
        return max(self.step / c.steps if c.steps else 0.0, self.elapsed / (c.minutes * 60) if c.minutes else 0.0)

    def learning_rate(self):
        c = self.cfg
        lr = c.lr * min(1.0, (self.step + 1) / max(1, c.warmup_steps))
        if c.lr_decay == "cosine":  # a short run's samples gain most from the low-noise end of training
            lr *= c.lr_min_ratio + (1 - c.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, self.progress())))
        return lr

    def train_step(self):
        c = self.cfg
        lr = self.learning_rate()
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        per_rank = c.batch_size // self.micro // self.world  # micro-batches this rank accumulates
        sums = {}
        for j in range(per_rank):
            k = self.rank * per_rank + j  # the micro-batch's place in the global batch
            seed = step_seed(c.seed, self.step, k)
            torch.manual_seed(seed)  # dropout
            g = torch.Generator(self.device).manual_seed(seed)
            batch = self.batch(self.step, k * self.micro, (k + 1) * self.micro)
            sync = contextlib.nullcontext() if j == per_rank - 1 or self.world == 1 else self.forward.no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=c.bf16):
                    terms = self.forward(batch, g, self.step)
                (terms["loss"] / per_rank).backward()  # DDP then averages over the ranks
            for name, v in terms.items():
                sums[name] = sums.get(name, 0.0) + v.detach().float() / per_rank
        if self.world > 1:  # the logged terms: the mean over the whole batch
            names = sorted(sums)
            t = torch.stack([sums[n] for n in names]).to(self.device)
            dist.all_reduce(t)
            sums = dict(zip(names, t / self.world))
        terms = sums
        if c.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, c.grad_clip)
        self.opt.step()
        decay = min(c.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            torch._foreach_lerp_(list(self.ema.parameters()), list(self.model.parameters()), 1 - decay)
        self.step += 1
        return {k: float(v.detach()) for k, v in terms.items()}, lr

    def fit(self):
        c = self.cfg
        total = c.steps or None
        lead = self.rank == 0
        bar = tqdm(total=total, initial=self.step, unit="step", dynamic_ncols=True, disable=not lead)
        log = open(self.run_dir / METRICS, "a") if lead else open(os.devnull, "w")
        old_term = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM saves like Ctrl-C
        losses, t_log = [], time.perf_counter()
        guide_due = c.guide_at and lead and not (self.run_dir / GUIDE).exists()  # written once, kept on resume
        try:
            while not self.done():
                t0 = time.perf_counter()
                terms, lr = self.train_step()
                if not math.isfinite(terms["loss"]):
                    raise FloatingPointError(f"loss is {terms['loss']} at step {self.step}: lower train.lr")
                self.elapsed += time.perf_counter() - t0
                self.sync_clock()
                if guide_due and self.progress() >= c.guide_at:
                    save_tensors(self.ema.state_dict(), self.run_dir / GUIDE, metadata={"step": str(self.step)})
                    guide_due = False
                losses.append(terms)
                bar.update(1)
                if self.step % c.log_every == 0 or self.done():
                    ips = len(losses) * c.batch_size / (time.perf_counter() - t_log)
                    rec = {"step": self.step, **{k: sum(d[k] for d in losses) / len(losses) for k in losses[0]},
                           "lr": lr, "images_per_s": round(ips, 1), "elapsed_s": round(self.elapsed, 1),
                           "world_size": self.world}
                    log.write(json.dumps(rec) + "\n"), log.flush()
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{ips:.0f}")
                    losses, t_log = [], time.perf_counter()
                if self.step % c.checkpoint_every == 0 and not self.done():
                    self.save()
                if self.evaluate and c.sample_every and self.step % c.sample_every == 0 and not self.done():
                    t0 = time.perf_counter()
                    if lead:
                        self.run_evaluate(log)
                    self.elapsed += time.perf_counter() - t0  # the wall-clock budget includes the grids
                    self.sync_clock()
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
        if self.evaluate and lead:
            with open(self.run_dir / METRICS, "a") as log:
                self.run_evaluate(log)

    def run_evaluate(self, log):
        metrics = self.evaluate(self.step, self.ema)
        if metrics:
            log.write(json.dumps({"step": self.step, **metrics}) + "\n"), log.flush()


# --- the diffusion recipe ---

def diffusion_loss(model, batch, g, step=None, *, schedule: Schedule, prediction="eps", weighting="none"):
    """L_simple = E_{t, eps} || target - net(x_t, t, c) ||^2 with t uniform, target eps (or v, or x0).
    A conditioned model (ConditionedUNet) reads a caption per image, dropped to "" at condition.drop_prob."""
    x0 = batch["image"]
    t = torch.randint(0, schedule.timesteps, (x0.shape[0],), generator=g, device=g.device)
    noise = torch.randn(x0.shape, generator=g, device=g.device)
    unet, cond = model, {}
    if isinstance(model, ConditionedUNet):
        unet, c = model.unet, model.conditioner
        cond = {k: v.to(x0.device) if v is not None else v
                for k, v in c(c.training_prompts(batch.get("captions"), batch.get("label"), g)).items()}
        if c.cfg.concat:  # from the pixels (a latent model's data keeps them beside the latents)
            image, mask = c.derive(batch.get("pixels", x0), g)
            cond["concat"] = c.spatial(image, mask, x0.shape[-2:])
    out = unet(schedule.q_sample(x0, t, noise), t, **cond)
    target = schedule.target(prediction, x0, noise, t)
    per_image = F.mse_loss(out.float(), target, reduction="none").mean(dim=(1, 2, 3))
    if weighting == "min_snr":  # Min-SNR-gamma, expressed for each prediction target
        snr = schedule.alphas_cumprod.to(t.device)[t] / (1 - schedule.alphas_cumprod.to(t.device)[t])
        w = snr.clamp(max=5.0) / {"eps": snr, "v": snr + 1, "x0": torch.ones_like(snr)}[prediction]
        per_image = per_image * w
    return per_image.mean()


def _open_run(cfg: Config | None, run_dir: Path, minutes, steps) -> Config:
    """The run's config: a new one (refused if the folder holds another run) or the folder's own, to resume."""
    stored = run_dir / CONFIG
    if cfg is None:
        if not stored.exists():
            raise FileNotFoundError(f"{run_dir} is not a run folder (no {CONFIG}): pass a config file to start a run")
        cfg = load_config(stored)
    elif stored.exists() and (run_dir / STATE).exists():
        old = load_config(stored)
        old.train.steps, old.train.minutes = cfg.train.steps, cfg.train.minutes
        if old.autoencoder and cfg.autoencoder:
            old.autoencoder.in_channels = cfg.autoencoder.in_channels
        old.unet.in_channels, old.diffusion.scale_factor = cfg.unet.in_channels, cfg.diffusion.scale_factor
        if dump_config(old) != dump_config(cfg):
            raise ValueError(f"run folder {run_dir} holds a run of another config: choose a new --out, "
                             f"or resume it with 'nanosd train {run_dir}'")
    if minutes is not None:
        cfg.train.minutes = minutes
    if steps is not None:
        cfg.train.steps = steps
    return cfg


def _write_config(cfg: Config, run_dir: Path):
    run_dir.mkdir(parents=True, exist_ok=True)
    if distributed()[0]:  # rank 0 writes
        return
    with atomic_path(run_dir / CONFIG) as p:
        p.write_text(dump_config(cfg))


def train_autoencoder(cfg: Config, ae_dir: Path, data, tcfg: TrainConfig, device="cpu"):
    """Train (or finish) the autoencoder of a latent recipe in its own run folder; returns its EMA model."""
    from .autoencoder import Autoencoder, AutoencoderLoss, psnr, ssim
    from .pipeline import save_grid

    _write_config(cfg, ae_dir)
    held_out = load_dataset(cfg.data.name, cfg.data.size, split="test")
    held_out = (held_out if len(held_out) else data).spread(500)
    torch.manual_seed(tcfg.seed)
    ae = Autoencoder(cfg.autoencoder)

    @torch.no_grad()
    def evaluate(step, ema):
        x = held_out.to(device)
        rec = torch.cat([ema.decode(ema.encode(b).mode()) for b in x.split(100)])
        a, b = ((x + 1) / 2).clamp(0, 1), ((rec + 1) / 2).clamp(0, 1)
        n = min(8, len(a))
        save_grid(torch.cat([a[:n], b[:n]]).cpu(), ae_dir / "reconstructions.png", nrow=n)
        return {"psnr": round(psnr(a, b).mean().item(), 3), "ssim": round(ssim(a, b).mean().item(), 4)}

    trainer = Trainer(ae_dir, ae, AutoencoderLoss(cfg.autoencoder), data, tcfg, evaluate=evaluate, device=device)
    if trainer.resume():
        print(f"resuming autoencoder {ae_dir} from step {trainer.step}")
    if not trainer.done():
        print(f"{sum(p.numel() for p in ae.parameters()) / 1e6:.2f}M-parameter autoencoder (f={cfg.autoencoder.factor}), "
              f"run folder {ae_dir}")
        trainer.fit()
    return trainer.ema.eval(), trainer.elapsed


def train(cfg: Config | None, run_dir, *, minutes=None, steps=None, autoencoder=None):
    """Train (or resume) the recipe `cfg` in `run_dir`. With cfg None, resume the run folder's own config.
    A latent recipe first trains its autoencoder in run_dir/autoencoder (or copies the one given), within the
    same wall-clock budget, then the U-Net on the cached, scaled latents."""
    from .pipeline import Pipeline, condition_rows, load_autoencoder, load_guide, save_grid

    run_dir = Path(run_dir)
    cfg = _open_run(copy.deepcopy(cfg), run_dir, minutes, steps)  # the caller's config stays as it was
    data = load_dataset(cfg.data.name, cfg.data.size)
    rank, world, device = distributed()
    tcfg, ae = cfg.train, None
    if cfg.autoencoder:
        ae_dir = run_dir / "autoencoder"
        if autoencoder is not None:
            _copy_autoencoder(Path(autoencoder), ae_dir)
        if (ae_dir / WEIGHTS).exists() and not (ae_dir / STATE).exists():  # given, not trained here
            ae, ae_minutes = load_autoencoder(ae_dir, run_dir), 0.0
            cfg.autoencoder = load_config(ae_dir / CONFIG).autoencoder
        else:
            cfg.autoencoder.in_channels = data.shape[0]
            ae_cfg = cfg.autoencoder_train or TrainConfig()
            if not ae_cfg.steps and not ae_cfg.minutes:
                if not tcfg.minutes:
                    raise ValueError("set autoencoder_train.steps or .minutes, or give --minutes for the whole recipe")
                ae_cfg = dataclasses.replace(ae_cfg, minutes=tcfg.minutes * AUTOENCODER_SHARE)
            ae, ae_seconds = train_autoencoder(cfg, ae_dir, data, ae_cfg, device)
            ae_minutes = ae_seconds / 60
        if tcfg.minutes:  # the budget covers both models
            tcfg = dataclasses.replace(tcfg, minutes=max(tcfg.minutes - ae_minutes, 1e-3))
        stored = getattr(data, "latent_info", None)  # shards written with this very autoencoder's latents
        if stored and stored["autoencoder"] == weights_key(ae_dir):
            latents = None
            if not cfg.diffusion.scale_factor:
                cfg.diffusion.scale_factor = round(1 / data.latents().std().item(), 5)
            if cfg.condition and cfg.condition.concat:
                raise ValueError("spatial conditions need the pixels beside the latents: train on the images, "
                                 "not on pre-encoded shards")
            data = data.use_latents(cfg.diffusion.scale_factor)
        else:
            latents = encode_dataset(ae, data, ae_dir, cfg)
            if not cfg.diffusion.scale_factor:
                cfg.diffusion.scale_factor = round(1 / latents.std().item(), 5)
            if cfg.condition and cfg.condition.concat and not isinstance(data, ImageSet):
                raise ValueError("spatial-condition recipes keep the pixels in memory: train them on a data set or "
                                 "an image folder, not on shards")
            pixels = data.images if cfg.condition and cfg.condition.concat else None
            data = ImageSet(latents * cfg.diffusion.scale_factor, data.labels, data.classes, data.captions, pixels)
    cfg.unet.in_channels = data.shape[0]
    conditioner = None
    if cfg.condition:
        if cfg.condition.encoder == "labels":
            if data.labels is None:
                raise ValueError(f"condition.encoder = 'labels' needs labelled data, and {cfg.data.name} has none")
            cfg.condition.classes = data.classes
        if not cfg.sample.prompts:  # the grids show one prompt per class (or 8 captions from across the data)
            if cfg.condition.encoder == "labels":
                cfg.sample.prompts = list(data.classes)
            elif data.captions and cfg.condition.encoder != "none":
                idx = data.spread_index(len(data.classes) or 8).tolist()
                cfg.sample.prompts = list(dict.fromkeys(data.captions[i][0] for i in idx))
        conditioner = bind_conditioner(Conditioner(cfg.condition), ae, cfg)
        for k, v in conditioner.unet_options(data.shape[0], cfg.autoencoder.in_channels if ae else
                                             data.shape[0]).items():
            setattr(cfg.unet, k, v)
    _write_config(cfg, run_dir)

    schedule = Schedule.of(cfg.diffusion)
    torch.manual_seed(cfg.train.seed)  # the initial weights
    unet = UNet(cfg.unet)
    model = ConditionedUNet(unet, conditioner) if conditioner else unet

    def loss_fn(model, batch, g, step):
        return diffusion_loss(model, batch, g, schedule=schedule, prediction=cfg.diffusion.prediction,
                              weighting=cfg.diffusion.loss_weighting)

    guides = []  # read once it is written: from then on the grids show autoguidance as generate does

    def evaluate(step, ema):
        if not guides and (guide := load_guide(run_dir, cfg)):
            guides.append(guide.to(next(ema.parameters()).device))
        guide = guides[0] if guides else None
        pipe, nrow = Pipeline.of(ema, schedule, cfg, ae, guide=guide), None
        if conditioner and cfg.condition.concat:  # rows: condition, sample, original
            pixels = (data.images if data.pixels is None else data.pixels)[data.spread_index(8)]
            images, nrow = condition_rows(pipe, pixels, pipe.grid_prompts(len(pixels))), len(pixels)
        else:
            images = pipe.generate(pipe.grid_prompts(cfg.sample.n), batch_size=cfg.sample.n, seed=0, output="tensor",
                                   autoguidance=None if guide else 1.0)
        save_grid(images, run_dir / "samples" / f"step_{step:07d}.png", nrow=nrow)
        save_grid(images, run_dir / "samples.png", nrow=nrow)

    trainer = Trainer(run_dir, model, loss_fn, data, tcfg, evaluate=evaluate, device=device)
    say = print if rank == 0 else (lambda *a: None)
    if trainer.resume():
        say(f"resuming {run_dir} from step {trainer.step} ({trainer.elapsed / 60:.1f} min trained)")
    say(f"{sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M-parameter U-Net, {len(data)} "
        f"{'latents' if ae else 'images'} of {data.shape}, run folder {run_dir}"
        + (f", {world} processes" if world > 1 else ""))
    trainer.fit()
    if world > 1:
        dist.barrier()  # rank 0's last checkpoint and grid are written before anyone leaves
    return run_dir


AUTOENCODER_SHARE = 0.3  # of a latent recipe's wall-clock budget, when its autoencoder has none of its own


def _copy_autoencoder(src: Path, dst: Path):
    """Reuse a trained autoencoder: a latent run folder (its autoencoder/) or an autoencoder run folder."""
    if (src / "autoencoder" / WEIGHTS).exists():
        src = src / "autoencoder"
    if not (src / WEIGHTS).exists() or not (src / CONFIG).exists():
        raise FileNotFoundError(f"--autoencoder {src}: no {WEIGHTS} and {CONFIG} there (give a latent run folder "
                                f"or its autoencoder/ folder)")
    if load_config(src / CONFIG).autoencoder is None:
        raise ValueError(f"--autoencoder {src}: its {CONFIG} has no [autoencoder] section")
    dst.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG, WEIGHTS):
        with atomic_path(dst / name) as p:
            shutil.copyfile(src / name, p)


def weights_key(folder: Path) -> str:
    """A short hash of a run folder's weights: which autoencoder made a set of latents."""
    return hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()[:16]


@torch.no_grad()
def encode_dataset(ae, data, ae_dir: Path, cfg: Config, batch=250):
    """E(x) (the posterior mean) for every image, encoded once and cached by the autoencoder's weights."""
    key = weights_key(ae_dir)
    name = hashlib.sha256(cfg.data.name.encode()).hexdigest()[:8]
    path = cache_dir() / "latents" / f"{name}-{cfg.data.size}-{key}.safetensors"
    if path.exists():
        return load_tensors(path)["latents"]
    device = next(ae.parameters()).device
    latents = torch.cat([ae.encode(data.take(torch.arange(i, min(i + batch, len(data))))["image"].to(device)).mode().cpu()
                         for i in tqdm(range(0, len(data), batch), desc="encoding latents", leave=False)])
    save_tensors({"latents": latents}, path)
    return latents
