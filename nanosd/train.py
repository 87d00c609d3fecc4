"""One trainer for every model (the recipes are in recipes.py): the loss is passed in. AdamW, EMA, clipping, a step or wall-clock budget,
atomic safetensors checkpoints, exact resume, metrics in JSONL, sample grids at intervals.

Every random draw of step k (batch order, t, noise, dropout) comes from generators seeded by (seed, k, micro-batch),
so a resumed run needs only the weights, the optimizer moments and k to continue exactly where it stopped.

Under torchrun the same trainer runs on torch.distributed: DistributedDataParallel over gloo (CPU) or nccl (GPU).
The global batch splits into micro-batches of train.micro_batch images; rank r takes its contiguous share of them
(accumulating gradients over its share), so the images seen, their order and every random draw are the same for
any number of processes: N processes and 1 process accumulating over the same micro-batches take the same step.
Rank 0 alone writes checkpoints, logs and grids, and decides when the wall-clock budget is spent.

Streamed shards (StreamSet) have no index: each rank takes its next micro-batches from its own stream, and a
resumed run restarts the streams after the shards already read (approximately; see shards.py).
Frozen parameters (a pretrained text encoder, a fine-tuned model's conditioner) are not checkpointed: the recipe
rebuilds them; the EMA copy shares them.
"""
import contextlib
import copy
import json
import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from .config import TrainConfig
from .fast import choose_precision, keep_freed_buffers
from .io import load_tensors, read_metadata, save_tensors
from .run import GUIDE, METRICS, STATE, WEIGHTS


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
    `evaluate(step, ema_model)` writes grids and may return metrics for the log; it runs every sample_every steps.
    keep_frozen=False: model.safetensors holds only what learned (a run on a base model, which supplies the rest)."""

    def __init__(self, run_dir, model, loss_fn, data, cfg: TrainConfig, *, evaluate=None, device=None,
                 keep_frozen=True):
        self.run_dir, self.cfg, self.data, self.keep_frozen = Path(run_dir), cfg, data, keep_frozen
        self.rank, self.world, auto = distributed()
        keep_freed_buffers()
        self.device = torch.device(device) if device else auto
        self.bf16 = cfg.bf16 if cfg.bf16 != "auto" else choose_precision(device=self.device)[0] == "bf16"
        if cfg.bf16 == "auto" and self.world > 1:  # one arithmetic for all ranks, each of which chose on its own
            agreed = torch.tensor([int(self.bf16)], device=self.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
            self.bf16 = bool(agreed.item())
        # NCHW, whatever the weights were loaded as (inference loads them channels-last): bf16 autocast ran its
        # GroupNorms up to 10x slower channels-last; fp32 gained 1.03-1.2x from it (benchmarks/train_speed.py) but
        # the optimizer's state and the checkpoints that resume it are NCHW
        self.model = model.to(self.device, memory_format=torch.contiguous_format)
        self.loss_fn = loss_fn.to(self.device) if isinstance(loss_fn, torch.nn.Module) else loss_fn
        frozen = {id(p): p for p in self.model.parameters() if not p.requires_grad}
        self.ema = copy.deepcopy(self.model, memo=frozen).requires_grad_(False)  # what is frozen stays shared
        self.frozen = {n for n, p in self.model.named_parameters() if not p.requires_grad}
        self.params = list(self.model.parameters()) + list(self.loss_modules().parameters())
        self.stream_state = {}
        # fused: one pass over each tensor (SD 1.5's 860M parameters: 0.5 s a step against 3.7 s for the loop)
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        self.evaluate = evaluate
        self.step, self.elapsed = 0, 0.0
        if not cfg.steps and not cfg.minutes:
            raise ValueError("no training budget: set train.steps or --minutes")
        if not self.stream and len(data) < cfg.batch_size:
            raise ValueError(f"data set has {len(data)} images, fewer than train.batch_size={cfg.batch_size}")
        self.micro = cfg.micro_batch or cfg.batch_size // self.world
        if cfg.batch_size % self.micro or (cfg.batch_size // self.micro) % self.world:
            raise ValueError(f"train.batch_size={cfg.batch_size} must split into micro-batches of {self.micro} "
                             f"(train.micro_batch), a whole number of them for each of {self.world} processes")
        step = _Step(self.model, self.loss_modules(), self.loss_fn)
        self.forward = step if self.world == 1 else torch.nn.parallel.DistributedDataParallel(
            step, find_unused_parameters=any(True for _ in self.loss_modules().parameters()))

    @property
    def stream(self) -> bool:
        """Streamed shards: no index, each rank reads its own."""
        return hasattr(self.data, "next")

    def loss_modules(self) -> torch.nn.Module:
        return self.loss_fn if isinstance(self.loss_fn, torch.nn.Module) else torch.nn.Module()

    # --- state ---
    def learned(self, module) -> dict:
        """The state a checkpoint keeps: everything but frozen parameters, which the recipe rebuilds."""
        return {k: v for k, v in module.state_dict().items() if k not in self.frozen}

    def state_tensors(self):
        t = {f"model.{k}": v for k, v in self.learned(self.model).items()}
        t.update({f"ema.{k}": v for k, v in self.learned(self.ema).items()})
        t.update({f"loss.{k}": v for k, v in self.loss_modules().state_dict().items()})
        for i, s in self.opt.state_dict()["state"].items():
            t.update({f"optim.{i}.{k}": v for k, v in s.items()})
        return t

    def save(self):
        if self.rank:  # one writer
            return
        meta = {"step": str(self.step), "elapsed": repr(self.elapsed)}
        if self.stream:
            meta["stream"] = json.dumps(self.data.state())
        save_tensors(self.state_tensors(), self.run_dir / STATE, metadata=meta)
        save_tensors(self.ema.state_dict() if self.keep_frozen else self.learned(self.ema), self.run_dir / WEIGHTS,
                     metadata=meta)

    def resume(self) -> bool:
        path = self.run_dir / STATE
        if not path.exists():
            return False
        t, meta = load_tensors(path), read_metadata(path)
        for prefix, module in (("model.", self.model), ("ema.", self.ema)):
            missing, unexpected = module.load_state_dict({k[len(prefix):]: v for k, v in t.items()
                                                          if k.startswith(prefix)}, strict=False)
            if unexpected or set(missing) - self.frozen:
                raise ValueError(f"{path} does not hold this run's model (missing {missing[:3]}, unexpected "
                                 f"{unexpected[:3]}): start a new run folder")
        self.loss_modules().load_state_dict({k[5:]: v for k, v in t.items() if k.startswith("loss.")})
        opt_state = self.opt.state_dict()
        for k, v in t.items():
            if k.startswith("optim."):
                _, i, name = k.split(".", 2)
                opt_state["state"].setdefault(int(i), {})[name] = v
        self.opt.load_state_dict(opt_state)
        self.step, self.elapsed = int(meta["step"]), float(meta["elapsed"])
        self.stream_state = json.loads(meta.get("stream", "{}"))
        # the log continues as if the run had never stopped
        log = self.run_dir / METRICS
        if log.exists() and self.rank == 0:
            lines = [ln for ln in log.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step]
            log.write_text("".join(ln + "\n" for ln in lines))
        return True

    # --- the loop ---
    def batch(self, step, lo=0, hi=None):
        """Images lo:hi of the global batch of `step`: each epoch a fresh permutation, drawn from (seed, epoch).
        From a stream: this rank's next hi - lo samples."""
        if self.stream:
            return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v
                    for k, v in self.data.next(hi - lo).items()}
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
            batch = {name: t.clone(memory_format=torch.contiguous_format) if torch.is_tensor(t) and t.ndim == 4
                     else t for name, t in batch.items()}  # or the data's strides decide (MNIST's: channels-last)
            sync = contextlib.nullcontext() if j == per_rank - 1 or self.world == 1 else self.forward.no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
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
            pairs = [(e, p) for e, p in zip(self.ema.parameters(), self.model.parameters()) if p.requires_grad]
            torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1 - decay)
        self.step += 1
        return {k: float(v.detach()) for k, v in terms.items()}, lr

    def fit(self):
        c = self.cfg
        total = c.steps or None
        lead = self.rank == 0
        if self.stream:
            done = self.data.open(self.rank, self.world, c.seed, self.step * c.batch_size, self.stream_state)
            if done and lead:
                print(f"the shard streams restart after the {done} shards read in {self.step} steps")
        bar = tqdm(total=total, initial=self.step, unit="step", dynamic_ncols=True, disable=not lead)
        log = open(self.run_dir / METRICS, "a") if lead else open(os.devnull, "w")
        old_term = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM saves like Ctrl-C
        losses, t_log = [], time.perf_counter()
        first_step, first_elapsed = self.step, self.elapsed
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
                    if self.stream and (self.data.skipped or self.data.bad_shards):
                        rec.update(skipped_samples=self.data.skipped, unreadable_shards=len(self.data.bad_shards))
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
        if lead:
            self.summary(first_step, first_elapsed)

    def summary(self, first_step, first_elapsed):
        """What the budget bought: steps and images/s, and a warning when the minutes cut a step budget far short
        (a slower CPU than the recipe was made on): its samples will be worse than the recipe's."""
        c, steps, seconds = self.cfg, self.step - first_step, self.elapsed - first_elapsed
        print(f"trained {self.step} steps ({steps} now) in {self.elapsed / 60:.1f} min, "
              f"{steps * c.batch_size / max(seconds, 1e-9):.0f} images/s ({'bf16 autocast' if self.bf16 else 'fp32'})")
        if c.minutes and c.steps and self.step < 0.75 * c.steps:
            print(f"warning: the {c.minutes:g}-minute cap stopped this run at step {self.step} of the {c.steps} its "
                  f"recipe was tuned for (a slower CPU): expect weaker samples, or resume it with "
                  f"'nanosd train {self.run_dir} --minutes {c.minutes * c.steps / max(self.step, 1):.0f}' to finish")

    def run_evaluate(self, log):
        metrics = self.evaluate(self.step, self.ema)
        if metrics:
            log.write(json.dumps({"step": self.step, **metrics}) + "\n"), log.flush()
