"""Speed: the arithmetic this CPU does fast (precision="auto"), its threads, and two options that do less work per
image, each wrapping the U-Net call and off by default: feature caching across steps (DeepCache, Ma et al. 2023)
and token merging in self-attention (ToMe for SD, Bolya & Hoffman 2023). Guidance's end (cfg_end) is the
denoiser's; the tiny decoder is autoencoder.py's."""
import json
import os
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .io import atomic_path, cache_dir, glibc


# --- the machine ---

def _cpuinfo() -> list[dict]:
    """/proc/cpuinfo as one dict per logical CPU (empty where there is none: macOS, Windows)."""
    try:
        text = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return []
    return [dict((k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in block.splitlines()))
            for block in text.strip().split("\n\n") if block.strip()]


def cpu_facts() -> dict:
    """The CPU's name, its flags that decide the arithmetic, physical cores (of those this process may use) and
    torch's view of it."""
    cpus = _cpuinfo()
    first = cpus[0] if cpus else {}
    flags = set((first.get("flags") or first.get("Features") or "").split())
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = {(c.get("physical id"), c.get("core id")) for c in cpus if int(c.get("processor", -1)) in usable}
    return {"name": first.get("model name") or platform.processor() or platform.machine(),
            "flags": sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16",
                                     "bf16", "asimd", "sve"}),
            "physical_cores": len(cores) if cores and None not in next(iter(cores)) else len(usable),
            "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}


HEAP_KEEP = 32 << 20  # bytes: glibc's own ceiling for the threshold; 64 MB raised bf16 SD's peak by 0.13 GiB
HEAP_TOP_KEEP = 1 << 30  # bytes of free heap top kept: a step's activations, freed and taken again
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (glibc's malloc.h)


def keep_freed_buffers(size: int = HEAP_KEEP, top: int = HEAP_TOP_KEEP) -> bool:
    """Freed memory stays in glibc's heap for the next call to reuse: blocks under `size` come from the heap, and
    its free top is handed back to the system only past `top` (or by io.release_freed_memory). By default glibc
    maps blocks from 128 KB up from the system (a threshold that rises to 32 MB only as such blocks are freed) and
    trims the heap's top whenever twice that is free, so each U-Net call or training step page-faults its memory
    in again: 60-70k page faults a step of the text recipe's training (diffusers' U-Net: 10-25k), 130-180k
    a bf16 SD 1.5 step at 512² — a few to 15% of their time (benchmarks/sd15.py, train_speed.py). A1111 preloads
    tcmalloc for the same reason. Process-wide; False where the C library is not glibc (nothing changed)."""
    libc = glibc()
    return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, size) and libc.mallopt(M_TRIM_THRESHOLD, top))


def set_threads(threads: int | None = None) -> int:
    """torch's intra-op threads: `threads`, else $NANOSD_THREADS, else one per physical core (hyper-threads share a
    core's matmul units: more threads only contend)."""
    n = threads or int(os.environ.get("NANOSD_THREADS", 0)) or cpu_facts()["physical_cores"]
    if n < 1:
        raise ValueError(f"threads must be at least 1, got {n}")
    torch.set_num_threads(n)
    return n


def matmul_gflops(dtype, n=1024, seconds=0.25) -> float:
    """Measured GFLOP/s of n x n matmuls in `dtype` on this CPU (after a warm-up)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    done, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds or done < 2:
        a @ b
        done += 1
    return 2 * n**3 * done / elapsed / 1e9


def measured(facts: dict) -> dict:
    """fp32 and bf16 matmul GFLOP/s, measured once per CPU, torch version and thread count, then read from the cache."""
    key = f"{facts['name']}|{torch.__version__}|{torch.get_num_threads()} threads"
    path = cache_dir() / "matmul.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = {"fp32": round(matmul_gflops(torch.float32), 1), "bf16": round(matmul_gflops(torch.bfloat16), 1)}
        with atomic_path(path) as part:
            part.write_text(json.dumps(known, indent=1))
    return known[key]


def choose_precision(facts: dict | None = None, device=None) -> tuple[str, str]:
    """("fp32" | "bf16" | "fp16", why) for this CPU, or for `device` when it is a GPU ($NANOSD_PRECISION, if set,
    decides). A GPU: bf16 where it has bf16 tensor cores (fp16's speed without its overflows: SDXL's VAE), else
    fp16. A CPU: bf16 with AMX (its tiles do bf16 several times faster than fp32); where the CPU has bf16
    instructions without AMX (AVX-512 BF16, Arm's BF16) whatever a cached micro-benchmark finds faster by a margin
    (on Intel without AMX bf16 is slower, on AMD Zen 5 four times faster); fp32 where bf16 would be emulated (AVX2
    only: a hundred times slower)."""
    if forced := os.environ.get("NANOSD_PRECISION"):
        if forced not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"NANOSD_PRECISION={forced!r}: give fp32, bf16 or fp16 (or unset it: chosen per machine)")
        return forced, "NANOSD_PRECISION"
    if device is not None and torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(device)
        return ("bf16", f"{name} has bf16 tensor cores") if torch.cuda.is_bf16_supported() else \
            ("fp16", f"{name} has no bf16: fp16")
    facts = facts or cpu_facts()
    flags = set(facts["flags"])
    if "amx_bf16" in flags:
        return "bf16", "the CPU has AMX (amx_bf16)"
    if not flags & {"avx512_bf16", "bf16"}:
        return "fp32", "no bf16 instructions (bf16 would be emulated)"
    speed = measured(facts)
    ratio = speed["bf16"] / speed["fp32"]
    pick = "bf16" if ratio > 1.25 else "fp32"  # a margin for the casts and the ops bf16 does not speed up
    return pick, (f"bf16 instructions without AMX; measured matmuls: bf16 {speed['bf16']:.0f} GFLOP/s, fp32 "
                  f"{speed['fp32']:.0f} ({ratio:.2f}x)")


# --- feature caching across steps (DeepCache) ---

@dataclass
class FeatureCache:
    """The U-Net's decoder features below skip `depth`, kept from a full step and reused on the next interval - 1
    calls, which run only the input blocks 0..depth and the output blocks that read their skips (high-level
    features change slowly between adjacent steps). A call with another batch shape (guidance switched off by
    cfg_end) runs in full."""
    interval: int
    depth: int
    calls: int = 0
    feature: torch.Tensor | None = None

    def reuse(self, h: torch.Tensor) -> torch.Tensor | None:
        """The cached feature, if this call may use it for an input of h's shape (None: run the whole U-Net)."""
        use = self.calls % self.interval and self.feature is not None and self.feature.shape[0] == h.shape[0]
        self.calls += 1
        return self.feature if use else None


# --- token merging in self-attention (ToMe for SD) ---

class TokenMerging:
    """Bipartite soft matching on the tokens of one image grid: one destination token per 2 x 2 cell (its place
    drawn from `generator` at each call), and the `ratio` of all tokens that are most similar to a destination
    merged into it (averaged) before self-attention, then copied back out after it. Only grids of `tokens` tokens
    (the largest resolution with attention) are merged: there most of the attention's cost is."""

    def __init__(self, ratio: float, tokens: int, generator: torch.Generator):
        self.ratio, self.tokens, self.generator = ratio, tokens, generator

    def __call__(self, x: torch.Tensor, hw: tuple):
        """(merge, unmerge) for this grid of tokens, or None where it is not merged."""
        B, N, C = x.shape
        (H, W), r = hw, int(N * self.ratio)
        if N != self.tokens or r < 1:
            return None
        h2, w2 = H // 2, W // 2
        pick = torch.randint(4, (h2, w2), generator=self.generator)
        is_dst = torch.zeros(h2, w2, 4, dtype=torch.bool).scatter_(2, pick[..., None], True)
        grid = torch.zeros(H, W, dtype=torch.bool)  # rows and columns beyond the last full cell stay sources
        grid[:h2 * 2, :w2 * 2] = is_dst.view(h2, w2, 2, 2).transpose(1, 2).reshape(h2 * 2, w2 * 2)
        order = grid.flatten().to(torch.int8).argsort(descending=True, stable=True).to(x.device)
        dst_idx, src_idx = order[:h2 * w2], order[h2 * w2:]
        r = min(r, len(src_idx))
        with torch.no_grad():  # which source joins which destination: cosine similarity
            metric = x / x.norm(dim=-1, keepdim=True)
            best, target = (metric[:, src_idx] @ metric[:, dst_idx].transpose(1, 2)).max(-1)
            ranked = best.argsort(-1, descending=True)
            merged, kept = ranked[:, :r], ranked[:, r:]  # positions in src_idx
            into = target.gather(1, merged)  # positions in dst_idx

        def take(t, idx):
            return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))

        def merge(t):
            src, dst = t[:, src_idx], t[:, dst_idx]
            dst = dst.scatter_reduce(1, into[..., None].expand(-1, -1, t.shape[-1]), take(src, merged), "mean")
            return torch.cat([take(src, kept), dst], 1)

        def unmerge(t):
            k = kept.shape[1]
            out = t.new_empty(B, N, t.shape[-1])
            out[:, dst_idx] = t[:, k:]
            where = lambda pos: src_idx[pos][..., None].expand(-1, -1, t.shape[-1])
            out.scatter_(1, where(kept), t[:, :k])
            out.scatter_(1, where(merged), take(t[:, k:], into))
            return out

        return merge, unmerge


@contextmanager
def token_merging(unet, ratio: float, latent_hw: tuple, seed: int):
    """ToMe in the U-Net's self-attention at its largest attended resolution, for the duration (ratio 0: off).
    That is tomesd's default (SD 1.x/2.x: the 64 x 64 tokens of a 512 px image); for SDXL, whose first level has no
    attention, its 64 x 64 level at 1024 px."""
    from .unet import BasicTransformerBlock

    if not ratio:
        yield
        return
    level = min(unet.cfg.attention_levels)
    tome = TokenMerging(ratio, (latent_hw[0] >> level) * (latent_hw[1] >> level), torch.Generator().manual_seed(seed))
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    for b in blocks:
        b.tome = tome
    try:
        yield
    finally:
        for b in blocks:
            b.tome = None
