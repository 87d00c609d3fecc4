"""`nanosd serve MODEL`: a web page and an A1111-compatible HTTP API over one pipeline (FastAPI + uvicorn).

Requests queue and run one at a time on the model, in a worker thread; each job reports its place in the queue,
its progress and a preview of the predicted x_0 every few steps, and can be cancelled (a client that disconnects
from a waiting API call cancels its job). Input is checked at the edge: every bad request is a 4xx with a message.
"""
import asyncio
import base64
import binascii
import dataclasses
import io
import itertools
import json
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from . import adapters
from .images import png_info, to_pil
from .pipeline import Pipeline
from .request import Request
from .samplers import SAMPLERS, sampler


@dataclass
class Limits:
    max_side: int = 1024
    max_steps: int = 150
    max_batch: int = 8
    max_cfg: float = 30.0
    max_upload_bytes: int = 8 << 20
    max_queue: int = 64
    gallery: int = 200  # images kept for the page (the oldest go first)
    preview_every: int = 5


class Txt2Img(BaseModel):
    """The fields of A1111's /sdapi/v1/txt2img that nanosd supports (others are ignored, as A1111 ignores extras)."""
    model_config = ConfigDict(extra="ignore")
    prompt: str = Field("", max_length=20_000)
    negative_prompt: str = Field("", max_length=20_000)
    steps: int = 20
    sampler_name: str | None = None
    scheduler: str | None = None  # A1111 1.9+'s schedule type: "Automatic", or "Karras" where nanosd has it
    cfg_scale: float = 7.0
    seed: int = -1
    width: int | None = None
    height: int | None = None
    batch_size: int = 1
    n_iter: int = 1
    eta: float | None = None
    clip_skip: int = 1
    alwayson_scripts: dict = Field(default_factory=dict)  # A1111's extensions' arguments: ControlNet's here


class ControlUnit(BaseModel):
    """A unit of A1111's ControlNet extension (alwayson_scripts.controlnet.args[i]); fields it has that would change
    the image and nanosd does not have are refused by name, never ignored."""
    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    module: str = "none"
    model: str = ""
    weight: float = 1.0
    image: str | dict | None = None
    input_image: str | None = None  # older clients' name (webuiapi)
    mask: str | None = None
    mask_image: str | None = None
    resize_mode: int | str = "Crop and Resize"
    processor_res: int = -1
    threshold_a: float = -1
    threshold_b: float = -1
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: int | str = 0
    pixel_perfect: bool = False
    low_vram: bool = False  # A1111's memory saving: the same image
    lowvram: bool = False
    guessmode: bool | None = None  # ControlNet 1.0's name for control_mode 2
    hr_option: Literal["Both", "Low res only", "High res only"] = "Both"  # hires fix passes (nanosd has none yet)


class Img2Img(Txt2Img):
    init_images: list[str] = Field(min_length=1, max_length=1)
    mask: str | None = None
    denoising_strength: float = 0.75


class Refused(ValueError):
    """A request the server will not run: answered 400 with the message."""


class Cancelled(Exception):
    pass


@dataclass
class Job:
    id: int
    request: Txt2Img
    kind: str  # txt2img or img2img
    state: str = "queued"  # queued, running, done, cancelled, error
    step: int = 0
    total: int = 0
    preview: bytes | None = None
    images: list = field(default_factory=list)  # (png bytes, infotext)
    error: str = ""
    cancel: bool = False
    resolved: Request | None = None  # the pipeline's request, as checked (the seed drawn when it said -1)


class Server:
    def __init__(self, pipe: Pipeline, model: str, limits: Limits | None = None, controlnet_dirs=()):
        self.pipe, self.model, self.limits = pipe, model, limits or Limits()
        self.controlnet_dirs, self.controlnets = list(controlnet_dirs), {}  # stem -> ControlNet, loaded once
        self.jobs: dict[int, Job] = {}
        self.queue: deque[Job] = deque()
        self.current: Job | None = None
        self.gallery: deque = deque(maxlen=self.limits.gallery)  # (id, png bytes, infotext)
        self.finished: deque = deque(maxlen=1024)  # job ids in the order they ended
        self.ids, self.gallery_ids = itertools.count(1), itertools.count(1)
        self.wake = threading.Condition()
        self.min_side = min(64, pipe.cfg.data.size)
        threading.Thread(target=self.worker, daemon=True).start()

    # --- checking requests at the edge ---
    def check(self, r: Txt2Img, kind: str) -> Request:
        """The service's limits, then the pipeline's own validation of the request (the same as the API's and the
        CLI's); anything refused is a 400 naming the field."""
        lim = self.limits
        size = self.pipe.cfg.data.size
        w, h = (size if v is None else v for v in (r.width, r.height))
        for name, side in (("width", w), ("height", h)):
            if not self.min_side <= side <= lim.max_side:  # the model's factor: Request.resolve checks it
                raise Refused(f"{name} {side} must be from {self.min_side} to {lim.max_side}")
        if not 1 <= r.steps <= lim.max_steps:
            raise Refused(f"steps {r.steps} must be from 1 to {lim.max_steps}")
        if not 0 <= r.cfg_scale <= lim.max_cfg:
            raise Refused(f"cfg_scale {r.cfg_scale} must be from 0 to {lim.max_cfg}")
        if not 1 <= r.batch_size * r.n_iter <= lim.max_batch or r.batch_size < 1 or r.n_iter < 1:
            raise Refused(f"batch_size x n_iter must be from 1 to {lim.max_batch}")
        if not 1 <= r.clip_skip <= 4:
            raise Refused(f"clip_skip {r.clip_skip} must be from 1 to 4")
        request = Request(r.prompt or None, r.negative_prompt or None, steps=r.steps,
                          sampler=self.scheduled(r.sampler_name, r.scheduler),
                          cfg_scale=r.cfg_scale, seed=r.seed if r.seed >= 0 else None, height=h, width=w,
                          batch_size=r.batch_size, eta=r.eta, clip_skip=r.clip_skip, output="tensor",
                          control=self.controls(r.alwayson_scripts))
        if kind == "img2img":
            image = self.decode_image(r.init_images[0], "init image")
            request.init = image if image.size == (w, h) else image.convert("RGB").resize((w, h), Image.LANCZOS)
            request.strength = r.denoising_strength
            if r.mask:
                request.mask = self.decode_image(r.mask, "mask").convert("L").resize((w, h), Image.NEAREST)
        try:
            return request.resolve(self.pipe)
        except ValueError as e:
            raise Refused(str(e)) from None

    def scheduled(self, name, schedule):
        """A1111 1.9+ sends the schedule apart from the sampler ("DPM++ 2M" + "Karras"): the sampler nanosd has for
        the pair, or a 400 naming the schedule (never the plain schedule in its place)."""
        if schedule is None or schedule.lower() in ("", "automatic"):  # webuiapi sends "automatic"
            return name
        base = sampler(name or self.pipe.cfg.sample.sampler).a1111
        try:
            return sampler(f"{base.removesuffix(' Karras')} {schedule}").a1111
        except ValueError:
            have = [s.a1111 for s in SAMPLERS.values() if s.karras]
            raise Refused(f"scheduler {schedule!r} with sampler {base!r}: nanosd has it only as "
                          f"{', '.join(have)} (or scheduler \"Automatic\")") from None

    def controls(self, scripts: dict) -> list:
        """ControlNet units (A1111's extension's request shape) as Controls; any other script is refused."""
        from pydantic import ValidationError

        from .controlnet import MODES, RESIZE, Control
        from .preprocess import A1111_MODULES, DEFAULTS

        other = [k for k in scripts if k.lower() != "controlnet"]
        if other:
            raise Refused(f"alwayson_scripts {', '.join(other)}: nanosd runs only the ControlNet script")
        script = next(iter(scripts.values()), {})
        args = script.get("args", []) if isinstance(script, dict) else None
        if not isinstance(args, list):
            raise Refused("alwayson_scripts.controlnet must be {\"args\": [units]}")
        units = []
        for i, raw in enumerate(args):
            try:
                u = ControlUnit.model_validate(raw)
            except ValidationError as e:
                first = e.errors()[0]
                raise Refused(f"alwayson_scripts.controlnet.args[{i}].{'.'.join(map(str, first['loc']))}: "
                              f"{first['msg']}") from None
            if not u.enabled:
                continue
            where = f"ControlNet unit {i}"
            image = u.image.get("image") if isinstance(u.image, dict) else u.image or u.input_image
            mask = (u.image.get("mask") if isinstance(u.image, dict) else None) or u.mask or u.mask_image
            if not image:
                raise Refused(f"{where}: give its image (base64)")
            modes, resizes = list(MODES), list(RESIZE)
            mode = "control" if u.guessmode else modes[u.control_mode] if isinstance(u.control_mode, int) and \
                0 <= u.control_mode < 3 else {v: k for k, v in MODES.items()}.get(u.control_mode)
            resize = resizes[u.resize_mode] if isinstance(u.resize_mode, int) and 0 <= u.resize_mode < 3 else \
                {v: k for k, v in RESIZE.items()}.get(u.resize_mode)
            if mode is None or resize is None:
                bad = ("control_mode", u.control_mode) if mode is None else ("resize_mode", u.resize_mode)
                raise Refused(f"{where}: {bad[0]} {bad[1]!r} is not one of A1111's")
            module = A1111_MODULES.get(u.module)
            if module is None:
                raise Refused(f"{where}: module {u.module!r}: nanosd has {', '.join(A1111_MODULES)}")
            mask = self.decode_image(mask, f"{where}'s mask") if mask else None
            if mask is not None and module != "inpaint" and not mask.convert("L").getbbox():
                mask = None  # A1111's older clients send an empty (black) mask with every unit
            takes = len(DEFAULTS[module])  # as A1111: thresholds a module has no use for are not read
            thresholds = [None if v < 0 or takes < n else v for v, n in ((u.threshold_a, 1), (u.threshold_b, 2))]
            units.append(Control(self.controlnet(u.model, where), self.decode_image(image, f"{where}'s image"),
                                 u.weight, u.guidance_start, u.guidance_end, mode, module,
                                 mask, *thresholds, resize,
                                 None if u.pixel_perfect or u.processor_res < 0 or module in ("none", "inpaint")
                                 else u.processor_res))
            try:
                units[-1].check()
            except ValueError as e:
                raise Refused(f"{where}: {e}") from None
        return units

    def controlnet(self, name: str, where: str):
        """A ControlNet of --controlnet-dir by A1111's name ("stem [hash]" or the stem), loaded once."""
        from .controlnet import load_controlnet

        stem = name.split(" [")[0]
        found = {f.stem: f for f in self.controlnet_files()}
        if stem not in found:
            raise Refused(f"{where}: no ControlNet {name!r} (GET /controlnet/model_list lists them)")
        if stem not in self.controlnets:
            try:
                self.controlnets[stem] = load_controlnet(found[stem], base=self.pipe)
            except ValueError as e:
                raise Refused(f"{where}: {e}") from None
        return self.controlnets[stem]

    def controlnet_files(self):
        """The ControlNets of --controlnet-dir: files in the original layout and diffusers folders."""
        return [f for d in self.controlnet_dirs for f in sorted(Path(d).iterdir())
                if f.suffix in (".safetensors", ".pth", ".ckpt") or (f / "config.json").is_file()]

    def decode_image(self, data: str, what: str) -> Image.Image:
        if "," in data[:100] and data.startswith("data:"):  # a data URL, as browsers and A1111 clients send
            data = data.split(",", 1)[1]
        if len(data) > self.limits.max_upload_bytes * 4 // 3 + 4:
            raise Refused(f"{what} is over {self.limits.max_upload_bytes >> 20} MiB")
        try:
            raw = base64.b64decode(data, validate=True)
            image = Image.open(io.BytesIO(raw))
            if image.format not in ("PNG", "JPEG", "WEBP"):
                raise Refused(f"{what} is {image.format}: send PNG, JPEG or WebP")
            if max(image.size) > 4 * self.limits.max_side:
                raise Refused(f"{what} is {image.size[0]}x{image.size[1]} px, too large")
            image.load()
        except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as e:
            if isinstance(e, Refused):
                raise
            raise Refused(f"{what} is not a base64 PNG, JPEG or WebP image") from None
        return image

    # --- the queue ---
    def submit(self, request: Txt2Img, kind: str) -> Job:
        resolved = self.check(request, kind)
        with self.wake:
            if len(self.queue) >= self.limits.max_queue:
                raise Refused(f"the queue is full ({self.limits.max_queue} waiting): try again later")
            job = Job(next(self.ids), request, kind, total=request.steps * request.n_iter, resolved=resolved)
            self.jobs[job.id] = job
            self.queue.append(job)
            self.wake.notify()
        return job

    def position(self, job: Job) -> int:
        """0 while it runs, k when k jobs are ahead of it (the running one included)."""
        if job.state != "queued":
            return 0
        ahead = list(self.queue).index(job) if job in self.queue else 0
        return ahead + (self.current is not None)

    def worker(self):
        while True:
            with self.wake:
                while not self.queue:
                    self.wake.wait()
                job = self.current = self.queue.popleft()
            if job.cancel:
                job.state = "cancelled"
            else:
                self.run(job)
            self.current = None
            self.finished.append(job.id)
            self.forget()

    def forget(self, keep=256):
        """Finished jobs' records (their images stay in the gallery): a bounded number are kept for polling."""
        done = [j for j in self.jobs.values() if j.state in ("done", "cancelled", "error")]
        for j in done[:-keep]:
            del self.jobs[j.id]

    def run(self, job: Job):
        job.state = "running"
        r = job.resolved
        try:
            for it in range(job.request.n_iter):  # A1111's seeds: the next batch starts batch_size further on
                made = self.pipe(dataclasses.replace(r, seed=r.seed + it * r.batch_size), self.progress(job, it))
                for i, im in enumerate(made.images):
                    info = made.infotext(i, self.model)
                    buf = io.BytesIO()
                    to_pil(im).save(buf, format="PNG", pnginfo=png_info(info))
                    job.images.append((buf.getvalue(), info))
                    self.gallery.append((next(self.gallery_ids), buf.getvalue(), info))
            job.state = "done"
        except Cancelled:
            job.state = "cancelled"
        except (ValueError, RuntimeError) as e:  # what the pipeline refuses, said in one line
            job.state, job.error = "error", str(e).splitlines()[0] if str(e) else type(e).__name__
        job.step = job.total if job.state == "done" else job.step

    def progress(self, job: Job, iteration: int):
        every = self.limits.preview_every

        def callback(i, t, x, x0):
            if job.cancel:
                raise Cancelled()
            job.step = iteration * job.request.steps + min(i + 1, job.request.steps)
            if (i + 1) % every == 0:
                job.preview = self.preview(x0[0])
        return callback

    def preview(self, z: torch.Tensor) -> bytes:
        """The predicted x_0 as a small PNG, as cheaply as the model allows (Pipeline.preview)."""
        buf = io.BytesIO()
        to_pil(self.pipe.preview(z)).save(buf, format="PNG")
        return buf.getvalue()

    def status(self, job: Job) -> dict:
        return {"id": job.id, "state": job.state, "position": self.position(job), "step": job.step,
                "total": job.total, "error": job.error, "queue": len(self.queue),
                "preview": _b64(job.preview) if job.preview and job.state == "running" else None,
                "images": [g for g, (png, info) in enumerate(job.images)] if job.state == "done" else []}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class KeyCheck:
    """Every request but the page itself must carry the key (X-API-Key, or Authorization: Bearer). A plain ASGI
    middleware: Starlette's BaseHTTPMiddleware would hide a client's disconnect from the endpoints."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/":
            headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
            given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")
            if given != self.key:
                from fastapi.responses import JSONResponse

                response = JSONResponse({"detail": "missing or wrong API key: send it in an X-API-Key header"}, 401)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(pipe: Pipeline, model: str, limits: Limits | None = None, api_key: str | None = None,
               controlnet_dirs=()):
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    server = Server(pipe, model, limits, controlnet_dirs)
    app = FastAPI(title="nanosd", docs_url=None, redoc_url=None)
    app.state.server = server

    if api_key is not None:
        app.add_middleware(KeyCheck, key=api_key)

    @app.exception_handler(Refused)
    async def refused(request, e: Refused):
        return JSONResponse({"detail": str(e)}, 400)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse({"detail": f"{where}: {first.get('msg', 'invalid request')}".strip(": ")}, 422)

    async def finish(job: Job, request: Request) -> Job:
        """Wait for a job; a client that goes away cancels it."""
        while job.state in ("queued", "running"):
            if await request.is_disconnected():
                job.cancel = True
                raise HTTPException(499, "client disconnected")
            await asyncio.sleep(0.05)
        if job.state == "error":
            raise HTTPException(400, job.error)
        if job.state == "cancelled":
            raise HTTPException(409, "interrupted")
        return job

    def a1111_response(job: Job) -> dict:
        r, done = job.request, job.resolved
        infos = [info for _, info in job.images]
        info = {"prompt": r.prompt, "negative_prompt": r.negative_prompt, "seed": done.seed,
                "all_seeds": [done.seed + i // r.batch_size * r.batch_size for i in range(len(infos))],  # one per batch
                "sampler_name": done.sampler.a1111, "steps": r.steps, "cfg_scale": r.cfg_scale,
                "width": done.width, "height": done.height, "infotexts": infos}
        return {"images": [_b64(png) for png, _ in job.images], "parameters": r.model_dump(exclude={"init_images", "mask", "alwayson_scripts"}),
                "info": json.dumps(info)}

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(body: Txt2Img, request: Request):
        return a1111_response(await finish(server.submit(body, "txt2img"), request))

    @app.post("/sdapi/v1/img2img")
    async def img2img(body: Img2Img, request: Request):
        return a1111_response(await finish(server.submit(body, "img2img"), request))

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return [{"name": s.a1111, "aliases": [s.name], "options": {}} for s in SAMPLERS.values()]

    @app.get("/sdapi/v1/loras")
    async def loras():  # as A1111 lists them: the files prompt tags <lora:NAME:W> can name
        return [{"name": f.stem, "alias": f.stem, "path": str(f), "metadata": {}} for f in adapters.files(pipe.lora_dirs)]

    @app.get("/sdapi/v1/embeddings")
    async def embeddings():  # as A1111 answers: the embeddings loaded, by name
        return {"loaded": pipe.embeddings, "skipped": {}}

    @app.get("/controlnet/model_list")
    async def controlnet_models():  # as A1111's ControlNet extension names them: "stem [hash]"
        from .adapters import short_hash

        return {"model_list": [f"{f.stem} [{short_hash(f)[:8]}]" if f.is_file() else f.name
                               for f in server.controlnet_files()]}

    @app.get("/controlnet/module_list")
    async def controlnet_modules():
        from .preprocess import A1111_MODULES

        return {"module_list": list(A1111_MODULES)}

    @app.get("/sdapi/v1/progress")
    async def progress():
        job = server.current
        frac = job.step / job.total if job and job.total else 0.0
        return {"progress": frac, "eta_relative": 0.0,
                "state": {"interrupted": bool(job and job.cancel), "job_count": len(server.queue) + (job is not None),
                          "sampling_step": job.step if job else 0, "sampling_steps": job.total if job else 0},
                "current_image": _b64(job.preview) if job and job.preview else None, "textinfo": None}

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        if server.current is not None:
            server.current.cancel = True
        return {}

    # --- for the page: submit, poll, cancel, gallery ---
    @app.post("/api/jobs")
    async def submit(request: Request):
        """The page's requests, A1111-shaped: with init_images an img2img (with a mask, an inpainting)."""
        from pydantic import ValidationError

        try:
            body = await request.json()
        except ValueError:
            raise Refused("the body is not JSON") from None
        if not isinstance(body, dict):
            raise Refused("the body must be a JSON object")
        kind = "img2img" if body.get("init_images") else "txt2img"
        try:
            parsed = (Img2Img if kind == "img2img" else Txt2Img).model_validate(body)
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        return server.status(server.submit(parsed, kind))

    @app.get("/api/jobs/{job_id}")
    async def job_status(job_id: int):
        if job_id not in server.jobs:
            raise HTTPException(404, f"no job {job_id}")
        return server.status(server.jobs[job_id])

    @app.post("/api/jobs/{job_id}/cancel")
    async def cancel(job_id: int):
        if job_id not in server.jobs:
            raise HTTPException(404, f"no job {job_id}")
        server.jobs[job_id].cancel = True
        return server.status(server.jobs[job_id])

    @app.get("/api/gallery")
    async def gallery():
        return [{"id": i, "url": f"/api/gallery/{i}.png", "parameters": info} for i, _, info in reversed(server.gallery)]

    @app.get("/api/gallery/{image_id}.png")
    async def gallery_image(image_id: int):
        for i, png, _ in server.gallery:
            if i == image_id:
                return Response(png, media_type="image/png",
                                headers={"Content-Disposition": f'attachment; filename="nanosd-{i:05d}.png"'})
        raise HTTPException(404, f"no image {image_id}")

    @app.get("/api/model")
    async def model_info():
        return {"model": model, "size": pipe.cfg.data.size, "factor": pipe.factor, "min_side": server.min_side,
                "max_side": server.limits.max_side, "prompted": pipe.prompted,
                "sampler": sampler(pipe.cfg.sample.sampler).a1111, "steps": pipe.cfg.sample.steps,
                "cfg_scale": pipe.cfg.condition.guidance if pipe.cfg.condition else 1.0}

    page = (Path(__file__).parent / "index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    return app


def serve(model: str, host="127.0.0.1", port=7860, api_key=None, limits: Limits | None = None, family=None,
          prediction=None, config=None, loras=(), lora_dirs=(), embedding_dirs=(), controlnet_dirs=()):
    import uvicorn

    from .adapters import setup
    from .pipeline import load

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        raise ValueError(f"--host {host} opens the server to other machines: give --api-key KEY as well")
    pipe = load(model, family=family, prediction=prediction, config=config)
    setup(pipe, loras, lora_dirs, embedding_dirs=embedding_dirs)
    name = Path(model).stem if Path(model).is_file() else Path(model).name
    for d in controlnet_dirs:
        if not Path(d).is_dir():
            raise FileNotFoundError(f"--controlnet-dir {d} is not a folder")
    uvicorn.run(create_app(pipe, name, limits, api_key, controlnet_dirs), host=host, port=port, log_level="warning")
