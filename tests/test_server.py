"""nanosd serve: the A1111-shaped API, the queue, validation at the edge, the key, and the page in headless Chromium."""
import base64
import http.client
import io
import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from PIL import Image

from nanosd import load
from nanosd.condition import ConditionConfig
from nanosd.data import ImageSet
from nanosd.server import Limits, create_app
from nanosd.text import CLIPTextConfig
from nanosd.recipes import train


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny text-conditioned model (a CLIP text encoder trained with it), trained for one step."""
    from nanosd.config import load_config

    tmp = tmp_path_factory.mktemp("serve")
    cfg = load_config(values={
        "data": {"size": 8},
        "unet": {"model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1], "num_heads": 2},
        "train": {"batch_size": 8, "steps": 1, "sample_every": 0},
        "sample": {"steps": 4, "n": 2},
        "condition": {"encoder": "clip", "clip": {"width": 32, "layers": 1, "heads": 2, "max_length": 16}},
    })
    data = ImageSet(torch.rand(16, 1, 8, 8) * 2 - 1, torch.arange(16) % 2, ["cat", "dog"],
                    [[c] for c in ["a cat", "a dog"] * 8])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("nanosd.recipes.load_dataset", lambda *a, **k: data)
        return train(cfg, tmp / "run")


def start(app):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    for _ in range(200):
        if server.started:
            return f"http://127.0.0.1:{port}", server
        time.sleep(0.05)
    raise RuntimeError("server did not start")


@pytest.fixture(scope="module")
def served(model):
    app = create_app(load(model), "tiny", Limits(max_side=64, max_batch=4, max_steps=50, max_queue=32))
    url, server = start(app)
    yield url, app.state.server
    server.should_exit = True


def call(url, path, body=None, key=None, raw=None, timeout=60):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json",
                                                                  **({"X-API-Key": key} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def png_b64(size=8, mode="L", fmt="PNG", value=128):
    buf = io.BytesIO()
    Image.new(mode, (size, size), value).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def test_a1111_requests(served):
    url, _ = served
    status, out = call(url, "/sdapi/v1/txt2img", {"prompt": "a cat", "negative_prompt": "a dog", "steps": 3,
                                                  "sampler_name": "Euler a", "cfg_scale": 3, "seed": 5, "width": 8,
                                                  "height": 8, "batch_size": 2, "override_settings": {}})
    assert status == 200 and len(out["images"]) == 2, out
    im = Image.open(io.BytesIO(base64.b64decode(out["images"][1])))
    assert im.size == (8, 8) and im.text["parameters"].splitlines()[:2] == ["a cat", "Negative prompt: a dog"]
    info = json.loads(out["info"])
    assert info["seed"] == 5 and len(info["infotexts"]) == 2 and "Sampler: Euler a" in info["infotexts"][0]
    mask = png_b64(value=255)
    for extra in ({}, {"mask": mask}):  # img2img, then inpainting
        status, out = call(url, "/sdapi/v1/img2img", {"prompt": "a dog", "init_images": [png_b64(mode="RGB")],
                                                      "denoising_strength": 0.5, "steps": 4, "seed": 1, **extra})
        assert status == 200 and len(out["images"]) == 1, out
        assert "Denoising strength: 0.5" in json.loads(out["info"])["infotexts"][0]
    # A1111 1.9+'s schedule field: DPM++ 2M's automatic schedule is Karras there; an unknown one is refused
    body = {"prompt": "a cat", "steps": 3, "seed": 2, "width": 8, "height": 8, "sampler_name": "DPM++ 2M"}
    status, out = call(url, "/sdapi/v1/txt2img", {**body, "scheduler": "Karras"})
    assert status == 200 and "Sampler: DPM++ 2M, Schedule type: Karras" in json.loads(out["info"])["infotexts"][0]
    assert call(url, "/sdapi/v1/txt2img", {**body, "scheduler": "Automatic"})[1]["images"] == out["images"]
    assert call(url, "/sdapi/v1/txt2img", {**body, "scheduler": "Exponential"})[1]["images"] != out["images"]
    for sampler_name, schedule, words in (("DPM++ 2M", "Wobbly", "unknown schedule type"),
                                          ("DDIM", "Karras", "its own timesteps"), ("Euler q", None, "unknown sampler")):
        status, out = call(url, "/sdapi/v1/txt2img", {**body, "sampler_name": sampler_name, "scheduler": schedule})
        assert status == 400 and words in out["detail"], out
    # the speed options: nanosd's fields, and A1111's token merging option
    fast = {**body, "sampler_name": "Euler", "fast": True, "cfg_end": 0.7,
            "override_settings": {"token_merging_ratio": 0.25}}
    status, out = call(url, "/sdapi/v1/txt2img", fast)
    text = json.loads(out["info"])["infotexts"][0]
    assert status == 200 and "CFG end: 0.7, DeepCache interval: 3, DeepCache depth: 1, Token merging ratio: 0.25" \
        in text
    for bad, words in (({"cache_depth": 2}, "give cache_interval > 1 too"), ({"decoder": "tiny"}, "no tiny decoder"),
                       ({"override_settings": {"token_merging_ratio": "half"}}, "token_merging_ratio 'half'"),
                       ({"cfg_end": 1.5}, "cfg_end is the fraction")):
        status, out = call(url, "/sdapi/v1/txt2img", {**body, **bad})
        assert status in (400, 422) and words in json.dumps(out), (bad, out)
    status, samplers = call(url, "/sdapi/v1/samplers")
    assert {"DPM++ 2M", "Euler a", "UniPC"} <= {s["name"] for s in samplers}
    assert call(url, "/sdapi/v1/progress")[1]["state"]["job_count"] == 0
    assert call(url, "/sdapi/v1/interrupt", {})[0] == 200


BAD = [
    ("/sdapi/v1/txt2img", {"prompt": "a cat", "steps": 0}), ("/sdapi/v1/txt2img", {"prompt": "a cat", "steps": 51}),
    ("/sdapi/v1/txt2img", {"prompt": "a cat", "steps": "many"}), ("/sdapi/v1/txt2img", {"prompt": "a cat", "cfg_scale": -1}),
    ("/sdapi/v1/txt2img", {"prompt": "a cat", "cfg_scale": 1e9}), ("/sdapi/v1/txt2img", {"prompt": "a cat", "width": 7}),
    ("/sdapi/v1/txt2img", {"prompt": "a cat", "width": 4096}), ("/sdapi/v1/txt2img", {"prompt": "a cat", "height": 0}),
    ("/sdapi/v1/txt2img", {"prompt": "a cat", "height": -8}), ("/sdapi/v1/txt2img", {"prompt": "a cat", "batch_size": 0}),
    ("/sdapi/v1/txt2img", {"prompt": "a cat", "batch_size": 100}), ("/sdapi/v1/txt2img", {"prompt": "a cat", "n_iter": 0}),
    ("/sdapi/v1/txt2img", {"prompt": "a cat", "batch_size": 4, "n_iter": 4}),
    ("/sdapi/v1/txt2img", {"prompt": "a cat", "sampler_name": "k_lms"}),
    ("/sdapi/v1/txt2img", {"prompt": "a cat", "sampler_name": 7}), ("/sdapi/v1/txt2img", {"prompt": ""}),
    ("/sdapi/v1/txt2img", {"prompt": "   "}), ("/sdapi/v1/txt2img", {"prompt": ["a", "b"]}),
    ("/sdapi/v1/txt2img", {"prompt": "x" * 30_000}), ("/sdapi/v1/txt2img", {"prompt": "a cat", "seed": "lucky"}),
    ("/sdapi/v1/txt2img", {"prompt": "a cat", "clip_skip": 0}), ("/sdapi/v1/txt2img", {"prompt": "a cat", "clip_skip": 12}),
    ("/sdapi/v1/txt2img", {"prompt": "a cat", "width": 8.5}), ("/sdapi/v1/txt2img", [1, 2, 3]),
    ("/sdapi/v1/txt2img", "not json"), ("/sdapi/v1/txt2img", None),
    ("/sdapi/v1/img2img", {"prompt": "a cat"}), ("/sdapi/v1/img2img", {"prompt": "a cat", "init_images": []}),
    ("/sdapi/v1/img2img", {"prompt": "a cat", "init_images": ["not base64!!"]}),
    ("/sdapi/v1/img2img", {"prompt": "a cat", "init_images": [base64.b64encode(b"just text").decode()]}),
    ("/sdapi/v1/img2img", {"prompt": "a cat", "init_images": [png_b64(fmt="GIF")]}),
    ("/sdapi/v1/img2img", {"prompt": "a cat", "init_images": [png_b64(fmt="BMP")]}),
    ("/sdapi/v1/img2img", {"prompt": "a cat", "init_images": ["A" * (9 << 20)]}),
    ("/sdapi/v1/img2img", {"prompt": "a cat", "init_images": [png_b64(size=600)]}),
    ("/sdapi/v1/img2img", {"prompt": "a cat", "init_images": [png_b64()], "denoising_strength": 0}),
    ("/sdapi/v1/img2img", {"prompt": "a cat", "init_images": [png_b64()], "denoising_strength": 1.5}),
    ("/sdapi/v1/img2img", {"prompt": "a cat", "init_images": [png_b64()], "mask": "garbage"}),
    ("/sdapi/v1/img2img", {"prompt": "a cat", "init_images": [png_b64(), png_b64()]}),
    ("/sdapi/v1/img2img", {"prompt": "a cat", "init_images": [7]}),
    ("/api/jobs", {"prompt": "a cat", "steps": -3}), ("/api/jobs", {"prompt": ""}), ("/api/jobs", "[]"),
    ("/api/jobs", {"prompt": "a cat", "init_images": ["%%%"]}), ("/api/jobs", {"prompt": "a cat", "width": 1000}),
    ("/api/jobs/999999", None), ("/api/jobs/999999/cancel", {}), ("/api/jobs/abc", None),
    ("/api/gallery/424242.png", None), ("/sdapi/v1/nothing", {}), ("/sdapi/v1/txt2img?x=1", {"prompt": "a", "steps": 1e6}),
]


def test_fifty_malformed_or_oversized_requests_all_get_4xx(served):
    url, _ = served
    assert len(BAD) >= 50
    for path, body in BAD:
        raw = body.encode() if isinstance(body, str) else None
        status, out = call(url, path, None if raw is not None else body, raw=raw)
        assert 400 <= status < 500, (path, body, status, out)
        assert out is None or "detail" in out, out


def test_twenty_concurrent_requests_complete_in_order_with_memory_bounded(served):
    import resource

    url, server = served
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    results, threads = {}, []
    first = max(server.jobs, default=0)

    def one(i):
        results[i] = call(url, "/sdapi/v1/txt2img", {"prompt": f"a cat {i}", "steps": 3, "seed": i}, timeout=120)

    for i in range(20):
        threads.append(threading.Thread(target=one, args=(i,)))
        threads[-1].start()
        time.sleep(0.01)
    for t in threads:
        t.join()
    assert all(status == 200 and len(out["images"]) == 1 for status, out in results.values())
    ended = [j for j in server.finished if j > first][-20:]
    assert ended == sorted(ended) and len(ended) == 20  # one at a time, first come first served
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB
    assert len(server.gallery) <= server.limits.gallery


def test_a_client_that_disconnects_leaves_no_work_running(served):
    url, server = served
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port))
    conn.request("POST", "/sdapi/v1/txt2img", json.dumps({"prompt": "a cat", "steps": 50, "n_iter": 4, "width": 64, "height": 64}),
                 {"Content-Type": "application/json"})
    for _ in range(100):  # until it runs
        job = max(server.jobs)
        if server.jobs[job].state == "running":
            break
        time.sleep(0.02)
    conn.close()
    for _ in range(200):
        if server.jobs[job].state in ("cancelled", "done"):
            break
        time.sleep(0.05)
    assert server.jobs[job].state == "cancelled" and server.jobs[job].step < 200


def test_other_hosts_need_a_key_and_every_request_carries_it(model):
    from nanosd.server import serve

    with pytest.raises(ValueError, match="--api-key"):
        serve(str(model), host="0.0.0.0")
    url, server = start(create_app(load(model), "tiny", api_key="s3cret"))
    try:
        assert call(url, "/sdapi/v1/samplers")[0] == 401
        assert call(url, "/sdapi/v1/samplers", key="wrong")[0] == 401
        assert call(url, "/sdapi/v1/samplers", key="s3cret")[0] == 200
        with urllib.request.urlopen(url + "/") as r:  # the page itself; its calls send the key
            assert r.status == 200
    finally:
        server.should_exit = True


def test_the_page_in_headless_chromium(served, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium: apt-get install chromium (.ci/run does)")
    from playwright.sync_api import sync_playwright

    url, server = served
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        page.goto(url + "/")
        page.wait_for_function("document.querySelectorAll('#scheduler option').length >= 5")
        n = len(server.gallery)
        page.fill("#prompt", "a (cat:1.2)")
        page.fill("#negative", "a dog")
        page.select_option("#sampler", "DPM++ 2M")
        page.select_option("#scheduler", "Exponential")
        page.fill("#steps", "6")
        page.uncheck("#random")
        page.fill("#seed", "42")
        page.fill("#subseed", "7")
        page.fill("#subseed-strength", "0.25")
        page.fill("#batch", "2")
        page.check("#hires")
        page.fill("#hr-scale", "2")
        page.select_option("#hr-upscaler", "Latent (nearest)")
        page.fill("#hr-steps", "2")
        page.click("#generate")
        page.wait_for_function(f"document.querySelectorAll('#gallery a').length >= {n + 2}", timeout=60_000)
        assert "done" in page.inner_text("#status")
        href = page.get_attribute("#gallery a", "href")
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        # outpainting: an uploaded picture, 8 px added on the right
        Image.new("RGB", (32, 32), (250, 20, 20)).save(tmp_path / "red.png")
        page.check("input[value=outpaint]")
        page.set_input_files("#upload", str(tmp_path / "red.png"))
        page.fill("#out-right", "8")
        page.fill("#batch", "1")
        page.click("#generate")
        page.wait_for_function(f"document.querySelectorAll('#gallery a').length >= {n + 3}", timeout=60_000)
        assert "done" in page.inner_text("#status"), page.inner_text("#error")
        outpainted = page.get_attribute("#gallery a", "href")
        browser.close()
    with urllib.request.urlopen(url + href) as r:
        im = Image.open(io.BytesIO(r.read()))
    params = im.text["parameters"]
    assert params.startswith("a (cat:1.2)\nNegative prompt: a dog\nSteps: 6, Sampler: DPM++ 2M, Schedule type: Exponential")
    # a variation batch: one seed, the variation seed + i (the newest image is the batch's second)
    assert "Seed: 42," in params and "Variation seed: 8," in params and "Variation seed strength: 0.25" in params
    assert "Hires upscale: 2" in params and "Hires upscaler: Latent (nearest)" in params and im.size == (16, 16)
    assert Image.open(tmp_path / "page.png").size[0] >= 1100
    with urllib.request.urlopen(url + outpainted) as r:
        im = Image.open(io.BytesIO(r.read()))
    assert im.size == (40, 32) and "Masked content: fill" in im.text["parameters"]
    red = Image.new("RGB", (1, 1), (250, 20, 20)).convert(im.mode).getpixel((0, 0))  # the model's channels
    assert im.getpixel((0, 4)) == red and im.getpixel((39, 4)) != red, (im.text, list(im.getdata())[:40])  # the original kept, far from the blurred seam


def test_controlnet_units_as_a1111s_extension_takes_them(model, tmp_path):
    """webuiapi's ControlNetUnit (every field it sends) against a ControlNet in --controlnet-dir; the unit changes
    the image, the infotext names it, and units nanosd cannot run are 4xx naming the field."""
    webuiapi = pytest.importorskip("webuiapi")
    from nanosd import ControlNet, save_controlnet

    pipe = load(model)
    torch.manual_seed(0)
    net = ControlNet(pipe.cfg.unet, widths=(16,))  # pixels: no halving
    with torch.no_grad():  # the zero convolutions made to act, and the one-step U-Net's output layer to listen
        pipe.unet.out[2].weight.normal_(0, 0.1)
        for m in [*net.zero_convs, net.middle_block_out, net.input_hint_block[-1:]]:
            for p in m.parameters():
                p.normal_(0, 0.3)
    save_controlnet(net, tmp_path / "control_tiny.safetensors")
    app = create_app(pipe, "tiny", Limits(max_side=64), controlnet_dirs=[tmp_path])
    url, server = start(app)
    try:
        host, port = url.removeprefix("http://").split(":")
        api = webuiapi.WebUIApi(host=host, port=int(port))
        names = api.controlnet_model_list()
        assert len(names) == 1 and names[0].startswith("control_tiny [")
        edges = Image.new("RGB", (8, 8))
        edges.paste((255, 255, 255), (2, 2, 6, 6))
        kw = dict(prompt="a cat", steps=3, seed=3, width=8, height=8, cfg_scale=3, sampler_name="DDIM")  # webuiapi: eta 1
        plain = api.txt2img(**kw)
        unit = webuiapi.ControlNetUnit(image=edges, module="canny", model=names[0], weight=0.9, control_mode=1,
                                       guidance_end=0.8, pixel_perfect=True)
        controlled = api.txt2img(controlnet_units=[unit], **kw)
        a, b = (torch.frombuffer(bytearray(r.image.convert("L").tobytes()), dtype=torch.uint8).float()
                for r in (plain, controlled))
        assert (a - b).abs().max() > 10
        info = controlled.info["infotexts"][0]
        assert 'ControlNet 0: "Module: canny, Model: control_tiny [' in info and "Weight: 0.9" in info
        assert "Control Mode: My prompt is more important" in info and "Guidance End: 0.8" in info
        # webuiapi's defaults (thresholds 64, processor_res 512, an empty mask) on a module that reads none of them
        plain_unit = {**webuiapi.ControlNetUnit(image=edges, model=names[0]).to_dict(), "mask": png_b64(value=0)}
        status, out = call(url, "/sdapi/v1/txt2img", {**kw, "alwayson_scripts": {"controlnet": {"args": [plain_unit]}}})
        assert status == 200 and "Module: none" in json.loads(out["info"])["infotexts"][0], out
        off = webuiapi.ControlNetUnit(image=edges, model=names[0], enabled=False)
        assert api.txt2img(controlnet_units=[off], **kw).image.tobytes() == plain.image.tobytes()
        bad_units = [({"model": "nope"}, "no ControlNet 'nope'"), ({"control_mode": 7}, "control_mode 7"),
                     ({"module": "depth_midas"}, "module 'depth_midas'"), ({"strength": 2}, "strength"),
                     ({"guidance_start": 0.9, "guidance_end": 0.1}, "start 0.9 and end 0.1"),
                     ({"mask": png_b64(value=255)}, "the canny control reads no mask")]
        for change, message in bad_units:
            body = {**kw, "alwayson_scripts": {"controlnet": {"args": [{**unit.to_dict(), **change}]}}}
            status, out = call(url, "/sdapi/v1/txt2img", body)
            assert status == 400 and message in out["detail"], (change, out)
        status, out = call(url, "/sdapi/v1/txt2img", {**kw, "alwayson_scripts": {"adetailer": {"args": []}}})
        assert status == 400 and "adetailer" in out["detail"]
        for script in ([], {"args": 3}, {"args": [{"image": {"mask": "x"}, "model": names[0]}]}):
            status, out = call(url, "/sdapi/v1/txt2img", {**kw, "alwayson_scripts": {"controlnet": script}})
            assert status == 400, (script, out)
    finally:
        server.should_exit = True


def test_webuiapi_client_every_call_answers_as_a1111s(model, tmp_path):
    """webuiapi (A1111's Python client) sends every field A1111 has, at its defaults: each call answers."""
    webuiapi = pytest.importorskip("webuiapi")
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(model, models / "other")
    app = create_app(load(model), "tiny", Limits(max_side=64, max_batch=4, max_steps=50), models_dir=models,
                     loader=load, outdir=tmp_path / "out")
    url, server = start(app)
    host, port = url.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a", steps=3)
    small = dict(prompt="a cat", width=8, height=8, cfg_scale=3)
    assert api.util_get_model_names() == ["other", "tiny"] and api.util_get_current_model() == "tiny"
    one = api.txt2img(seed=3, **small)
    assert one.image.size == (8, 8) and one.info["all_seeds"] == [3] and "Sampler: Euler a" in one.info["infotexts"][0]
    # A1111's seeds: image i of a batch is seed + i, the same picture as that seed alone
    two = api.txt2img(seed=3, batch_size=2, **small)
    assert two.info["all_seeds"] == [3, 4] and two.images[0].tobytes() == one.image.tobytes()
    assert two.images[1].tobytes() == api.txt2img(seed=4, **small).image.tobytes()
    var = api.txt2img(seed=3, subseed=9, subseed_strength=0.5, batch_size=2, **small)
    assert var.info["all_seeds"] == [3, 3] and var.info["all_subseeds"] == [9, 10]
    assert "Variation seed: 10, Variation seed strength: 0.5" in var.info["infotexts"][1]
    hires = api.txt2img(seed=3, enable_hr=True, hr_scale=2, hr_upscaler=webuiapi.HiResUpscaler.Latent,
                        hr_second_pass_steps=2, denoising_strength=0.6, **small)
    assert hires.image.size == (16, 16) and "Hires upscaler: Latent" in hires.info["infotexts"][0]
    karras = api.txt2img(seed=3, sampler_name="DPM++ 2M", scheduler="Karras", **small)
    assert "Schedule type: Karras" in karras.info["infotexts"][0]
    for bad, word in ((dict(scheduler="Wobbly"), "Wobbly"), (dict(sampler_name="k_lms"), "k_lms"),
                      (dict(restore_faces=True), "restore_faces"), (dict(tiling=True), "tiling"),
                      (dict(override_settings={"sd_vae": "other.pt"}), "sd_vae"),
                      (dict(override_settings={"face_restoration": True}), "face_restoration")):
        with pytest.raises(RuntimeError) as e:  # refused by name, never ignored
            api.txt2img(seed=3, **{**small, **bad})
        assert e.value.args[0] in (400, 422) and word in e.value.args[1], e.value.args
    # options, and override_settings for one request
    assert api.get_options()["randn_source"] == "GPU"
    clip2 = api.txt2img(seed=3, override_settings={"CLIP_stop_at_last_layers": 2, "randn_source": "CPU"}, **small)
    assert "Clip skip: 2" in clip2.info["infotexts"][0] and "RNG: CPU" in clip2.info["infotexts"][0]
    assert api.get_options()["randn_source"] == "GPU"  # restored afterwards, as A1111's default
    api.set_options({"randn_source": "CPU"})
    assert api.txt2img(seed=3, **small).image.tobytes() != one.image.tobytes()
    api.set_options({"randn_source": "GPU"})
    # another checkpoint of --models-dir
    api.util_set_model("other")
    assert api.util_get_current_model() == "other"
    assert api.txt2img(seed=3, **small).info["sd_model_name"] == "other"
    api.util_set_model("tiny")
    # png-info reads the parameters back, as A1111 parses them
    info = api.png_info(one.image)
    assert info.parameters["Seed"] == "3" and info.parameters["Size-1"] == "8" and info.info.startswith("a cat")
    assert {"automatic", "karras", "sgm_uniform", "align_your_steps"} <= set(api.util_get_scheduler_names())
    assert api.get_sd_vae() == [] and {"None", "Lanczos"} <= {u["name"] for u in api.get_upscalers()}
    assert {"Latent", "Latent (nearest)"} <= {u["name"] for u in api.get_latent_upscale_modes()}
    api.refresh_checkpoints()
    # img2img and inpainting with webuiapi's defaults (mask blur 4, fill, only masked)
    mask = Image.new("L", (8, 8), 0)
    mask.paste(255, (2, 2, 6, 6))
    picture = Image.new("RGB", (8, 8), (200, 200, 200))
    for kw in ({}, {"mask_image": mask}, {"mask_image": mask, "inpaint_full_res": False, "inpainting_fill": 2}):
        done = api.img2img(images=[picture], seed=5, denoising_strength=0.6, **small, **kw)
        assert done.image.size == (8, 8) and "Denoising strength: 0.6" in done.info["infotexts"][0]
    status, out = call(url, "/sdapi/v1/img2img", {"init_images": [png_b64(mode="RGB")], "enable_hr": True, **small})
    assert status == 400 and "enable_hr" in out["detail"]
    # save_images writes A1111's outputs; send_images=False answers without them
    saved = api.txt2img(seed=3, save_images=True, send_images=False, **small)
    assert saved.images == [] and len(list((tmp_path / "out").glob("txt2img-images/*/*-3.png"))) == 1
    styled = api.txt2img(seed=3, styles=["cinematic"], **small)
    assert "cinematic not applied" in styled.info["comments"]["styles"]
