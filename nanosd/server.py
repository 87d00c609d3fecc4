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
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, model_validator

from . import adapters
from .adapters import file_hash
from .images import fit, png_info, save_png, to_pil
from .pipeline import Pipeline, extend_canvas
from .request import FILLS, UPSCALERS, Hires, Request, parse_infotext
from .samplers import SAMPLERS, SCHEDULE_TYPES, sampler


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


ANY = object()  # any value: the field only matters to something nanosd does not have (pix2pix's image cfg)
# A1111's request fields that nanosd has no use for, with the values that ask for nothing (webuiapi sends them all,
# with these values): accepted at those values, refused by name at any other
INERT = {"restore_faces": (False, None), "tiling": (False, None), "do_not_save_samples": (False, True, None),
         "do_not_save_grid": (False, True, None), "s_churn": (0, None), "s_tmin": (0, None),
         "s_tmax": (0, None, float("inf")), "s_noise": (1, None), "s_min_uncond": (0, None), "script_name": (None, ""),
         "script_args": ([], None), "firstphase_width": (0, None), "firstphase_height": (0, None),
         "hr_checkpoint_name": (None, "", "Use same checkpoint"), "hr_sampler_name": (None, "", "Use same sampler"),
         "hr_scheduler": (None, "", "Use same scheduler"), "hr_prompt": ("", None), "hr_negative_prompt": ("", None),
         "refiner_checkpoint": (None, "", "None"), "refiner_switch_at": (None, 0, 1), "disable_extra_networks": (False, None),
         "comments": (None, {}), "force_task_id": (None,), "infotext": (None, ""), "sampler_index": ANY,
         "override_settings_restore_afterwards": (True, None), "initial_noise_multiplier": (1, None),
         "image_cfg_scale": ANY, "include_init_images": (False, None), "latent_mask": (None,), "mask_round": (True, None)}


class Txt2Img(BaseModel):
    """A1111's /sdapi/v1/txt2img: every field it has is honoured, inert at the value that asks for nothing (INERT),
    or refused by name; an unknown field is refused."""
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field("", max_length=20_000)
    negative_prompt: str = Field("", max_length=20_000)
    styles: list[str] = Field(default_factory=list)  # A1111's saved styles: nanosd has none (said in the info)
    steps: int = 20
    sampler_name: str | None = None
    scheduler: str | None = None  # A1111 1.9+'s schedule type ("Automatic": the sampler's own)
    cfg_scale: float = 7.0
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_w: int = 0
    seed_resize_from_h: int = 0
    width: int | None = None
    height: int | None = None
    batch_size: int = 1
    n_iter: int = 1
    eta: float | None = None
    clip_skip: int | None = None  # nanosd's; A1111 takes it as the option CLIP_stop_at_last_layers
    denoising_strength: float | None = None  # txt2img: the hires fix's (0.7)
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str | None = "Latent"
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    override_settings: dict = Field(default_factory=dict)  # options for this request (GET /sdapi/v1/options)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict = Field(default_factory=dict)  # A1111's extensions' arguments: ControlNet's here
    # nanosd's speed options (Request's; token merging is A1111's option token_merging_ratio)
    fast: bool = False
    cfg_end: float | None = None
    cache_interval: int | None = None
    cache_depth: int | None = None
    decoder: Literal["full", "tiny"] | None = None

    @model_validator(mode="before")
    @classmethod
    def inert(cls, data):
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("sampler_index") and not data.get("sampler_name"):  # A1111's older name for it
            data["sampler_name"] = data["sampler_index"]
        for name, ok in INERT.items():
            if name in data and ok is not ANY and data[name] not in ok:
                raise ValueError(f"{name} {data[name]!r}: nanosd has no use for it; send {ok[0]!r} or leave it out")
            data.pop(name, None)
        return data


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
    hr_option: Literal["Both", "Low res only", "High res only"] = "Both"  # the hires fix's passes it acts in


class Img2Img(Txt2Img):
    init_images: list[str] = Field(min_length=1, max_length=1)
    resize_mode: int = 0  # A1111's: 0 just resize, 1 crop and resize, 2 resize and fill
    mask: str | None = None
    denoising_strength: float = 0.75
    # inpainting (with a mask; A1111 reads them only then): see Request
    mask_blur: int | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    inpainting_fill: int = 0  # 0 fill, 1 original, 2 latent noise, 3 latent nothing
    inpaint_full_res: bool = True  # A1111's API default: only masked
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    outpaint: list[int] | None = Field(None, min_length=4, max_length=4)  # the page's: px added left, right, up, down


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
    pipe: Pipeline | None = None  # the checkpoint it runs on
    model: tuple = ("", "")  # that checkpoint's name and hash, for the infotext


OPTIONS = {"sd_model_checkpoint": None, "CLIP_stop_at_last_layers": 1, "randn_source": "GPU",
           "eta_noise_seed_delta": 0, "sd_vae": "Automatic", "samples_format": "png",
           "token_merging_ratio": 0.0}  # A1111's, that nanosd has
MODEL_FILES = (".safetensors", ".ckpt")


class Server:
    def __init__(self, pipe: Pipeline, model: str, limits: Limits | None = None, controlnet_dirs=(), models_dir=None,
                 loader=None, model_path=None, outdir="outputs"):
        self.limits = limits or Limits()
        self.controlnet_dirs, self.controlnets = list(controlnet_dirs), {}  # stem -> ControlNet, loaded once
        self.models_dir, self.loader, self.outdir = Path(models_dir) if models_dir else None, loader, Path(outdir)
        # the checkpoints: the one served, and those of --models-dir (A1111's sd_model_checkpoint switches among them),
        # each known by its file (or folder) name; the options hold the current one's
        self.served = (model, Path(model_path) if model_path else None)
        self.options = dict(OPTIONS, sd_model_checkpoint=model)
        self.pipes = {model: pipe}  # the current checkpoint's pipeline, and that of the last one a request asked for
        if self.served[1] and self.served[1].is_file():
            file_hash(self.served[1])  # hashed once, as A1111 hashes the checkpoint it loads
        self.load_lock = threading.Lock()
        self.jobs: dict[int, Job] = {}
        self.queue: deque[Job] = deque()
        self.current: Job | None = None
        self.gallery: deque = deque(maxlen=self.limits.gallery)  # (id, png bytes, infotext)
        self.finished: deque = deque(maxlen=1024)  # job ids in the order they ended
        self.ids, self.gallery_ids = itertools.count(1), itertools.count(1)
        self.wake = threading.Condition()
        threading.Thread(target=self.worker, daemon=True).start()

    @property
    def pipe(self) -> Pipeline:
        return self.pipes[self.options["sd_model_checkpoint"]]

    # --- checkpoints and options (A1111's sd-models, options, override_settings) ---
    def checkpoints(self) -> dict:
        """name -> (title, path or None) for every checkpoint the server can switch to. A1111's title is
        "name.safetensors [hash]", the first 10 hex digits of the file's SHA-256, known once the file was loaded
        (hashing every file of a folder of 7 GB checkpoints would take minutes); before that, the file name."""
        found = {self.served[0]: self.served[1]}
        if self.models_dir and self.models_dir.is_dir():
            found.update({f.name: f for f in sorted(self.models_dir.iterdir())
                          if f.suffix in MODEL_FILES or (f / "config.toml").is_file() or (f / "unet").is_dir()})
        out = {}
        for name, path in found.items():
            h = file_hash(path, compute=False) if path and path.is_file() else None
            out[name] = (f"{path.name} [{h[:10]}]" if h else path.name if path else name, path)
        return out

    def path_of(self, key: str):
        """A checkpoint's file or folder (None for a served model given without one), without listing the folder."""
        return self.served[1] if key == self.served[0] else self.models_dir / key

    def checkpoint(self, name: str) -> str:
        """The checkpoint `name` names (by its title, file name or stem), or a 400."""
        for key, (title, path) in self.checkpoints().items():
            if name in (key, title, path.stem if path else key, title.split(" [")[0]):
                return key
        raise Refused(f"sd_model_checkpoint {name!r}: no such checkpoint (GET /sdapi/v1/sd-models lists them)")

    def pipe_for(self, key: str) -> Pipeline:
        """The checkpoint's pipeline, loaded (and its file hashed) once; the current one and the last one asked for
        stay loaded."""
        with self.load_lock:
            if key not in self.pipes:
                if self.loader is None:
                    raise Refused(f"sd_model_checkpoint {key!r}: this server was started without --models-dir")
                path = self.path_of(key)
                pipe = self.loader(path)
                if path.is_file():
                    file_hash(path)
                for old in [k for k in self.pipes if k != self.options["sd_model_checkpoint"]]:
                    del self.pipes[old]
                self.pipes[key] = pipe
            return self.pipes[key]

    def settings(self, changes: dict, where="override_settings") -> dict:
        """The options with `changes` applied, each checked (an option nanosd does not have is a 400)."""
        unknown = [k for k in changes if k not in OPTIONS]
        if unknown:
            raise Refused(f"{where}: nanosd has no option {', '.join(map(repr, unknown))} (it has "
                          f"{', '.join(OPTIONS)})")
        out = {**self.options, **changes}
        if "sd_model_checkpoint" in changes:
            out["sd_model_checkpoint"] = self.checkpoint(str(changes["sd_model_checkpoint"]))
        if out["randn_source"] not in ("GPU", "CPU", "NV"):
            raise Refused(f"randn_source {out['randn_source']!r}: one of GPU, CPU, NV")
        for name in ("CLIP_stop_at_last_layers", "eta_noise_seed_delta"):
            if not isinstance(out[name], int) or out[name] < (1 if name.startswith("CLIP") else 0):
                raise Refused(f"{name} {out[name]!r} must be a whole number (Clip skip from 1; ENSD from 0)")
        if isinstance(out["token_merging_ratio"], bool) or not isinstance(out["token_merging_ratio"], (int, float)):
            raise Refused(f"token_merging_ratio {out['token_merging_ratio']!r} must be a number from 0 to 0.75")
        if out["sd_vae"] not in ("Automatic", "None") or out["samples_format"] != "png":
            raise Refused("sd_vae: nanosd uses the checkpoint's own VAE (\"Automatic\"; --vae at load); "
                          "samples_format: png")
        return out

    # --- checking requests at the edge ---
    def check(self, r: Txt2Img, kind: str) -> tuple[Request, Pipeline]:
        """The service's limits, then the pipeline's own validation of the request (the same as the API's and the
        CLI's); anything refused is a 400 naming the field. Requests are seeded as A1111 seeds them."""
        lim = self.limits
        settings = self.settings(r.override_settings)
        pipe = self.pipe_for(settings["sd_model_checkpoint"])
        size = pipe.cfg.data.size
        w, h = (size if v is None else v for v in (r.width, r.height))
        for name, side in (("width", w), ("height", h)):
            if not min(64, size) <= side <= lim.max_side:  # the model's factor: Request.resolve checks it
                raise Refused(f"{name} {side} must be from {min(64, size)} to {lim.max_side}")
        if not 1 <= r.steps <= lim.max_steps:
            raise Refused(f"steps {r.steps} must be from 1 to {lim.max_steps}")
        if not 0 <= r.cfg_scale <= lim.max_cfg:
            raise Refused(f"cfg_scale {r.cfg_scale} must be from 0 to {lim.max_cfg}")
        if not 1 <= r.batch_size * r.n_iter <= lim.max_batch or r.batch_size < 1 or r.n_iter < 1:
            raise Refused(f"batch_size x n_iter must be from 1 to {lim.max_batch}")
        clip_skip = settings["CLIP_stop_at_last_layers"] if r.clip_skip is None else r.clip_skip
        if not 1 <= clip_skip <= 4:
            raise Refused(f"clip_skip {clip_skip} must be from 1 to 4")
        schedule = None if (r.scheduler or "automatic").lower() == "automatic" else r.scheduler
        try:
            spec = sampler(r.sampler_name or pipe.cfg.sample.sampler, schedule)
        except ValueError as e:
            raise Refused(str(e)) from None
        # A1111 reads eta only where the sampler has one; webuiapi sends its default, 1, with every request
        eta = None if r.eta == 1.0 and "eta" not in spec.options else r.eta
        hires = None
        if r.enable_hr and kind == "img2img":
            raise Refused("enable_hr: the hires fix is txt2img's; upscale the image and send it at its new size")
        if r.enable_hr:
            if r.hr_upscaler in (None, "None"):
                raise Refused("hr_upscaler None: give one (GET /sdapi/v1/upscalers, /sdapi/v1/latent-upscale-modes)")
            hires = Hires(r.hr_scale, r.hr_upscaler, r.hr_second_pass_steps, r.denoising_strength or 0.7,
                          r.hr_resize_x, r.hr_resize_y)
        request = Request(r.prompt or None, r.negative_prompt or None, steps=r.steps, sampler=r.sampler_name,
                          scheduler=schedule, cfg_scale=r.cfg_scale, seed=r.seed if r.seed >= 0 else None,
                          height=h, width=w, batch_size=r.batch_size, eta=eta, clip_skip=clip_skip, output="tensor",
                          control=self.controls(r.alwayson_scripts, hires=r.enable_hr),
                          noise="a1111", rng=settings["randn_source"],
                          eta_noise_seed_delta=settings["eta_noise_seed_delta"],
                          subseed=r.subseed if r.subseed >= 0 else None, subseed_strength=r.subseed_strength,
                          seed_resize_from_w=max(r.seed_resize_from_w, 0), seed_resize_from_h=max(r.seed_resize_from_h, 0),
                          hires=hires, fast=r.fast, cfg_end=r.cfg_end, cache_interval=r.cache_interval,
                          cache_depth=r.cache_depth, decoder=r.decoder,
                          tome=settings["token_merging_ratio"] or (None if r.fast else 0.0))
        if kind == "img2img":
            if r.resize_mode not in (0, 1, 2):
                raise Refused(f"resize_mode {r.resize_mode}: nanosd has 0 (just resize), 1 (crop and resize), "
                              "2 (resize and fill)")
            image = self.decode_image(r.init_images[0], "init image").convert("RGB")
            if r.outpaint:  # a larger canvas, its new area the mask: inpainted at the canvas's size
                if r.mask:
                    raise Refused("outpaint makes its own mask: give no mask")
                try:
                    image, mask = extend_canvas(image, *r.outpaint, pipe.factor)
                except ValueError as e:
                    raise Refused(str(e)) from None
                r = r.model_copy(update={"inpaint_full_res": False})  # the whole canvas
                request.width, request.height = w, h = image.size
                if max(w, h) > lim.max_side:
                    raise Refused(f"the outpainted canvas {w}x{h} is over {lim.max_side} px")
            request.init = fit(image, w, h, ("just", "crop", "fill")[r.resize_mode])
            request.strength = r.denoising_strength
            if r.mask or r.outpaint:
                blur = (r.mask_blur_x, r.mask_blur_y) if r.mask_blur is None else (r.mask_blur,) * 2
                if blur[0] != blur[1]:
                    raise Refused(f"mask_blur_x {blur[0]} and mask_blur_y {blur[1]}: nanosd blurs both ways alike")
                if r.inpainting_fill not in (0, 1, 2, 3):
                    raise Refused(f"inpainting_fill {r.inpainting_fill}: 0 fill, 1 original, 2 latent noise, "
                                  "3 latent nothing")
                request.mask = mask if r.outpaint else fit(self.decode_image(r.mask, "mask").convert("L"), w, h,
                                                           ("just", "crop", "fill")[r.resize_mode])
                request.mask_blur, request.inpainting_fill = blur[0], FILLS[r.inpainting_fill]
                request.inpaint_full_res, request.inpaint_full_res_padding = r.inpaint_full_res, r.inpaint_full_res_padding
                request.inpainting_mask_invert = bool(r.inpainting_mask_invert)
        try:
            return request.resolve(pipe), pipe
        except ValueError as e:
            raise Refused(str(e)) from None

    def controls(self, scripts: dict, hires=False) -> list:
        """ControlNet units (A1111's extension's request shape) as Controls; any other script is refused. With the
        hires fix a unit acts in both passes."""
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
            if hires and u.hr_option != "Both":
                raise Refused(f"{where}: hr_option {u.hr_option!r}: nanosd's units act in both passes of the hires "
                              "fix (\"Both\")")
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
        resolved, pipe = self.check(request, kind)
        key = next(k for k, p in self.pipes.items() if p is pipe)
        path = self.path_of(key)
        name = path.stem if path and path.is_file() else key
        with self.wake:
            if len(self.queue) >= self.limits.max_queue:
                raise Refused(f"the queue is full ({self.limits.max_queue} waiting): try again later")
            hires = resolved.hires.steps or resolved.steps if resolved.hires else 0
            job = Job(next(self.ids), request, kind, total=(resolved.steps + hires) * request.n_iter,
                      resolved=resolved, pipe=pipe, model=(name, file_hash(path)[:10] if path and path.is_file() else ""))
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
                step = r.batch_size * (0 if r.subseed_strength else 1)  # a variation batch keeps the seed
                made = job.pipe(dataclasses.replace(r, seed=r.seed + it * step, subseed=(r.subseed or 0) +
                                                    it * r.batch_size if r.subseed is not None else None),
                                self.progress(job))
                for i, im in enumerate(made.images):
                    info = made.infotext(i, *job.model)
                    buf = io.BytesIO()
                    to_pil(im).save(buf, format="PNG", pnginfo=png_info(info))
                    job.images.append((buf.getvalue(), info))
                    self.gallery.append((next(self.gallery_ids), buf.getvalue(), info))
                    if job.request.save_images:  # as A1111 files them: outputs/txt2img-images/DATE/NNNNN-SEED.png
                        folder = self.outdir / f"{job.kind}-images" / time.strftime("%Y-%m-%d")
                        folder.mkdir(parents=True, exist_ok=True)
                        seed = made.request.image_seeds()[i][0]
                        save_png(to_pil(im), folder / f"{len(list(folder.glob('*.png'))):05d}-{seed}.png", info)
            job.state = "done"
        except Cancelled:
            job.state = "cancelled"
        except (ValueError, RuntimeError) as e:  # what the pipeline refuses, said in one line
            job.state, job.error = "error", str(e).splitlines()[0] if str(e) else type(e).__name__
        job.step = job.total if job.state == "done" else job.step

    def progress(self, job: Job):
        every = self.limits.preview_every

        def callback(i, t, x, x0):
            if job.cancel:
                raise Cancelled()
            job.step = min(job.step + 1, job.total)  # every step of every pass (the hires fix has two)
            if (i + 1) % every == 0:
                job.preview = self.preview(job.pipe, x0[0])
        return callback

    @staticmethod
    def preview(pipe, z: torch.Tensor) -> bytes:
        """The predicted x_0 as a small PNG, as cheaply as the model allows (Pipeline.preview)."""
        buf = io.BytesIO()
        to_pil(pipe.preview(z)).save(buf, format="PNG")
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
               controlnet_dirs=(), models_dir=None, loader=None, model_path=None, outdir="outputs"):
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    server = Server(pipe, model, limits, controlnet_dirs, models_dir, loader, model_path, outdir)
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
        seeds = [s for it in range(r.n_iter) for s in dataclasses.replace(
            done, seed=done.seed + it * done.batch_size * (0 if done.subseed_strength else 1),
            subseed=(done.subseed or 0) + it * done.batch_size).image_seeds()][:len(infos)]
        info = {"prompt": r.prompt, "all_prompts": [r.prompt] * len(infos), "negative_prompt": r.negative_prompt,
                "all_negative_prompts": [r.negative_prompt] * len(infos), "seed": done.seed,
                "all_seeds": [s for s, _ in seeds], "subseed": done.subseed if done.subseed is not None else -1,
                "all_subseeds": [s for _, s in seeds], "subseed_strength": done.subseed_strength,
                "sampler_name": done.sampler.a1111, "scheduler": SCHEDULE_TYPES[done.sampler.schedule],
                "steps": r.steps, "cfg_scale": r.cfg_scale, "width": done.width, "height": done.height,
                "batch_size": r.batch_size, "seed_resize_from_w": done.seed_resize_from_w,
                "seed_resize_from_h": done.seed_resize_from_h, "denoising_strength": r.denoising_strength,
                "clip_skip": done.clip_skip, "sd_model_name": job.model[0], "sd_model_hash": job.model[1] or None,
                "infotexts": infos, "styles": r.styles, "index_of_first_image": 0, "version": "nanosd",
                # A1111 applies saved styles; nanosd has none, so they are not applied: said, not dropped
                **({"comments": {"styles": f"nanosd has no saved styles: {', '.join(r.styles)} not applied"}}
                   if r.styles else {})}
        return {"images": [_b64(png) for png, _ in job.images] if r.send_images else [],
                "parameters": r.model_dump(exclude={"init_images", "mask", "alwayson_scripts"}),
                "info": json.dumps(info)}

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(body: Txt2Img, request: Request):
        return a1111_response(await finish(await asyncio.to_thread(server.submit, body, "txt2img"), request))

    @app.post("/sdapi/v1/img2img")
    async def img2img(body: Img2Img, request: Request):
        return a1111_response(await finish(await asyncio.to_thread(server.submit, body, "img2img"), request))

    @app.get("/sdapi/v1/samplers")
    async def samplers():  # as A1111 1.9+ lists them: each with its default schedule type
        return [{"name": s.a1111, "aliases": [s.name], "options": {"scheduler": s.k} if s.k == "karras" else {}}
                for s in SAMPLERS.values()]

    @app.get("/sdapi/v1/schedulers")
    async def schedulers():
        return [{"name": k, "label": label, "aliases": None, "default_rho": 7.0 if k == "karras" else -1,
                 "need_inner_model": k in ("uniform", "sgm_uniform", "simple", "normal", "ddim")}
                for k, label in SCHEDULE_TYPES.items()]

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        def listing():
            return [{"title": title, "model_name": path.stem if path and path.is_file() else key,
                     "hash": title.split(" [")[1][:-1] if " [" in title else None,
                     "sha256": file_hash(path, compute=False) if path and path.is_file() else None,
                     "filename": str(path) if path else key, "config": None}
                    for key, (title, path) in server.checkpoints().items()]
        return await asyncio.to_thread(listing)

    @app.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints():  # the folder is read on every listing: nothing is stale
        return None

    @app.get("/sdapi/v1/options")
    async def get_options():  # the checkpoint by its title, as A1111 names it
        return {**server.options, "sd_model_checkpoint": server.checkpoints()[server.options["sd_model_checkpoint"]][0]}

    async def json_object(request: Request, what: str) -> dict:
        try:
            body = await request.json()
        except ValueError:
            raise Refused("the body is not JSON") from None
        if not isinstance(body, dict):
            raise Refused(f"the body must be a JSON object{what}")
        return body

    @app.post("/sdapi/v1/options")
    async def set_options(request: Request):
        new = server.settings(await json_object(request, " of options"), "options")
        await asyncio.to_thread(server.pipe_for, new["sd_model_checkpoint"])  # loaded before it becomes current
        server.options = new
        return None

    @app.get("/sdapi/v1/scripts")
    async def scripts():  # the scripts a request may name: ControlNet's, as an always-on script
        names = ["controlnet"] if server.controlnet_dirs else []
        return {"txt2img": names, "img2img": names}

    @app.get("/sdapi/v1/sd-vae")
    async def sd_vae():  # the checkpoint's own VAE only ("Automatic"); another is chosen at load (--vae)
        return []

    @app.get("/sdapi/v1/upscalers")
    async def upscalers():  # the hires fix's pixel upscalers (the latent ones: /sdapi/v1/latent-upscale-modes)
        return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
                for name in ["None"] + [u for u in UPSCALERS if not u.startswith("Latent")]]

    @app.get("/sdapi/v1/latent-upscale-modes")
    async def latent_upscale_modes():
        return [{"name": u} for u in UPSCALERS if u.startswith("Latent")]

    @app.post("/sdapi/v1/png-info")
    async def png_info_(request: Request):
        body = await json_object(request, ": {\"image\": base64 PNG}")
        if not isinstance(body.get("image"), str):
            raise Refused("give {\"image\": base64 PNG}")
        image = server.decode_image(body["image"], "image")
        items = {k: v for k, v in image.info.items() if isinstance(v, str)}
        text = items.pop("parameters", "")
        parsed = parse_infotext(text) if text else {}
        if "Size" in parsed:  # as A1111 splits it
            parsed["Size-1"], parsed["Size-2"] = parsed["Size"].split("x")
        return {"info": text, "items": items, "parameters": parsed}

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

        body = await json_object(request, "")
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
        p = server.pipe
        return {"model": server.checkpoints()[server.options["sd_model_checkpoint"]][0], "size": p.cfg.data.size, "factor": p.factor,
                "min_side": min(64, p.cfg.data.size), "max_side": server.limits.max_side, "prompted": p.prompted,
                "sampler": sampler(p.cfg.sample.sampler).a1111, "steps": p.cfg.sample.steps,
                "cfg_scale": p.cfg.condition.guidance if p.cfg.condition else 1.0,
                "samplers": [s.a1111 for s in SAMPLERS.values()], "schedulers": list(SCHEDULE_TYPES.values()),
                "upscalers": list(UPSCALERS)}

    page = (Path(__file__).parent / "index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    return app


def serve(model: str, host="127.0.0.1", port=7860, api_key=None, limits: Limits | None = None, family=None,
          prediction=None, config=None, loras=(), lora_dirs=(), embedding_dirs=(), controlnet_dirs=(),
          models_dir=None, outdir="outputs", precision="auto", threads=None, tiny_decoder=None, device=None):
    import uvicorn

    from .adapters import setup
    from .pipeline import load

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        raise ValueError(f"--host {host} opens the server to other machines: give --api-key KEY as well")
    def loader(path, **kw):  # a checkpoint of --models-dir, as the served one was loaded (its LoRAs and embeddings)
        pipe = load(path, precision, prediction=prediction, threads=threads, device=device, **kw)
        setup(pipe, loras, lora_dirs, embedding_dirs=embedding_dirs)
        return pipe

    for d in list(controlnet_dirs) + ([models_dir] if models_dir else []):
        if not Path(d).is_dir():
            raise FileNotFoundError(f"{d} is not a folder")
    pipe = loader(model, family=family, config=config)
    if tiny_decoder:  # made for the served model's VAE (a model switched to from --models-dir decodes in full)
        pipe.load_tiny_decoder(tiny_decoder)
    name = Path(model).name  # as --models-dir names its files: the same file is one checkpoint
    uvicorn.run(create_app(pipe, name, limits, api_key, controlnet_dirs, models_dir, loader, model, outdir),
                host=host, port=port, log_level="warning")
