"""nanosd beside diffusers on Stable Diffusion v1.5, measured in one run: a U-Net step (batch 2, as classifier-free
guidance runs it, 77 tokens), a VAE decode (batch 1), a whole text-to-image (tokenizer, text encoder, 20
dpmpp_2m steps, decode; after a one-step warm-up), the load time and the peak resident memory.

    python benchmarks/sd15.py [--size 512] [--repeats 3] [--modes nanosd-fp32,diffusers-fp32,nanosd-auto-fast,...]
    python benchmarks/sd15.py --device cuda     # fp16 and torch.compile beside diffusers' eager and compiled fp16

Weights are random with SD v1.5's shapes (no real ones can be had offline), stored as fp16 like most published
files. Each mode runs in a process of its own, so that each peak memory is its own. Prints medians, each time's
ratio to diffusers' fastest mode, and the whole images' mean absolute difference from nanosd fp32 (on [0, 1]).
A mode is IMPL-PRECISION[-OPTION...]: IMPL nanosd or diffusers; PRECISION fp32, bf16, fp16 or (nanosd) auto;
OPTIONs compile (torch.compile of the U-Net, either IMPL; the warm-up image pays for it), and for nanosd cfgend
(cfg_end 0.5), deepcache (cache_interval 3), tome (0.5), tiny (the tiny decoder: a TAESD-shaped file of random
weights), fast (the preset), sN (N steps instead). Modes with options other than compile time the whole image only
(and the decode, with tiny). diffusers' bf16 on a CPU is its recommended CPU set-up: bf16 weights and channels_last.
On a GPU (--device cuda) times wait for the GPU, the table adds the U-Net's it/s and the GPU's peak memory.

On a GPU machine without network and with its own torch: the few pure-Python packages nanosd and diffusers need
beyond torch's usual company travel as wheels, fetched where pip works (CPython 3.12 there):
    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 -d .whl diffusers==0.42.1 tomli-w ftfy wcwidth pydantic pydantic-core \
        annotated-types typing-inspection typing-extensions importlib-metadata
    (there) pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    (there) PYTHONPATH=/tmp/site:. python benchmarks/sd15.py --device cuda
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPT = "a photograph of an astronaut riding a horse"
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      steps_offset=1, clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True)


CPU_MODES = ("diffusers-fp32,diffusers-bf16,nanosd-fp32,nanosd-auto,nanosd-auto-cfgend,nanosd-auto-deepcache,"
             "nanosd-auto-tome,nanosd-auto-tiny,nanosd-auto-fast,nanosd-auto-fast-s12")
GPU_MODES = "diffusers-fp16,diffusers-fp16-compile,nanosd-fp16,nanosd-fp16-compile,nanosd-auto,nanosd-fp16-fast"
OPTIONS = {"cfgend": {"cfg_end": 0.5}, "deepcache": {"cache_interval": 3}, "tome": {"tome": 0.5},
           "tiny": {"decoder": "tiny"}, "fast": {"fast": True}}


def peak_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def child(a):
    """One mode, in its own process: prints one JSON line."""
    impl, precision, *extra = a.child.split("-")
    steps = next((int(e[1:]) for e in extra if e[0] == "s" and e[1:].isdigit()), a.steps)
    options = {k: v for e in extra for k, v in OPTIONS.get(e, {}).items()}
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    gpu = a.device.startswith("cuda")
    t0 = time.perf_counter()
    if impl == "nanosd":
        import nanosd

        pipe = nanosd.load(a.checkpoint, precision=precision, compile="compile" in extra, device=a.device)
        precision, dtype = pipe.precision, pipe.unet.out[2].weight.dtype
        if "tiny" in extra or "fast" in extra:
            pipe.load_tiny_decoder(Path(a.tmp) / "taesd_decoder.safetensors")
        unet = lambda x, t, ctx: pipe.unet(x, t, context=ctx)
        decode = lambda z: pipe.decode(z, tiny=options.get("decoder") == "tiny")
        image = lambda steps: pipe.generate(PROMPT, steps=steps, sampler="dpmpp_2m", cfg_scale=7.5, seed=0,
                                            height=a.size, width=a.size, output="tensor", **options).images
    else:
        import diffusers

        ref = diffusers.StableDiffusionPipeline.from_single_file(
            a.checkpoint, config=a.config, local_files_only=True, safety_checker=None, requires_safety_checker=False,
            torch_dtype=dtype)
        ref.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER)
        if precision == "bf16" and not gpu:
            ref.unet.to(memory_format=torch.channels_last)
            ref.vae.to(memory_format=torch.channels_last)
        ref.to(a.device)
        if "compile" in extra:
            ref.unet = torch.compile(ref.unet)
        ref.set_progress_bar_config(disable=True)
        unet = lambda x, t, ctx: ref.unet(x, t, encoder_hidden_states=ctx).sample
        decode = lambda z: ref.vae.decode(z).sample
        image = lambda steps: ref(PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=a.size, width=a.size,
                                  generator=torch.Generator().manual_seed(0), output_type="pt").images
    sync = torch.cuda.synchronize if gpu else lambda: None
    out = {"mode": a.child, "precision": precision, "load_s": time.perf_counter() - t0, "load_peak_gib": peak_gib()}
    parts = a.parts if not options else [p for p in a.parts.split(",") if p == "image" or
                                         (p == "vae" and options.get("decoder") == "tiny")]
    s = a.size // 8
    g = torch.Generator().manual_seed(0)
    x, z = (torch.randn(n, 4, s, s, generator=g).to(a.device, dtype) for n in (2, 1))
    ctx, t = torch.randn(2, 77, 768, generator=g).to(a.device, dtype), torch.tensor(500, device=a.device)
    with torch.inference_mode():
        if "unet" in parts:
            out["unet_s"] = timed(lambda: (unet(x, t, ctx), sync()), a.repeats)
        if "vae" in parts:
            out["vae_s"] = timed(lambda: (decode(z), sync()), a.repeats)
        if "image" in parts:
            image(1)  # warm-up: every code path once (and torch.compile's compiling)
            sync()
            t0 = time.perf_counter()
            im = image(steps)
            sync()
            out["image_s"] = time.perf_counter() - t0
            torch.save(im.float().cpu(), Path(a.tmp) / f"{a.child}.pt")
    out["peak_gib"] = peak_gib()
    if gpu:
        out["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps(out), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=20, help="sampler steps of the whole image")
    p.add_argument("--repeats", type=int, default=3, help="timed U-Net steps and decodes (medians)")
    p.add_argument("--modes", help="default on a CPU: " + CPU_MODES + "; on a GPU: " + GPU_MODES)
    p.add_argument("--device", default="cpu", help="cpu, or cuda (a GPU)")
    p.add_argument("--parts", default="unet,vae,image", help="which of unet, vae, image to time")
    p.add_argument("--checkpoint", help="an SD v1.5 single file (default: random weights, written once)")
    p.add_argument("--config", help="its diffusers config folder (default: written with the random weights)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)
    a.modes = a.modes or (GPU_MODES if a.device.startswith("cuda") else CPU_MODES)
    with tempfile.TemporaryDirectory() as tmp:
        if not a.checkpoint:
            a.checkpoint, a.config = f"{tmp}/sd15-fp16.safetensors", f"{tmp}/config"
            subprocess.run([sys.executable, str(Path(__file__).parent / "random_sd15.py"), a.checkpoint, "--fp16",
                            "--config", a.config], check=True, stdout=subprocess.DEVNULL)
        from nanosd.autoencoder import TinyDecoder
        from nanosd.io import save_tensors

        torch.manual_seed(0)  # TAESD's shape, random weights: its speed is what is measured
        save_tensors(TinyDecoder().state_dict(), f"{tmp}/taesd_decoder.safetensors")
        rows = []
        for mode in a.modes.split(","):
            cmd = [sys.executable, __file__, "--child", mode, "--tmp", tmp, "--size", str(a.size), "--steps",
                   str(a.steps), "--repeats", str(a.repeats), "--parts", a.parts, "--checkpoint", a.checkpoint,
                   "--device", a.device]
            cmd += ["--config", a.config] if a.config else []
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                print(f"{mode}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{mode}: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
        images = {m: torch.load(f, weights_only=True) for m in a.modes.split(",")
                  if (f := Path(tmp) / f"{m}.pt").exists()}
    from nanosd.fast import cpu_facts

    gpu = a.device.startswith("cuda")
    refs = [r for r in rows if r["mode"].startswith("diffusers") and "image_s" in r]
    fastest = min(refs, key=lambda r: r["image_s"]) if refs else None
    base = {k: min(r[k] for r in refs if k in r) for k in ("unet_s", "vae_s", "image_s", "load_s")
            if any(k in r for r in refs)}
    facts = cpu_facts()
    print(f"\nCPU: {facts['name']} ({facts['physical_cores']} cores; {', '.join(facts['flags'])}; torch capability "
          f"{facts['capability']}), {torch.get_num_threads()} threads"
          + (f"; GPU: {torch.cuda.get_device_name(a.device)}, torch {torch.__version__}" if gpu else ""))
    print(f"SD v1.5 (random weights, fp16 file), {a.size}x{a.size}, U-Net batch 2 x 77 tokens, medians of "
          f"{a.repeats}; (x) = time / diffusers' fastest mode's ({fastest['mode'] if fastest else '-'} for the image)")
    for r in rows:
        r["its"] = 1 / r["unet_s"] if "unet_s" in r else None
    cols = [("load_s", "load s"), ("unet_s", "U-Net step s"), ("its", "U-Net it/s"), ("vae_s", "VAE decode s"),
            ("image_s", f"image ({a.steps} dpmpp_2m) s"), ("peak_gib", "peak RSS GiB"), ("gpu_peak_gib", "GPU peak GiB")]
    cols = [c for c in cols if any(r.get(c[0]) is not None for r in rows) and (c[0] != "its" or gpu)]
    ref_mode = "nanosd-fp32" if "nanosd-fp32" in images else next(iter(images), None)
    print("| mode | " + " | ".join(c[1] for c in cols) + f" | image MAD vs {ref_mode} |")
    print("|---" * (len(cols) + 2) + "|")
    for r in rows:
        cells = []
        for k, _ in cols:
            v = r.get(k)
            ratio = f" ({v / base[k]:.2f}x)" if base and k in base and k.endswith("_s") and v is not None else ""
            cells.append("-" if v is None else f"{v:.2f}{ratio}")
        ref = images.get(ref_mode)
        mad = (images[r["mode"]] - ref).abs().mean().item() if ref is not None and r["mode"] in images else None
        name = r["mode"] + (f" ({r['precision']})" if "-auto" in r["mode"] else "")
        print(f"| {name} | " + " | ".join(cells) + f" | {'-' if mad is None else f'{mad:.2e}'} |")
    for r in rows:  # each nanosd image against each diffusers mode's
        if r["mode"].startswith("nanosd") and "image_s" in r and refs:
            print(f"{r['mode']}: image " + ", ".join(f"{r['image_s'] / d['image_s']:.2f}x {d['mode']}" for d in refs))

if __name__ == "__main__":
    main()
