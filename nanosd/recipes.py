"""The recipes the trainer runs: the diffusion loss, and `train()`, which reads as a latent diffusion recipe does:
the autoencoder phase, the latents, the conditioner, the U-Net. Each phase derives its part of the config from
the data (channels, classes, the latents' scale) instead of rewriting the caller's."""
import hashlib
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from . import run
from .condition import ConditionedUNet, Conditioner, bind_conditioner
from .config import Config, TrainConfig, dump_config, load_config
from .data import ImageSet, load_dataset
from .images import save_grid
from .io import cache_dir, load_tensors, save_tensors
from .preprocess import control_images
from .schedule import Schedule
from .shards import streamed
from .train import Trainer, distributed
from .unet import UNet

AUTOENCODER_SHARE = 0.3  # of a latent recipe's wall-clock budget, when its autoencoder has none of its own


def diffusion_loss(model, batch, g, step=None, *, schedule: Schedule, prediction="eps", weighting="none"):
    """L_simple = E_{t, eps} || target - net(x_t, t, c) ||^2 with t uniform, target eps (or v, or x0).
    A conditioned model (ConditionedUNet) reads a caption per image, dropped to "" at condition.drop_prob."""
    x0 = batch["image"]
    t = torch.randint(0, schedule.timesteps, (x0.shape[0],), generator=g, device=g.device)
    noise = torch.randn(x0.shape, generator=g, device=g.device)
    unet, cond = model, {}
    if isinstance(model, ConditionedUNet):
        unet, c = model.unet, model.conditioner
        micro = None
        if c.cfg.micro:  # SDXL-style size conditioning: some samples as enlarged half-size originals
            x0, micro = c.low_resolution(x0, g)
        cond = {k: v.to(x0.device) if v is not None else v
                for k, v in c(c.training_prompts(batch.get("captions"), batch.get("label"), g), micro=micro).items()}
        if c.cfg.concat:  # from the pixels (a latent model's data keeps them beside the latents)
            image, mask = c.derive(batch.get("pixels", x0), g)
            cond["concat"] = c.spatial(image, mask, x0.shape[-2:])
    if "hint" in batch:  # a ControlNet's control image
        cond["hint"] = batch["hint"]
    out = unet(schedule.q_sample(x0, t, noise), t, **cond)
    target = schedule.target(prediction, x0, noise, t)
    per_image = F.mse_loss(out.float(), target, reduction="none").mean(dim=(1, 2, 3))
    if weighting == "min_snr":  # Min-SNR-gamma, expressed for each prediction target
        snr = schedule.alphas_cumprod.to(t.device)[t] / (1 - schedule.alphas_cumprod.to(t.device)[t])
        w = snr.clamp(max=5.0) / {"eps": snr, "v": snr + 1, "x0": torch.ones_like(snr)}[prediction]
        per_image = per_image * w
    return per_image.mean()


def train(cfg: Config | None, run_dir, *, minutes=None, steps=None, autoencoder=None):
    """Train (or resume) the recipe `cfg` in `run_dir`. With cfg None, resume the run folder's own config.
    A latent recipe first trains its autoencoder in run_dir/autoencoder (or copies the one given), within the
    same wall-clock budget, then the U-Net on the cached, scaled latents."""
    run_dir = Path(run_dir)
    base = None  # a fine-tune's, LoRA's or ControlNet's starting model, loaded once
    if cfg is not None and base_path(cfg):
        base = frozen_base(base_path(cfg))
        cfg = on_base(cfg, base)
    cfg = _open_run(cfg, run_dir, minutes, steps)
    if autoencoder is not None and (base_path(cfg) or not cfg.autoencoder):
        raise ValueError("--autoencoder gives a latent recipe its autoencoder; this recipe "
                         + ("takes its base's" if base_path(cfg) else "has no [autoencoder]") + ": leave it out")
    if base_path(cfg):
        return train_on_base(cfg, run_dir, base or frozen_base(base_path(cfg)))
    data = data_of(cfg)
    rank, world, device = distributed()
    say = print if rank == 0 else (lambda *a: None)
    tcfg, ae = cfg.train, None

    # 1. the autoencoder and 2. the latents (latent recipes)
    if cfg.autoencoder:
        ae, ae_cfg, ae_minutes = autoencoder_phase(cfg, run_dir, data, autoencoder, device)
        if tcfg.minutes:  # the budget covers both models
            tcfg = replace(tcfg, minutes=max(tcfg.minutes - ae_minutes, 1e-3))
        data, scale = latent_data(cfg, run_dir / run.AUTOENCODER, ae, data)
        cfg = replace(cfg, autoencoder=ae_cfg, diffusion=replace(cfg.diffusion, scale_factor=scale))

    # 3. the conditioner: its classes and the grids' prompts from the data, and what the U-Net must read
    conditioner, unet_options = None, {"in_channels": data.shape[0]}
    if cfg.condition:
        cfg = with_condition(cfg, data)
        conditioner = bind_conditioner(Conditioner(cfg.condition), ae, cfg)
        unet_options.update(conditioner.unet_options(data.shape[0], ae.cfg.in_channels if ae else data.shape[0]))

    # 4. the U-Net
    cfg = replace(cfg, unet=replace(cfg.unet, **unet_options))
    if rank == 0:
        run.write_config(cfg, run_dir)
    schedule = Schedule.of(cfg.diffusion)
    torch.manual_seed(cfg.train.seed)  # the initial weights
    unet = UNet(cfg.unet)
    model = ConditionedUNet(unet, conditioner) if conditioner else unet

    def loss_fn(model, batch, g, step):
        return diffusion_loss(model, batch, g, schedule=schedule, prediction=cfg.diffusion.prediction,
                              weighting=cfg.diffusion.loss_weighting)

    trainer = Trainer(run_dir, model, loss_fn, data, tcfg, evaluate=grids(cfg, run_dir, schedule, ae, data),
                      device=device)
    if trainer.resume():
        say(f"resuming {run_dir} from step {trainer.step} ({trainer.elapsed / 60:.1f} min trained)")
    say(f"{sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M-parameter U-Net, {amount(data)} "
        f"{'latents' if ae else 'images'} of {data.shape}, run folder {run_dir}"
        + (f", {world} processes" if world > 1 else ""))
    trainer.fit()
    if world > 1:
        dist.barrier()  # rank 0's last checkpoint and grid are written before anyone leaves
        dist.destroy_process_group()  # gloo's threads end here, not in the interpreter's exit (which can abort)
    return run_dir


def base_path(cfg: Config) -> str:
    """The model a recipe starts from: a fine-tune's init, a LoRA's or ControlNet's base ('' for a new model)."""
    adapter = cfg.lora or cfg.controlnet
    return cfg.init or (adapter.base if adapter else "")


def data_of(cfg: Config, split="train"):
    """The recipe's data; shards stream with its crop, buckets (in steps of the model's factor) and shuffle."""
    d = cfg.data
    return load_dataset(d.name, d.size, split, crop=d.crop, buckets=d.buckets, shuffle=d.shuffle, multiple=cfg.factor)


def amount(data) -> str:
    return f"a stream of {len(data.urls)} shards of" if streamed(data) else f"{len(data)}"


def frozen_base(path):
    """A LoRA or ControlNet recipe's frozen model: (config, model, autoencoder, the autoencoder's folder, SD family
    or None), from a run folder or a Stable Diffusion file or folder."""
    path = Path(path)
    if run.is_run(path):
        b, model, ae, _ = run.load_run(path)
        if b.lora or b.controlnet:
            raise ValueError(f"base {path} is itself a LoRA or ControlNet run: give the run folder it was made on")
        return b, model, ae, path / run.AUTOENCODER, None
    from .pipeline import load

    pipe = load(path, "fp32")  # trained on: exact weights
    return pipe.cfg, ConditionedUNet(pipe.unet, pipe.conditioner), pipe.autoencoder, path, pipe.family


def on_base(cfg: Config, base) -> Config:
    """A LoRA or ControlNet recipe's config: the base's model (U-Net, autoencoder, diffusion, condition) with the
    recipe's own data, training, sampling and adapter settings; a run's data size, or for an SD base the recipe's
    (a multiple of 64). A ControlNet drops its own share of prompts (controlnet.drop_prob)."""
    b, family = base[0], base[4]
    size = cfg.data.size if family else b.data.size
    condition = b.condition
    if cfg.controlnet and condition:
        condition = replace(condition, drop_prob=cfg.controlnet.drop_prob)
    return replace(cfg, unet=b.unet, autoencoder=b.autoencoder, diffusion=b.diffusion, condition=condition,
                   data=replace(cfg.data, size=size), autoencoder_train=None)


def train_on_base(cfg: Config, run_dir: Path, base):
    """A LoRA, a textual inversion or a ControlNet on a frozen model (its `base`, loaded by frozen_base): the one
    trainer on what is new alone, with the base's autoencoder and conditioner; written at the end in the formats
    other tools read (kohya's LoRA, A1111's embedding, the original ControlNet layout and a diffusers folder)."""
    from .adapters import LoraUNet

    _, model, ae, ae_dir, family = base
    base = Path(base_path(cfg))
    data = data_of(cfg)
    rank, world, device = distributed()
    say = print if rank == 0 else (lambda *a: None)
    hints = None
    if cfg.controlnet:  # each image's control, made from its pixels before they become latents
        c = cfg.controlnet
        if not isinstance(data, ImageSet):
            raise ValueError("ControlNet training makes each image's control in memory: train it on a data set or "
                             "an image folder, not on shards")
        hints = control_images(data.images, c.kind, c.a, c.b)
    if ae is not None:
        data, _ = latent_data(cfg, ae_dir, ae, data)
    data.hints = hints
    if cfg.condition:
        cfg = with_condition(cfg, data)
    if rank == 0:
        run.write_config(cfg, run_dir)
    conditioned = isinstance(model, ConditionedUNet)
    schedule = Schedule.of(cfg.diffusion)
    evaluate = control_rows(cfg, run_dir, ae) if cfg.controlnet else grids(cfg, run_dir, schedule, ae, data)
    if cfg.controlnet:
        from .controlnet import ControlNet, ControlledUNet, copy_encoder, hint_widths

        unet = model.unet if conditioned else model
        torch.manual_seed(cfg.train.seed)
        cn = copy_encoder(ControlNet(unet.cfg, hint_widths(ae.cfg.factor if ae else 1)), unet)
        controlled = ControlledUNet(unet, cn)
        net = ConditionedUNet(controlled, model.conditioner.requires_grad_(False)) if conditioned else controlled
        what = (f"ControlNet ({sum(p.numel() for p in cn.parameters()) / 1e6:.2f}M parameters, "
                f"{cfg.controlnet.kind} controls)")
    elif cfg.init:  # a full fine-tune: the U-Net learns, the text encoder(s) and autoencoder stay frozen
        net = model
        if conditioned:
            model.conditioner.requires_grad_(False)
        unet = model.unet if conditioned else model
        unet.requires_grad_(True)
        what = f"fine-tuning the {sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M-parameter U-Net"
    elif cfg.lora.embedding:  # textual inversion: one new token's vectors learn, everything else frozen
        net, token = _token_model(cfg, model, data), cfg.lora.embedding
        what = f"textual inversion: {token!r} as {cfg.lora.vectors} vector(s)"
    else:
        unet = model.unet if conditioned else model
        names = None  # kohya names SD 1.x/2.x U-Nets the diffusers way (SDXL and runs: the original way, ours)
        if family in ("sd1", "sd2"):
            from .formats import diffusers

            names = {k.removesuffix(".weight"): v.removesuffix(".weight")
                     for k, v in diffusers.names("unet", unet).items()}
        lora = LoraUNet(unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, names)
        net = ConditionedUNet(lora, model.conditioner.requires_grad_(False)) if conditioned else lora
        what = (f"LoRA of rank {cfg.lora.rank} on {len(lora.down)} modules "
                f"({sum(p.numel() for p in lora.parameters()) / 1e6:.2f}M parameters)")

    def loss_fn(model, batch, g, step):
        return diffusion_loss(model, batch, g, schedule=schedule, prediction=cfg.diffusion.prediction,
                              weighting=cfg.diffusion.loss_weighting)

    (model.unet if conditioned else model).checkpointing = cfg.train.checkpointing
    trainer = Trainer(run_dir, net, loss_fn, data, cfg.train, evaluate=evaluate, device=device, keep_frozen=False)
    if trainer.resume():
        say(f"resuming {run_dir} from step {trainer.step}")
    say(f"{what} of {base}, {amount(data)} samples of {cfg.data.name}")
    trainer.fit()
    if rank == 0 and cfg.controlnet:
        from .controlnet import RUN_FILE, save_controlnet

        cn = (trainer.ema.unet if conditioned else trainer.ema).controlnet
        save_controlnet(cn, run_dir / RUN_FILE)
        save_controlnet(cn, run_dir / "controlnet")
        say(f"wrote {run_dir / RUN_FILE} and {run_dir / 'controlnet'}/ (use it: nanosd generate {base} PROMPT "
            f"--controlnet {run_dir / RUN_FILE} --control-image CONTROL.png)")
    elif rank == 0 and cfg.init:
        say(f"wrote {run_dir / run.WEIGHTS} (the fine-tuned U-Net; use it: nanosd generate {run_dir} PROMPT, "
            f"or as one file for A1111: nanosd convert {run_dir} model.safetensors)")
    elif rank == 0 and cfg.lora.embedding:  # as A1111 reads embeddings: RUN/TOKEN.safetensors (emb_params)
        vectors = trainer.ema.conditioner.text.model.embeddings.token_embedding.extra
        save_tensors({"emb_params": vectors.detach().float().contiguous()}, run_dir / f"{token}.safetensors")
        say(f"wrote {run_dir / token}.safetensors (in prompts: {token!r}; nanosd generate {base} --embedding-dir "
            f"{run_dir})")
    elif rank == 0:
        ema = trainer.ema.unet if conditioned else trainer.ema
        save_tensors(ema.kohya(), run_dir / run.LORA, metadata={"ss_network_dim": str(cfg.lora.rank),
                                                                  "ss_network_alpha": str(cfg.lora.alpha),
                                                                  "nanosd_base": str(base)})
        say(f"wrote {run_dir / run.LORA} (use it: nanosd generate {base} --lora {run_dir / run.LORA}:1.0)")
    if world > 1:
        dist.barrier()  # rank 0's file is written before anyone leaves
        dist.destroy_process_group()
    return run_dir


def control_rows(cfg: Config, run_dir: Path, ae):
    """A ControlNet run's grid: rows of control, sample (the EMA ControlNet steering the frozen model), original,
    for held-out images with their own captions."""
    from .controlnet import Control, held_out
    from .pipeline import Pipeline

    images, _, hints, prompts = held_out(cfg, 8)

    def evaluate(step, ema):
        controlled = ema.unet if isinstance(ema, ConditionedUNet) else ema
        conditioner = ema.conditioner if isinstance(ema, ConditionedUNet) else None
        pipe = Pipeline(controlled.base, Schedule.of(cfg.diffusion), cfg, ae, conditioner)
        made = pipe.generate(prompts if conditioner is not None and conditioner.prompted else None,
                             batch_size=len(images), seed=0, output="tensor",
                             control=[Control(controlled.controlnet, hints)]).images
        rows = torch.cat([hints, *(x.expand(-1, 3, -1, -1) for x in (made, (images + 1) / 2))])
        save_grid(rows, run_dir / run.GRIDS / f"step_{step:07d}.png", nrow=len(images))
        save_grid(rows, run_dir / run.GRID, nrow=len(images))
    return evaluate


def _token_model(cfg, model, data):
    """The frozen model with a new token whose vectors learn; the token put first in captions that lack it."""
    from .adapters import learn_token

    token, c = cfg.lora.embedding, model.conditioner if isinstance(model, ConditionedUNet) else None
    if c is None or c.text2 is not None:
        raise ValueError("textual inversion trains here for one-text-encoder models (runs with encoder = \"clip\", "
                         "SD 1.x/2.x): this model has none, or two")
    if data.captions is None:
        raise ValueError("textual inversion puts its token into the captions in memory: train it on a folder of "
                         "images with captions (NAME.png + NAME.txt) or on shards written by 'nanosd data shard'")
    model.requires_grad_(False)
    learn_token(c.text, token, cfg.lora.vectors, cfg.lora.init)
    data.captions = [[p if token in p else f"{token} {p}" for p in caps] for caps in data.captions]
    return model


def _open_run(cfg: Config | None, run_dir: Path, minutes, steps) -> Config:
    """The run's config (a copy: the caller's stays as it was): a new one (refused if the folder holds another
    run) or the folder's own, to resume; with the budget given on the command line."""
    stored = run_dir / run.CONFIG
    if cfg is None:
        if not stored.exists():
            raise FileNotFoundError(f"{run_dir} is not a run folder (no {run.CONFIG}): pass a config file to start a run")
        cfg = load_config(stored)
    elif stored.exists() and (run_dir / run.STATE).exists():
        old = load_config(stored)  # what the recipe derived from the data is not part of the comparison
        old = replace(old, train=replace(old.train, steps=cfg.train.steps, minutes=cfg.train.minutes),
                      unet=replace(old.unet, in_channels=cfg.unet.in_channels),
                      diffusion=replace(old.diffusion, scale_factor=cfg.diffusion.scale_factor),
                      autoencoder=replace(old.autoencoder, in_channels=cfg.autoencoder.in_channels)
                      if old.autoencoder and cfg.autoencoder else old.autoencoder)
        if dump_config(old) != dump_config(cfg):
            raise ValueError(f"run folder {run_dir} holds a run of another config: choose a new --out, "
                             f"or resume it with 'nanosd train {run_dir}'")
    budget = {k: v for k, v in (("minutes", minutes), ("steps", steps)) if v is not None}
    return replace(cfg, train=replace(cfg.train, **budget))  # every phase derives with replace: nothing is mutated


def autoencoder_phase(cfg: Config, run_dir: Path, data, given, device):
    """(autoencoder, its config, minutes spent): copied from `given`, or trained in RUN/autoencoder/."""
    ae_dir = run_dir / run.AUTOENCODER
    if given is not None:
        run.copy_autoencoder(Path(given), ae_dir)
    if (ae_dir / run.WEIGHTS).exists() and not (ae_dir / run.STATE).exists():  # given, not trained here
        return run.load_autoencoder(ae_dir, run_dir), load_config(ae_dir / run.CONFIG).autoencoder, 0.0
    ae_cfg = replace(cfg.autoencoder, in_channels=data.shape[0])
    tcfg = cfg.autoencoder_train or TrainConfig()
    if not tcfg.steps and not tcfg.minutes:
        if not cfg.train.minutes:
            raise ValueError("set autoencoder_train.steps or .minutes, or give --minutes for the whole recipe")
        tcfg = replace(tcfg, minutes=cfg.train.minutes * AUTOENCODER_SHARE)
    ae, seconds = train_autoencoder(replace(cfg, autoencoder=ae_cfg), ae_dir, data, tcfg, device)
    return ae, ae_cfg, seconds / 60


def train_autoencoder(cfg: Config, ae_dir: Path, data, tcfg: TrainConfig, device="cpu"):
    """Train (or finish) the autoencoder of a latent recipe in its own run folder; returns its EMA model."""
    from .autoencoder import Autoencoder, AutoencoderLoss, psnr, ssim

    if distributed()[0] == 0:
        run.write_config(cfg, ae_dir)
    if streamed(data):  # a stream has no test split: its first images
        held_out = data.preview(500)["image"]
    else:
        held_out = data_of(cfg, split="test")
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


def latent_data(cfg: Config, ae_dir: Path, ae, data):
    """(the data as scaled latents, the scale): the latents stored in shards made with this very autoencoder, or
    the data set encoded once (cached); the scale is diffusion.scale_factor, or 1/std of the latents."""
    concat = bool(cfg.condition and cfg.condition.concat)
    stored = getattr(data, "latent_info", None)
    if stored and stored["autoencoder"] == run.weights_key(ae_dir):
        if concat:
            raise ValueError("spatial conditions need the pixels beside the latents: train on the images, "
                             "not on pre-encoded shards")
        scale = cfg.diffusion.scale_factor or round(1 / data.latents().std().item(), 5)
        return data.use_latents(scale), scale
    if concat and not isinstance(data, ImageSet):
        raise ValueError("spatial-condition recipes keep the pixels in memory: train them on a data set or "
                         "an image folder, not on shards")
    if streamed(data):  # streamed images: each batch encoded as it is read
        with torch.no_grad():
            scale = cfg.diffusion.scale_factor or round(
                1 / ae.encode(data.preview(256)["image"].to(next(ae.parameters()).device)).mode().std().item(), 5)
        return data.use_autoencoder(ae, scale), scale
    latents = encode_dataset(ae, data, ae_dir, cfg)
    scale = cfg.diffusion.scale_factor or round(1 / latents.std().item(), 5)
    return ImageSet(latents * scale, data.labels, data.classes, data.captions, data.images if concat else None), scale


def with_condition(cfg: Config, data) -> Config:
    """The condition's classes (labels) and the grids' prompts (one per class, or captions from across the data)."""
    c, prompts = cfg.condition, cfg.sample.prompts
    if c.encoder == "labels":
        if data.labels is None:
            raise ValueError(f"condition.encoder = 'labels' needs labelled data, and {cfg.data.name} has none")
        c = replace(c, classes=list(data.classes))
    if not prompts:
        if c.encoder == "labels":
            prompts = list(data.classes)
        elif c.encoder != "none" and (captions := data.preview(len(data.classes) or 8).get("captions")):
            prompts = list(dict.fromkeys(caps[0] for caps in captions if caps[0]))
    return replace(cfg, condition=c, sample=replace(cfg.sample, prompts=prompts))


def grids(cfg: Config, run_dir: Path, schedule, ae, data):
    """The trainer's evaluation: a grid of samples from the EMA weights (for spatial conditions, rows of
    condition, sample, original), with autoguidance once the guide exists."""
    from .explain import condition_rows
    from .pipeline import Pipeline

    guides = []  # read once it is written: from then on the grids show autoguidance as generate does

    def evaluate(step, ema):
        if not guides and (guide := run.load_guide(run_dir, cfg)):
            guides.append(guide.to(next(ema.parameters()).device))
        guide = guides[0] if guides else None
        pipe, nrow = Pipeline.of(ema, schedule, cfg, ae, guide=guide), None
        if cfg.condition and cfg.condition.concat:  # rows: condition, sample, original
            pixels = (data.images if data.pixels is None else data.pixels)[data.spread_index(8)]
            images, nrow = condition_rows(pipe, pixels, pipe.grid_prompts(len(pixels))), len(pixels)
        else:
            images = pipe.generate(pipe.grid_prompts(cfg.sample.n), batch_size=cfg.sample.n, seed=0, output="tensor",
                                   autoguidance=None if guide else 1.0).images
        save_grid(images, run_dir / run.GRIDS / f"step_{step:07d}.png", nrow=nrow)
        save_grid(images, run_dir / run.GRID, nrow=nrow)
    return evaluate


@torch.no_grad()
def encode_dataset(ae, data, ae_dir: Path, cfg: Config, batch=250):
    """E(x) (the posterior mean) for every image, encoded once and cached by the autoencoder's weights."""
    key = run.weights_key(ae_dir)
    name = hashlib.sha256(cfg.data.name.encode()).hexdigest()[:8]
    path = cache_dir() / "latents" / f"{name}-{cfg.data.size}-{key}.safetensors"
    if path.exists():
        return load_tensors(path)["latents"]
    device = next(ae.parameters()).device
    latents = torch.cat([ae.encode(data.take(torch.arange(i, min(i + batch, len(data))))["image"].to(device)).mode().cpu()
                         for i in tqdm(range(0, len(data), batch), desc="encoding latents", leave=False)])
    save_tensors({"latents": latents}, path)
    return latents


def distill_tiny_decoder(run_dir, *, minutes=None, steps=None):
    """RUN/tiny_decoder/: TAESD's decoder architecture trained to map the run's latents (model space) to what its
    autoencoder's decoder makes of them (L1 + L2), on the run's own data: previews, and decoder="tiny" images.
    Resumable as any run; the budget defaults to 300 steps."""
    from .autoencoder import TinyDecoder, psnr

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / run.CONFIG) if (run_dir / run.CONFIG).exists() else None
    if cfg is None or not cfg.autoencoder or base_path(cfg):
        raise ValueError(f"{run_dir}: --tiny-decoder distils a latent run's own autoencoder; give a finished latent "
                         "run folder (SD models: load TAESD's taesd_decoder.safetensors instead)")
    ae_dir, out = run_dir / run.AUTOENCODER, run_dir / run.TINY_DECODER
    ae = run.load_autoencoder(ae_dir, run_dir).requires_grad_(False)
    data, scale = latent_data(cfg, ae_dir, ae, data_of(cfg))
    held_out = data.preview(256)["image"]
    tcfg = replace(cfg.train, steps=steps or (0 if minutes else 300), minutes=minutes or 0.0, lr=2e-3,
                   batch_size=min(64, cfg.train.batch_size), micro_batch=0,
                   warmup_steps=50, ema_decay=0.99, guide_at=0.0, sample_every=0, checkpoint_every=250)
    torch.manual_seed(tcfg.seed)
    # TAESD's 64 channels, or fewer for an autoencoder narrower than that (MNIST's: 32), so that it stays tiny
    tiny = TinyDecoder(ae.cfg.z_channels, ae.cfg.in_channels, ae.cfg.factor.bit_length() - 1, min(64, ae.cfg.ch))

    def loss_fn(model, batch, g, step):
        z = batch["image"]
        with torch.no_grad():
            target = ae.decode(z / scale)
        out = model(z)
        return F.l1_loss(out, target) + F.mse_loss(out, target)

    @torch.no_grad()
    def evaluate(step, ema):
        z = held_out.to(next(ema.parameters()).device)
        full, fast = ((f(z).float() / 2 + 0.5).clamp(0, 1) for f in (lambda z: ae.decode(z / scale), ema))
        save_grid(torch.cat([full[:8], fast[:8]]).cpu(), out / "decoded.png", nrow=8)
        return {"psnr_vs_decoder": round(psnr(full, fast).mean().item(), 3)}

    if distributed()[0] == 0:
        run.write_config(replace(cfg, train=tcfg), out)
    trainer = Trainer(out, tiny, loss_fn, data, tcfg, evaluate=evaluate)
    if trainer.resume():
        print(f"resuming the tiny decoder {out} from step {trainer.step}")
    print(f"{sum(p.numel() for p in tiny.parameters()) / 1e6:.2f}M-parameter tiny decoder, distilled from {ae_dir}")
    trainer.fit()
    return out
