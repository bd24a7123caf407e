"""Option faults (issue 19 "Options", stumbles 6, 8 and 12): bad devices, ports, method lists and schedulers are
one line and exit 2, found before any model loads; ``serve --tiny`` stopped by SIGTERM leaves no temporary
models; ``serve --demo`` serves the shipped demo models."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from brushnet.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("options")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        root / "i.png"
    )
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    Image.fromarray(mask).save(root / "m.png")
    (root / "images").mkdir()
    Image.open(root / "i.png").save(root / "images" / "a.png")
    return root


def _one_line(result, message):
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("error: "), result.output
    assert message in result.output, result.output


def _commands(files, tmp_path, models):
    """Every generating command, with model paths that cannot load: an error found after loading would name them."""
    inputs = ["-i", str(files / "i.png"), "-m", str(files / "m.png")]
    return {
        "inpaint": ["inpaint", *models, *inputs, "-o", str(tmp_path / "o.png")],
        "compare": ["compare", "--methods", "brushnet", *models, *inputs, "-o", str(tmp_path / "g.png")],
        "outpaint": ["outpaint", *models, "-i", str(files / "i.png"), "--extend-left", "8", "-o", str(tmp_path / "w.png")],
        "batch": ["batch", *models, "--images", str(files / "images"), "--masks", str(files / "m.png"), "-o", str(tmp_path / "b")],
    }  # fmt: skip


def _no_models(tmp_path):
    return ["--base", str(tmp_path / "no-base"), "--brushnet", str(tmp_path / "no-brushnet")]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--device", "garbage"], "unknown device 'garbage'; use cpu, cuda, cuda:N or mps"),
        (["--device", "cuda:7"], "--device cuda:7: "),
        (["--dtype", "fp8"], "unknown dtype 'fp8'"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--scheduler", "nosuch"], "unknown scheduler 'nosuch'"),
        (["--steps", "0"], "steps"),
        (["--option", "nosuch=1"], "nosuch"),
        # a setting that acts only under another one, given while that one is off (review finding 2)
        (["--guidance", "1", "-n", "blurry"], "negative_prompt has no effect with guidance_scale 1"),
        (["--crop-padding", "8"], "crop_padding has no effect without crop_to_mask"),
        (["--option", "pag_layers=up_blocks.0"], "option pag_layers has no effect with pag_scale 0"),
        (["--no-blend", "--blend-kernel-size", "9"], "blend_kernel_size 9 has no effect without blend"),
    ],
)
@pytest.mark.parametrize("command", ["inpaint", "compare", "outpaint", "batch"])
def test_option_errors_come_before_loading(files, tmp_path, command, extra, message):
    result = runner.invoke(app, [*_commands(files, tmp_path, _no_models(tmp_path))[command], *extra])
    _one_line(result, message)
    assert "no-base" not in result.output and "no-brushnet" not in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["inpaint", "compare", "outpaint"])  # batch reads its masks after loading
def test_a_mask_emptied_by_mask_grow_is_one_line_naming_the_grow(files, tmp_path, command):
    result = runner.invoke(
        app, [*_commands(files, tmp_path, _no_models(tmp_path))[command], "--mask-grow", "-10"]
    )
    _one_line(
        result, "mask is empty after mask_grow -10 (--mask-grow): shrinking by 10 px erased the whole hole"
    )
    assert list(tmp_path.iterdir()) == []


def test_an_outpainted_canvas_over_max_pixels_is_one_line_before_loading(files, tmp_path):
    command = _commands(files, tmp_path, _no_models(tmp_path))["outpaint"]  # 32x32 extended by 8 on the left
    result = runner.invoke(app, [*command, "--max-pixels", "1100"])
    _one_line(result, "error: outpainted canvas 40x32 = 1280 pixels exceeds the limit of 1100 (--max-pixels)")
    assert list(tmp_path.iterdir()) == []


def test_an_overlap_reaching_across_the_original_is_one_line_before_loading(files, tmp_path):
    """``--overlap 100 --extend-left 8`` on a 32 px image repainted the whole original (exit 0)."""
    command = _commands(files, tmp_path, _no_models(tmp_path))["outpaint"]  # 32x32 extended by 8 on the left
    result = runner.invoke(app, [*command, "--overlap", "100"])
    _one_line(result, "overlap 100 reaches across the original's width of 32 px")
    result = runner.invoke(app, [*command, "--extend-right", "8", "--overlap", "16"])  # 16 from each side
    _one_line(result, "overlap 16 reaches across the original's width of 32 px from both extended sides")
    assert "no-base" not in result.output and list(tmp_path.iterdir()) == []


def _batch_input(files, name, content):
    path = files / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is None:
        path.mkdir(exist_ok=True)
    else:
        path.write_text(content)
    return str(path)


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"--masks": ("no-masks", None)}, "no mask in {files}/no-masks for any of the 1 images to do"),
        (["--max-pixels", "0"], "--max-pixels must be at least 1, got 0"),
        ({"--prompts": ("five.jsonl", '{"image": "a.png", "prompt": 5}\n')},
         "five.jsonl:1: 'prompt' must be text (a JSON string), got 5"),
        ({"--prompts": ("negative.jsonl", '\n{"image": "a", "negative_prompt": "blurry"}\n')},
         "negative.jsonl:2: negative_prompt has no effect with guidance_scale 1"),
        ({"--prompts": ("nonexist.jsonl", False)}, "--prompts {files}/nonexist.jsonl: no such file"),
        ({"--prompts": ("photo.png", b"\x89PNG\r\n\x1a\n")}, "--prompts {files}/photo.png is not UTF-8 text"),
    ],
)  # fmt: skip
def test_batch_inputs_are_checked_before_loading(files, tmp_path, extra, message):
    """An empty --masks folder, --max-pixels 0, a prompts entry that is not text or not usable with the settings
    were found per image after loading (exit 1); an unreadable --prompts file was "[Errno 2] ..." or
    "'utf-8' codec can't decode byte 0x89", naming neither the flag nor the file."""
    command = _commands(files, tmp_path, _no_models(tmp_path))["batch"]
    if isinstance(extra, dict):
        for flag, (name, content) in extra.items():
            value = str(files / name) if content is False else _batch_input(files, name, content)
            if flag in command:
                command[command.index(flag) + 1] = value
            else:
                command += [flag, value]
        extra = []
    if "negative" in message:
        extra = ["--guidance", "1"]
    result = runner.invoke(app, [*command, *extra, "-q"])
    _one_line(result, message.format(files=files))
    assert "no-base" not in result.output and "no-brushnet" not in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_says_what_there_is(files, tmp_path):
    result = runner.invoke(
        app, [*_commands(files, tmp_path, _no_models(tmp_path))["inpaint"], "--device", "cuda"]
    )
    _one_line(result, "--device cuda: CUDA is not available here")
    result = runner.invoke(app, ["serve", "--tiny", "--device", "cuda"])
    _one_line(result, "CUDA is not available here")


def test_an_option_error_is_as_fast_as_a_missing_file(tiny_models, files, tmp_path):
    """With real models: a bad scheduler is refused as early as a missing mask file (nothing loads first)."""
    models = ["--base", str(tiny_models["base"]), "--brushnet", str(tiny_models["brushnet"])]
    command = _commands(files, tmp_path, models)["inpaint"]
    missing = [str(tmp_path / "missing.png") if arg == str(files / "m.png") else arg for arg in command]
    runner.invoke(app, missing)  # warm-up: the imports

    def seconds(args):
        start = time.perf_counter()
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        return time.perf_counter() - start

    missing_file = min(seconds(missing) for _ in range(2))
    bad_option = min(seconds([*command, "--scheduler", "nosuch"]) for _ in range(2))
    assert bad_option < missing_file + 0.5, (bad_option, missing_file)


def test_demo_option_errors_come_before_loading(tmp_path):
    models = tmp_path / "models"
    (models / "base").mkdir(parents=True)
    (models / "base" / "model_index.json").write_text("{}")  # no weights: loading would fail
    args = ["demo", "--models", str(models), "--methods", "brushnet,repaint", "-o", str(tmp_path / "out")]
    _one_line(runner.invoke(app, [*args, "--scheduler", "nosuch"]), "unknown scheduler 'nosuch'")
    _one_line(runner.invoke(app, [*args, "--device", "garbage"]), "unknown device")
    # was silently ignored: the shipped scenes' masks are set
    _one_line(runner.invoke(app, [*args, "--invert-mask"]), "--invert-mask applies to your own --mask")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--port", "70000"], "--port must be between 1 and 65535, got 70000"),
        (["--port", "0"], "--port must be between 1 and 65535"),
        (["-m", "nosuch"], "unknown method 'nosuch'"),
        (["-m", "brushnet,nosuch"], "unknown method 'nosuch'"),  # a comma-separated list is split
        (["-m", "brushnet", "-m", "repaint,nosuch"], "unknown method 'nosuch'"),
        (["--log-level", "loud"], "unknown --log-level 'loud'"),
        (["--device", "garbage"], "unknown device 'garbage'"),
    ],
)
def test_serve_bad_options_are_one_line_before_building_anything(args, message, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    _one_line(runner.invoke(app, ["serve", "--tiny", *args]), message)
    assert list(tmp_path.iterdir()) == []  # no temporary models were built


def test_serve_demo_serves_the_shipped_models(monkeypatch):
    from fastapi.testclient import TestClient

    from brushnet.cli import serve

    seen = {}

    def fake_run(asgi_app, engine, host, port, log_level):
        with TestClient(asgi_app, base_url=f"http://{host}:{port}") as client:
            seen.update(client.get("/api/v1/health").json())

    monkeypatch.setattr(serve, "_run_server", fake_run)
    result = runner.invoke(app, ["serve", "--demo", "-m", "brushnet"])
    assert result.exit_code == 0, result.output
    assert seen["methods"] == ["brushnet"] and seen["status"] == "ok"  # no --base given: the shipped models


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_tiny_stopped_by_sigterm_removes_its_temporary_models(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "brushnet.cli", "serve", "--tiny", "--port", str(_free_port())]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        for line in process.stdout:  # until it serves
            lines.append(line)
            if line.startswith("serving "):
                break
        assert any(p.name.startswith("brushnet-tiny-") for p in tmp_path.iterdir()), "".join(lines)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("brushnet-tiny-")] == []


def test_serve_shutdown_stops_the_running_job_instead_of_waiting_for_it(tmp_path):
    """uvicorn's graceful shutdown waits for open responses, and the engine was closed only after it: a SIGTERM
    during a ``wait=true`` job waited for the whole job (up to the job timeout)."""
    import io
    import threading

    import httpx

    port = _free_port()
    env = {**os.environ, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "brushnet.cli", "serve", "--tiny", "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    answers = []
    try:
        for line in process.stdout:  # until it serves
            if line.startswith("serving "):
                break
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):  # uvicorn binds after the line is printed
            try:
                httpx.get(f"{url}/api/v1/health", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        buffers = []
        for array in (np.full((256, 256, 3), 120, np.uint8), np.pad(np.full((64, 64), 255, np.uint8), 96)):
            buffers.append(io.BytesIO())
            Image.fromarray(array).save(buffers[-1], format="PNG")
        files = {"image": ("i.png", buffers[0].getvalue()), "mask": ("m.png", buffers[1].getvalue())}
        data = {"request": '{"steps": 1000, "seed": 1}', "wait": "true"}

        def post():
            answers.append(httpx.post(f"{url}/api/v1/inpaint", files=files, data=data, timeout=120))

        thread = threading.Thread(target=post)
        thread.start()
        for _ in range(200):
            if httpx.get(f"{url}/api/v1/health", timeout=5).json()["running"]:
                break
            time.sleep(0.05)
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
        stopped_in = time.monotonic() - start
        thread.join(30)
    finally:
        if process.poll() is None:
            process.kill()
    assert stopped_in < 15, stopped_in
    assert answers and answers[0].status_code == 409 and "cancelled" in answers[0].json()["error"], answers
