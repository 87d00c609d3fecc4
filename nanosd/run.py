"""The run folder, the one place that knows its layout:

    config.toml              the full config (every default resolved)
    model.safetensors        the EMA weights: what `nanosd.load(RUN)` samples from
    train_state.safetensors  raw weights, EMA, optimizer moments; step and elapsed time in its metadata (resume)
    guide.safetensors        the EMA weights early in training (train.guide_at): autoguidance's weaker model
    metrics.jsonl            one JSON line per log interval
    samples.png, samples/    the latest grid, and one per evaluation
    autoencoder/             a latent recipe's autoencoder: a run folder of its own
"""
import hashlib
import shutil
from pathlib import Path

from .config import Config, dump_config, load_config
from .io import atomic_path, load_into, load_tensors

CONFIG = "config.toml"
WEIGHTS = "model.safetensors"
STATE = "train_state.safetensors"
GUIDE = "guide.safetensors"
METRICS = "metrics.jsonl"
GRID = "samples.png"
GRIDS = "samples"
AUTOENCODER = "autoencoder"
TINY_DECODER = "tiny_decoder"  # a run's TAESD-shaped decoder, distilled from its autoencoder (its own run folder)
LORA = "lora.safetensors"  # a LoRA run's deltas, in kohya's format (A1111, ComfyUI and nanosd's --lora read it)


def is_run(path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


def write_config(cfg: Config, run_dir: Path):
    with atomic_path(Path(run_dir) / CONFIG) as p:
        p.write_text(dump_config(cfg))


def autoencoder_dir(path) -> Path:
    """An autoencoder's run folder given a latent run folder (its autoencoder/) or the autoencoder's own folder."""
    path = Path(path)
    return path / AUTOENCODER if (path / AUTOENCODER / WEIGHTS).is_file() else path


def load_autoencoder(folder, model_dir=None):
    """The autoencoder in `folder` (config.toml with [autoencoder] + model.safetensors)."""
    from .autoencoder import Autoencoder

    folder = Path(folder)
    who = f"latent model {model_dir}: its autoencoder {folder}" if model_dir else f"autoencoder {folder}"
    if not (folder / WEIGHTS).is_file() or not (folder / CONFIG).is_file():
        raise FileNotFoundError(f"{who} is missing (no {WEIGHTS} and {CONFIG} there)")
    ae_cfg = load_config(folder / CONFIG).autoencoder
    if ae_cfg is None:
        raise ValueError(f"{who} has no [autoencoder] section in its {CONFIG}")
    ae = Autoencoder(ae_cfg)
    load_into(ae, load_tensors(folder / WEIGHTS), who)
    return ae.eval()


def copy_autoencoder(src: Path, dst: Path):
    """Reuse a trained autoencoder (--autoencoder): copied into the new run's autoencoder/ folder."""
    src = autoencoder_dir(src)
    if not (src / WEIGHTS).exists() or not (src / CONFIG).exists():
        raise FileNotFoundError(f"--autoencoder {src}: no {WEIGHTS} and {CONFIG} there (give a latent run folder "
                                f"or its {AUTOENCODER}/ folder)")
    if load_config(src / CONFIG).autoencoder is None:
        raise ValueError(f"--autoencoder {src}: its {CONFIG} has no [autoencoder] section")
    dst.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG, WEIGHTS):
        with atomic_path(dst / name) as p:
            shutil.copyfile(src / name, p)


def weights_key(folder: Path) -> str:
    """A short hash of a run folder's weights: which autoencoder made a set of latents. For a Stable Diffusion
    file or folder (whose VAE a LoRA recipe encodes with), its path, size and modification time."""
    folder = Path(folder)
    if (folder / WEIGHTS).is_file():
        return hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()[:16]
    st = folder.stat()
    return hashlib.sha256(f"{folder.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]


def load_guide(run: Path, cfg: Config):
    """Autoguidance's weaker model: the run's early EMA weights (train.guide_at), for unconditioned models."""
    from .unet import UNet

    if cfg.condition or not (run / GUIDE).is_file():
        return None
    guide = UNet(cfg.unet)
    load_into(guide, load_tensors(run / GUIDE), f"{run / GUIDE}")
    return guide


def load_run(path: Path):
    """(config, model, autoencoder, guide) of a run folder: the model a UNet, or a ConditionedUNet."""
    from .condition import ConditionedUNet, Conditioner, bind_conditioner
    from .unet import UNet

    path = Path(path)
    cfg = load_config(path / CONFIG)
    ae = load_autoencoder(path / AUTOENCODER, path) if cfg.autoencoder else None
    if ae is not None and ae.cfg.z_channels != cfg.unet.in_channels:
        raise ValueError(f"latent model {path}: its autoencoder {path / AUTOENCODER} makes {ae.cfg.z_channels}-channel "
                         f"latents but the U-Net reads {cfg.unet.in_channels}")
    unet = UNet(cfg.unet)
    model = ConditionedUNet(unet, bind_conditioner(Conditioner(cfg.condition), ae, cfg)) if cfg.condition else unet
    load_into(model, load_tensors(path / WEIGHTS), f"{path / WEIGHTS}")
    return cfg, model, ae, load_guide(path, cfg)
