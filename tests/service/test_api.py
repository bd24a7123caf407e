"""The HTTP API through FastAPI's test client, on the tiny random models."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

from brushnet.methods import inpaint

from .conftest import make_client, png, scene_image, scene_mask

FAST = {"steps": 2, "seed": 7, "prompt": "a red apple"}


def multipart(image=None, mask=None, **fields):
    image = png(scene_image()) if image is None else image
    mask = png(scene_mask()) if mask is None else mask
    files = {"image": ("image.png", image, "image/png"), "mask": ("mask.png", mask, "image/png")}
    return {"files": files, "data": fields}


def wait_done(client, job_id, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/api/v1/jobs/{job_id}").json()
        if status["state"] in ("done", "failed", "cancelled"):
            return status
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def as_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


def expected(method, seed, **fields):
    """What a direct library call gives for the same input and seed."""
    request = {**FAST, **fields, "seed": seed}
    return np.asarray(inpaint(method, scene_image(), scene_mask(), request).images[0]).astype(np.int16)


# ------------------------------------------------------------------------------------------ happy paths


def test_multipart_wait_returns_png_with_parameters(client, brushnet_method):
    r = client.post("/api/v1/inpaint", **multipart(request=json.dumps(FAST), wait="true"))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    out = as_array(r.content)
    assert out.shape == (64, 64, 3)
    np.testing.assert_array_equal(out, expected(brushnet_method, 7))
    # parameters embedded in the PNG (the page's download) and in a header
    info = Image.open(io.BytesIO(r.content)).info
    meta = json.loads(info["brushnet"])
    assert meta["method"] == "brushnet" and meta["seed"] == 7 and info["seed"] == "7"
    assert meta["parameters"]["prompt"] == "a red apple" and meta["parameters"]["steps"] == 2
    assert json.loads(r.headers["x-brushnet-parameters"])["seed"] == 7
    # kept pixels far from the hole are exact (blend on by default)
    assert (out[:12, :12] == np.asarray(scene_image())[:12, :12]).all()
    assert np.abs(out[26:38, 26:38] - np.asarray(scene_image())[26:38, 26:38]).mean() > 5


def test_multipart_separate_fields_and_job_flow(client):
    r = client.post(
        "/api/v1/inpaint",
        **multipart(prompt="x", seed="3", steps="2", options=json.dumps({"conditioning_scale": 0.5})),
    )
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["state"] in ("queued", "running") and r.headers["location"] == body["status_url"]
    status = wait_done(client, body["job_id"])
    assert status["state"] == "done", status
    assert status["progress"] == {"step": 2, "total": 2}
    result = status["result"]
    assert result["seed"] == 3 and result["parameters"]["options"]["conditioning_scale"] == 0.5
    assert result["images"] == [f"/api/v1/jobs/{body['job_id']}/image/0"]
    img = client.get(result["images"][0])
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    assert "brushnet-brushnet-3.png" in img.headers["content-disposition"]
    assert client.get(f"/api/v1/jobs/{body['job_id']}/image/1").status_code == 400


def test_json_base64_and_other_method(client, blended_method):
    body = {
        **FAST,
        "method": "blended-latent-diffusion",
        "image": base64.b64encode(png(scene_image())).decode(),
        "mask": "data:image/png;base64," + base64.b64encode(png(scene_mask())).decode(),
        "wait": True,
        "num_images": 2,
    }
    r = client.post("/api/v1/inpaint", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["x-brushnet-num-images"] == "2"
    np.testing.assert_array_equal(
        as_array(r.content), expected(blended_method, 7, num_images=2)
    )  # image 0 of a 2-image request == seed 7


def test_rgba_mask_alpha_is_the_mask(client):
    alpha = np.asarray(scene_mask())
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 3] = alpha  # a transparent layer with painted strokes, as painting tools export
    r = client.post(
        "/api/v1/inpaint", **multipart(mask=png(Image.fromarray(rgba)), request=json.dumps(FAST), wait="1")
    )
    assert r.status_code == 200, r.text


def test_a_transparent_image_keeps_its_alpha(client, brushnet_method):
    """A cut-out uploaded as RGBA (multipart and JSON): the PNG that comes back keeps the input's alpha and stored
    colours away from the hole, as the library call does (the server flattened the upload before)."""
    rgba = np.asarray(scene_image().convert("RGBA")).copy()
    rgba[:10, :10] = (10, 200, 30, 0)  # a transparent corner that stores a colour
    upload = png(Image.fromarray(rgba, "RGBA"))
    want = np.asarray(inpaint(brushnet_method, Image.fromarray(rgba, "RGBA"), scene_mask(), FAST).images[0])
    assert want.shape == (64, 64, 4) and np.array_equal(want[:10, :10], rgba[:10, :10])
    r = client.post("/api/v1/inpaint", **multipart(image=upload, request=json.dumps(FAST), wait="1"))
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content))), want)
    body = {
        "image": base64.b64encode(upload).decode(),
        "mask": base64.b64encode(png(scene_mask())).decode(),
        **FAST,
        "wait": True,
    }
    r = client.post("/api/v1/inpaint", json=body)
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content))), want)


def test_full_mask_is_accepted_and_inverted_full_mask_is_empty(client):
    full = Image.new("L", (64, 64), 255)
    r = client.post("/api/v1/inpaint", **multipart(mask=png(full), request=json.dumps(FAST), wait="1"))
    assert r.status_code == 200, r.text
    r = client.post(
        "/api/v1/inpaint",
        **multipart(mask=png(full), request=json.dumps({**FAST, "invert_mask": True})),
    )
    assert r.status_code == 400 and "mask is empty" in r.json()["error"]


def test_methods_health_docs_and_page(client):
    listed = client.get("/api/v1/methods").json()
    names = [m["name"] for m in listed["methods"]]
    assert names == ["brushnet", "blended-latent-diffusion"] and listed["default_method"] == "brushnet"
    brush = listed["methods"][0]
    assert brush["options_defaults"]["conditioning_scale"] == 1.0
    assert "conditioning_scale" in brush["options_schema"]["properties"]
    assert listed["request_defaults"]["steps"] == 50 and "unipc" in listed["schedulers"]
    # guidance: unset in a request, the family's value (SD1.5 7.5, SDXL 5.0) per loaded method for the page
    assert listed["request_defaults"]["guidance_scale"] is None
    assert [m["default_guidance_scale"] for m in listed["methods"]] == [7.5, 7.5]
    assert listed["request_schema"]["additionalProperties"] is False
    assert listed["limits"]["max_queue"] == 32
    health = client.get("/api/v1/health").json()
    assert health["status"] == "ok" and health["queued"] == 0 and health["workers"] == ["cpu"]
    openapi = client.get("/openapi.json").json()
    assert "/api/v1/inpaint" in openapi["paths"] and "/api/v1/jobs/{job_id}/events" in openapi["paths"]
    page = client.get("/")
    assert page.status_code == 200 and 'id="mask-canvas"' in page.text
    for name in ("app.js", "painter.js", "app.css"):
        assert client.get(f"/static/{name}").status_code == 200


def test_sse_progress_events_end_with_done(client, gated):
    gated.step_delay = 0.03
    job_id = client.post("/api/v1/inpaint", **multipart(**{**FAST, "steps": "5"})).json()["job_id"]
    events = []
    with client.stream("GET", f"/api/v1/jobs/{job_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    assert events[-1][0] == "done" and events[-1][1]["result"]["images"]
    steps = [data["progress"]["step"] for name, data in events if name == "progress"]
    assert steps == sorted(steps) and any(0 < s < 5 for s in steps), steps
    assert [name for name, _ in events[:-1]] == ["progress"] * (len(events) - 1)


# ------------------------------------------------------------------------------------------ 4xx


def _error(r, status, *needles):
    assert r.status_code == status, (r.status_code, r.text)
    message = r.json()["error"]
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


@pytest.mark.parametrize(
    "kwargs, status, needles",
    [
        (dict(image=b"this is not an image"), 400, ["image is not a readable image"]),
        (dict(mask=b"GIF89a broken"), 400, ["mask is not a readable image"]),
        (dict(image=b""), 400, ["image is empty"]),
        (dict(mask=png(scene_mask(32, (4, 4, 20, 20)))), 400, ["mask is 32x32 but the image is 64x64"]),
        (dict(mask=png(Image.new("L", (64, 64), 0))), 400, ["mask is empty"]),
        (dict(colour="red"), 422, ["unknown field 'colour'"]),
        (dict(request='{"steps": 2, "sharpness": 3}'), 422, ["unknown field 'sharpness'"]),
        (dict(request="{not json"), 422, ["request is not valid JSON"]),
        (dict(steps="0"), 422, ["steps"]),
        (dict(scheduler="warp"), 422, ["unknown scheduler 'warp'"]),
        (dict(method="dall-e"), 422, ["method 'dall-e' is not loaded"]),
        (
            dict(options='{"conditioning_scale": 9}'),
            422,
            ["bad option for method 'brushnet'", "conditioning_scale"],
        ),
        (dict(options='{"jump_length": 1}'), 422, ["jump_length"]),
        (dict(blend_kernel_size="4"), 422, ["blend_kernel_size must be odd"]),
        (dict(wait="maybe"), 422, ["form field 'wait' must be a boolean", "got 'maybe'"]),
        (dict(wait="ture"), 422, ["form field 'wait' must be a boolean", "got 'ture'"]),
        # a lone surrogate (JSON's "\ud800" without its pair) crashed the tokenizer after queuing (500)
        (
            dict(request='{"prompt": "a\\ud800b"}'),
            422,
            ["prompt: not valid Unicode text: lone surrogate U+D800 at character 1"],
        ),
        (dict(request='{"negative_prompt": "\\udfff"}'), 422, ["negative_prompt", "lone surrogate U+DFFF"]),
        (
            dict(options='{"positive_prompt": "x\\ud800"}'),
            422,
            ["option positive_prompt is not valid Unicode text"],
        ),
        (
            dict(blend="false", blend_kernel_size="9"),
            422,
            ["blend_kernel_size 9 has no effect without blend"],
        ),
    ],
)
def test_bad_multipart_requests(client, kwargs, status, needles):
    files_args = {k: kwargs.pop(k) for k in ("image", "mask") if k in kwargs}
    _error(client.post("/api/v1/inpaint", **multipart(**files_args, **kwargs)), status, *needles)
    assert client.get("/api/v1/health").json()["queued"] == 0  # nothing was queued


def test_bad_json_requests(client):
    good = {
        "image": base64.b64encode(png(scene_image())).decode(),
        "mask": base64.b64encode(png(scene_mask())).decode(),
    }
    _error(
        client.post("/api/v1/inpaint", json={**good, "prompt": "x", "strenght": 1}),
        422,
        "unknown field 'strenght'",
    )
    _error(client.post("/api/v1/inpaint", json={**good, "image": "@@@"}), 400, "image is not valid base64")
    junk = base64.b64encode(b"not an image").decode()
    for field in ("image", "mask", "control_image"):  # each message names its own field
        r = client.post("/api/v1/inpaint", json={**good, field: junk})
        assert _error(r, 400).startswith(f"{field} is not a readable image"), r.text
    surrogate = json.dumps({**good, "prompt": "a\ud800b"})  # ASCII JSON with the escape "\ud800"
    r = client.post("/api/v1/inpaint", content=surrogate, headers={"content-type": "application/json"})
    _error(r, 422, "prompt: not valid Unicode text: lone surrogate U+D800")
    _error(client.post("/api/v1/inpaint", json={"mask": good["mask"]}), 422, "missing field 'image'")
    _error(client.post("/api/v1/inpaint", json=[1, 2]), 422, "must be a JSON object")
    _error(
        client.post("/api/v1/inpaint", json={**good, "options": {"guess_mode": "maybe"}}), 422, "guess_mode"
    )
    _error(
        client.post("/api/v1/inpaint", content=b"x", headers={"content-type": "text/plain"}),
        400,
        "unsupported content type 'text/plain'",
    )


def test_multipart_field_errors(client):
    r = client.post("/api/v1/inpaint", files={"image": ("i.png", png(scene_image()), "image/png")})
    _error(r, 422, "missing file field 'mask'")
    r = client.post("/api/v1/inpaint", **multipart(request=json.dumps({"seed": 1}), seed="2"))
    _error(r, 422, "'seed' is given both")
    r = client.post(
        "/api/v1/inpaint", files={**multipart()["files"], "extra": ("x.png", b"123", "image/png")}
    )
    _error(r, 422, "unexpected file field 'extra'; only 'image', 'mask' and 'control_image' are files")
    extra = {f"extra{i}": ("x.png", b"123", "image/png") for i in range(2)}
    r = client.post("/api/v1/inpaint", files={**multipart()["files"], **extra})
    _error(r, 400, "Maximum number of files is 3")
    r = client.post(
        "/api/v1/inpaint", files={"image": multipart()["files"]["image"], "prompt": ("p.txt", b"x")}
    )
    _error(r, 422, "unexpected file field 'prompt'")


def test_size_limits(gated):
    with make_client({"brushnet": gated}, max_upload_bytes=4000, max_pixels=48 * 48) as client:
        big = png(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)))
        assert len(big) > 4000
        _error(client.post("/api/v1/inpaint", **multipart(image=big)), 413, "limit is 4000")
        _error(
            client.post("/api/v1/inpaint", **multipart()),
            413,
            "image is 64x64 = 4096 pixels; the limit is 2304",
        )
        small = {"image": png(scene_image(40)), "mask": png(scene_mask(40, (8, 8, 20, 20)))}
        r = client.post("/api/v1/inpaint", **multipart(**small, request=json.dumps(FAST), wait="1"))
        assert r.status_code == 200, r.text


def test_the_working_size_is_held_to_the_pixel_limit(gated):
    # resolution (or crop_to_mask's native resolution) asked for more pixels than --max-pixels: was run
    small = {"image": png(scene_image(32)), "mask": png(scene_mask(32, (8, 8, 20, 20)))}
    with make_client({"brushnet": gated}, max_pixels=48 * 48) as client:
        for fields, reason in [
            ({"resolution": 64}, "(resolution 64)"),
            ({"crop_to_mask": True}, "(crop_to_mask at the model's native resolution 64)"),
        ]:
            r = client.post("/api/v1/inpaint", **multipart(**small, request=json.dumps({**FAST, **fields})))
            _error(r, 413, f"working size 64x64 = 4096 pixels {reason}; the limit is 2304")
            body = {k: base64.b64encode(v).decode() for k, v in small.items()}
            _error(client.post("/api/v1/inpaint", json={**body, **FAST, **fields}), 413, "the limit is 2304")
        assert client.get("/api/v1/health").json()["jobs_in_memory"] == 0  # nothing was queued
    with make_client({"brushnet": gated}, max_pixels=64 * 64) as client:
        r = client.post(
            "/api/v1/inpaint", **multipart(**small, request=json.dumps({**FAST, "resolution": 72}))
        )
        _error(r, 413, "working size 72x72 = 5184 pixels (resolution 72); the limit is 4096")
        # a working size at the limit runs
        r = client.post(
            "/api/v1/inpaint", **multipart(**small, request=json.dumps({**FAST, "resolution": 64}), wait="1")
        )
        assert r.status_code == 200, r.text
        assert json.loads(r.headers["x-brushnet-parameters"])["parameters"]["region"]["size"] == [64, 64]


def test_unknown_job_and_unknown_route(client):
    _error(client.get("/api/v1/jobs/nope"), 404, "no job 'nope'")
    _error(client.get("/api/v1/jobs/nope/events"), 404, "no job 'nope'")
    _error(client.get("/api/v1/nothing"), 404, "not found: /api/v1/nothing")


# ------------------------------------------------------------------------------------------ queue, timeout, cancel


def test_full_queue_answers_429_then_recovers(gated):
    with make_client({"brushnet": gated}, max_queue=2) as client:
        gated.gate.clear()
        first = client.post("/api/v1/inpaint", **multipart(**FAST)).json()["job_id"]
        assert gated.started.acquire(timeout=10)  # the worker holds the first job: nothing else runs
        queued = [client.post("/api/v1/inpaint", **multipart(**FAST)) for _ in range(2)]
        assert [r.status_code for r in queued] == [202, 202]
        assert client.get("/api/v1/health").json()["queued"] == 2
        _error(client.post("/api/v1/inpaint", **multipart(**FAST)), 429, "queue is full (2 jobs waiting)")
        gated.gate.set()
        for job_id in [first] + [r.json()["job_id"] for r in queued]:
            assert wait_done(client, job_id)["state"] == "done"
        assert client.post("/api/v1/inpaint", **multipart(**FAST)).status_code == 202


def test_timeout_fails_job_and_wait_answers_504(gated):
    with make_client({"brushnet": gated}, job_timeout_s=0.2) as client:
        gated.step_delay = 0.3
        r = client.post("/api/v1/inpaint", **multipart(**{**FAST, "steps": "5"}, wait="true"))
        message = _error(r, 504, "timed out after 0.2 s")
        job = client.get(f"/api/v1/jobs/{r.json()['job_id']}").json()
        assert job["state"] == "failed" and job["error"] == message
        gated.step_delay = 0.0  # the worker is free again: the next job runs
        assert client.post("/api/v1/inpaint", **multipart(**FAST, wait="true")).status_code == 200


def test_cancel_queued_and_running(client, gated):
    gated.gate.clear()
    running = client.post("/api/v1/inpaint", **multipart(**FAST)).json()["job_id"]
    assert gated.started.acquire(timeout=10)
    queued = client.post("/api/v1/inpaint", **multipart(**FAST)).json()["job_id"]
    r = client.delete(f"/api/v1/jobs/{queued}")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert client.delete(f"/api/v1/jobs/{running}").status_code == 202  # stops at its next step
    gated.gate.set()
    status = wait_done(client, running)
    assert status["state"] == "cancelled" and "cancelled at step 1/2" in status["error"]
    _error(client.delete(f"/api/v1/jobs/{running}"), 409, "already cancelled")
    _error(client.get(f"/api/v1/jobs/{running}/image/0"), 409, "has no images")


def test_a_job_cancelled_after_its_last_step_ends_cancelled_without_a_result(gated):
    """The 202 a cancel gets for a running job was not kept when the cancel came after the last step (during
    the decoding and paste-back): the job still ended "done" with its images."""
    from .conftest import GatedBrushNet

    class HeldAfterSteps(GatedBrushNet):
        def generate(self, task):
            output = super().generate(task)
            self.reached.set()
            self.release.wait(30)
            return output

    method = HeldAfterSteps(gated)
    method.reached, method.release = threading.Event(), threading.Event()
    with make_client({"brushnet": method}) as client:
        job_id = client.post("/api/v1/inpaint", **multipart(**FAST)).json()["job_id"]
        assert method.reached.wait(20)  # every step done, the result not yet stored
        assert client.delete(f"/api/v1/jobs/{job_id}").status_code == 202
        method.release.set()
        status = wait_done(client, job_id)
        assert status["state"] == "cancelled" and "cancelled after step 2/2" in status["error"]
        _error(client.get(f"/api/v1/jobs/{job_id}/image/0"), 409, "has no images")


def test_cancelled_queued_jobs_leave_the_queue_at_once(client, gated):
    """They stayed in the worker's queue until it reached them: submit-and-cancel while a job ran grew it."""
    gated.gate.clear()
    client.post("/api/v1/inpaint", **multipart(**FAST))
    assert gated.started.acquire(timeout=10)
    for _ in range(5):
        job_id = client.post("/api/v1/inpaint", **multipart(**FAST)).json()["job_id"]
        assert client.delete(f"/api/v1/jobs/{job_id}").status_code == 200
    assert sum(len(worker.queue) for worker in client.engine._workers.values()) == 0
    gated.gate.set()


def test_a_transparent_inputs_rgba_result_is_held_to_the_result_limit_before_queuing(gated):
    """The 413 check counted 3 bytes a pixel; a transparent input gives RGBA results (4), which the history
    counts, so a result within the estimate was dropped from the history as soon as it was stored (202, then
    404)."""
    rgba = scene_image().convert("RGBA")
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    with make_client({"brushnet": gated}, max_result_bytes=64 * 64 * 3) as client:
        _error(client.post("/api/v1/inpaint", **multipart(png(rgba), **FAST)), 413, "RGBA", "transparent")
        assert client.post("/api/v1/inpaint", **multipart(**FAST, wait="true")).status_code == 200  # RGB fits


def test_a_wait_request_whose_client_left_cancels_its_job(gated):
    """A ``wait=true`` client that gave up left its job running to the end (nobody else knows its id)."""
    import httpx

    from brushnet.service.api import create_app
    from brushnet.service.engine import Engine, Limits
    from brushnet.service.server import BackgroundServer

    gated.step_delay = 0.05
    engine = Engine({"brushnet": gated}, Limits())
    try:
        with BackgroundServer(create_app(engine)) as server:
            with pytest.raises(httpx.TimeoutException):
                httpx.post(f"{server.url}/api/v1/inpaint", timeout=1.0,
                           **multipart(**{**FAST, "steps": "200"}, wait="true"))  # fmt: skip
            deadline = time.monotonic() + 10
            while engine.stats()["running"] and time.monotonic() < deadline:
                time.sleep(0.05)
            [job] = list(engine._jobs.values())
            assert job.state == "cancelled" and job.step < 200, (job.state, job.step)
    finally:
        gated.step_delay = 0.0
        engine.close()


def test_concurrent_requests_all_complete_with_their_own_results(client, brushnet_method, gated):
    n = 6
    gated.step_delay = 0.01
    responses: dict[int, object] = {}

    def post(seed):
        fields = {**FAST, "seed": seed}
        responses[seed] = client.post("/api/v1/inpaint", **multipart(request=json.dumps(fields), wait="true"))

    threads = [threading.Thread(target=post, args=(100 + i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(responses) == [100 + i for i in range(n)]
    job_ids = {r.headers["x-brushnet-job-id"] for r in responses.values()}
    assert len(job_ids) == n  # none lost, none merged
    for seed, r in responses.items():
        assert r.status_code == 200, r.text
        assert json.loads(r.headers["x-brushnet-parameters"])["seed"] == seed
        np.testing.assert_array_equal(as_array(r.content), expected(brushnet_method, seed))
    assert client.get("/api/v1/health").json()["jobs_in_memory"] == n


def test_history_is_bounded(gated):
    with make_client({"brushnet": gated}, max_history=2) as client:
        ids = [
            client.post("/api/v1/inpaint", **multipart(**FAST, wait="1")).headers["x-brushnet-job-id"]
            for _ in range(3)
        ]
        _error(client.get(f"/api/v1/jobs/{ids[0]}"), 404, "dropped from the history")
        assert client.get(f"/api/v1/jobs/{ids[2]}").json()["state"] == "done"


def test_cross_origin_browser_requests_are_refused(gated):
    with make_client({"brushnet": gated}, max_queue=4) as client:
        evil = {"origin": "http://evil.example"}
        r = client.post("/api/v1/inpaint", **multipart(**FAST), headers=evil)
        _error(r, 403, "cross-origin request from 'http://evil.example' refused", "--allow-origin")
        assert client.get("/api/v1/health").json()["jobs_in_memory"] == 0
        own = {"origin": "http://testserver"}  # the page served by this server
        job_id = client.post("/api/v1/inpaint", **multipart(**FAST), headers=own).json()["job_id"]
        _error(client.delete(f"/api/v1/jobs/{job_id}", headers=evil), 403, "cross-origin")
        assert wait_done(client, job_id)["state"] == "done"


def test_allowed_origins(gated):
    from fastapi.testclient import TestClient

    from brushnet.service.api import create_app
    from brushnet.service.engine import Engine

    engine = Engine({"brushnet": gated})
    try:
        client = TestClient(create_app(engine, allowed_origins=["https://inpaint.example.org/"]))
        ok = {"origin": "https://inpaint.example.org"}
        assert client.post("/api/v1/inpaint", **multipart(**FAST), headers=ok).status_code == 202
        other = {"origin": "https://example.org"}
        assert client.post("/api/v1/inpaint", **multipart(**FAST), headers=other).status_code == 403
    finally:
        engine.close()


def test_nan_output_fails_the_job_with_its_own_message(gated):
    """A method whose models give NaN: the job fails with the GenerationError's line, status 500 for wait=true
    (was an all-black image, done)."""
    generate = gated.generate

    def nan_generate(task):
        output = generate(task)
        output.images[:] = float("nan")
        return output

    gated.generate = nan_generate
    with make_client({"brushnet": gated}) as client:
        r = client.post("/api/v1/inpaint", **multipart(**FAST, wait="true"))
        message = _error(r, 500, "brushnet produced NaN or infinite values in image(s) 0 (float32)")
        job = client.get(f"/api/v1/jobs/{r.json()['job_id']}").json()
        assert job["state"] == "failed" and job["error"] == message and "internal error" not in message
