"""The methods layer's declarations: discovery from one declaration, light imports, a method added in one class,
request checks before any model loads, progress counted from the scheduler's real timesteps."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from pydantic import BaseModel, ConfigDict, Field

from brushnet.errors import InputError, RequestError
from brushnet.methods import (
    GenerateOutput,
    InpaintMethod,
    ModelPaths,
    ModelSlot,
    available_methods,
    get_method_class,
    inpaint,
    method_classes,
    model_slots,
    prepare,
    register_method,
)
from brushnet.methods.base import FAMILIES
from brushnet.schedulers import SCHEDULERS, make_scheduler

FAST = {"steps": 4, "guidance_scale": 2.0, "seed": 3, "prompt": "a cat"}


def test_declarations_need_no_torch():
    """The CLI builds its flags from the declarations: reading them must not import torch or diffusers."""
    code = (
        "import sys\n"
        "from brushnet.methods import method_classes, model_slots\n"
        "from brushnet.cli import app\n"
        "assert method_classes() and model_slots()\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_every_builtin_method_is_discovered_from_its_module_and_declares_itself():
    from brushnet.methods import builtin

    assert set(available_methods()) >= {
        "brushnet",
        "sd-inpainting",
        "blended-latent-diffusion",
        "repaint",
        "controlnet-inpaint",
    }
    for name, cls in method_classes().items():
        assert cls.name == name and cls.description
        assert cls.Options.model_config.get("extra") == "forbid", name
        assert cls.models and all(isinstance(slot, ModelSlot) for slot in cls.models), name
        assert set(cls.families) <= set(FAMILIES), name
        assert cls.default_scheduler in SCHEDULERS, name
        assert cls.schedulers is None or cls.default_scheduler in cls.schedulers, name
        if cls.__module__.startswith(builtin.__name__):
            assert cls.__module__.count(".") == 3  # one module per method in brushnet.methods.builtin
    slots = model_slots()
    assert {"base", "base_config", "brushnet", "inpaint_model", "controlnet"} <= set(slots)
    assert all(slot.flag == "--" + name.replace("_", "-") for name, slot in slots.items())


def test_model_paths_take_declared_slots_only():
    paths = ModelPaths(base="b", brushnet="x")
    assert paths.base == "b" and paths.controlnet is None
    with pytest.raises(ValueError, match="unknown model 'brushnett'"):
        ModelPaths(brushnett="x")
    with pytest.raises(InputError, match="needs --base, --brushnet"):
        ModelPaths().require(get_method_class("brushnet"))


class EchoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gain: float = Field(1.0, ge=0, description="Multiplies the input.")


ECHO_MODEL = ModelSlot("echo_model", "Anything (the echo method reads nothing).", folder="echo")


class Echo(InpaintMethod):
    """A method written as one class: it returns its input. Registered by the test."""

    name = "test-echo"
    description = "Returns the input (a test method)."
    Options = EchoOptions
    models = (ECHO_MODEL,)

    @classmethod
    def load(cls, models, device="cpu", dtype="fp32"):
        return cls(device)

    def generate(self, task):
        for step in range(task.request.steps):
            task.step(step + 1, task.request.steps)
        images = (task.image * task.options.gain).clamp(0, 1).expand(task.num_images, -1, -1, -1)
        return GenerateOutput(images=images, unet_calls=0)


@pytest.fixture
def echo_registered():
    from brushnet.methods import registry

    register_method(Echo)
    yield Echo
    registry._REGISTRY.pop(Echo.name)


def test_a_method_is_one_class(echo_registered, scene):
    """Adding a method = declaring one class: it is listed, its slot is a model path and a CLI flag, and it runs
    through the shared processing (blend, seeds, options)."""
    from typer.testing import CliRunner

    from brushnet.cli import app
    from brushnet.methods import load_method

    assert "test-echo" in available_methods() and "echo_model" in model_slots()
    method = load_method("test-echo", {"echo_model": "anything"})
    image, mask = scene
    result = inpaint(method, image, mask, {**FAST, "num_images": 2, "options": {"gain": 1.0}})
    assert len(result.images) == 2 and np.array_equal(np.asarray(result.images[0]), np.asarray(image))
    assert result.parameters["models"] == {"echo_model": "anything", "allow_pickle": False}
    with pytest.raises(RequestError, match="gain"):
        inpaint(method, image, mask, {**FAST, "options": {"gain": -1}})
    # `brushnet methods` lists it with its model flag (a fresh process's CLI has the flag: tests/test_cli_flags.py)
    listed = CliRunner().invoke(app, ["methods"])
    assert "test-echo: Returns the input" in listed.output and "--echo-model" in listed.output


def test_repaint_refuses_a_scheduler_it_does_not_use(scene):
    image, mask = scene
    repaint = get_method_class("repaint")
    with pytest.raises(RequestError, match="repaint.*does not use scheduler 'unipc'"):
        prepare(repaint, image, mask, {**FAST, "scheduler": "unipc"})
    assert prepare(repaint, image, mask, FAST).request.scheduler == "ddim"  # its default when none is given
    assert prepare(get_method_class("brushnet"), image, mask, FAST).request.scheduler == "unipc"


@pytest.mark.parametrize(
    "request_update, message",
    [
        ({"steps": 0}, "steps"),
        ({"options": {"conditioning_scale": 9}}, "conditioning_scale"),
        ({"scheduler": "nope"}, "unknown scheduler"),
        ({"guidance_scale": float("nan")}, "^bad request: guidance_scale: Input should be a finite number$"),
        (
            {"options": {"conditioning_scale": float("inf")}},
            "conditioning_scale: Input should be a finite number$",
        ),
        (
            {"options": {"control_guidance_start": 0.9, "control_guidance_end": 0.1}},
            "^bad option for method 'brushnet': control_guidance_start must be below control_guidance_end$",
        ),
        ({"blend_kernel_size": 4}, "odd"),
        ({"unknown_field": 1}, "unknown field 'unknown_field'"),
        # lone surrogates (JSON's "\ud800" without its pair): were a TypeError of the tokenizer after loading
        (
            {"prompt": "a\ud800b"},
            r"prompt: not valid Unicode text: lone surrogate U\+D800 at character 1",
        ),
        ({"negative_prompt": "\udcff"}, r"negative_prompt: .*lone surrogate U\+DCFF at character 0"),
        (
            {"options": {"positive_prompt": ["x", "\ud800"]}},
            r"option positive_prompt\[1\] is not valid Unicode text",
        ),
        ({"options": {"\ud800": 1}}, r"option name '\\ud800' is not valid Unicode text"),
    ],
)
def test_prepare_checks_the_request_without_any_model(scene, request_update, message):
    image, mask = scene
    with pytest.raises(RequestError, match=message):
        prepare(get_method_class("brushnet"), image, mask, {**FAST, **request_update})


def test_a_scheduler_whose_package_is_missing_is_refused_before_loading(scene, monkeypatch):
    """``dpm++sde`` needs torchsde, which the project does not install: diffusers would fail at the first step."""
    import importlib.util

    from brushnet.schedulers import make_scheduler

    image, mask = scene
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torchsde" else real(name, *a)
    )
    message = "scheduler 'dpm\\+\\+sde' needs the torchsde package: pip install torchsde"
    with pytest.raises(RequestError, match=message):
        prepare(get_method_class("brushnet"), image, mask, {**FAST, "scheduler": "dpm++sde"})
    with pytest.raises(ValueError, match=message):
        make_scheduler("dpm++sde", {})
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "torchsde" else real(name, *a)
    )
    assert prepare(
        get_method_class("brushnet"), image, mask, {**FAST, "scheduler": "dpm++sde"}
    ).request.scheduler == ("dpm++sde")


def test_text_outside_the_basic_plane_is_valid(scene):
    image, mask = scene
    prompt = "ein Apfel \U0001f34e, ri\u0301pe"  # an astral character (a surrogate pair in JSON), a combining accent
    job = prepare(
        get_method_class("brushnet"), image, mask, {**FAST, "prompt": prompt, "negative_prompt": prompt}
    )
    assert job.request.prompt == job.request.negative_prompt == prompt


def test_prepare_checks_the_inputs(scene):
    image, mask = scene
    brushnet = get_method_class("brushnet")
    with pytest.raises(InputError, match="mask is empty"):
        prepare(brushnet, image, np.zeros((64, 64), bool), FAST)
    with pytest.raises(InputError, match="must match"):
        prepare(brushnet, image, np.ones((32, 64), bool), FAST)
    job = prepare(brushnet, image, mask, {**FAST, "mask_grow": 2, "seed": None})
    assert job.hole.sum() == (16 + 4) ** 2 and 0 <= job.seed < 2**32


@pytest.mark.parametrize(
    "name", ["brushnet", "sd-inpainting", "controlnet-inpaint", "blended-latent-diffusion"]
)
def test_progress_counts_the_schedulers_real_timesteps(load, scene, name):
    """PNDM's warm-up takes more timesteps than `steps`; the progress total is the real count, over all images,
    and reaches it exactly (a bar never runs past 100 %)."""
    method = load(name)
    seen = []
    inpaint(
        method,
        *scene,
        {**FAST, "scheduler": "pndm", "num_images": 2},
        on_step=lambda i, n: seen.append((i, n)),
    )
    pndm = make_scheduler("pndm", method.base_scheduler_config)
    pndm.set_timesteps(FAST["steps"])
    per_image = len(pndm.timesteps)
    assert per_image > FAST["steps"]
    calls = 2 if getattr(method, "per_image_calls", False) else 1
    total = per_image * calls
    assert seen[-1] == (total, total) and len(seen) == total
    assert all(done <= n for done, n in seen)


def test_the_documented_example_is_a_whole_method(tiny_models, scene):
    """docs/methods.md's "Adding a method" example, run as written: one class is a complete method."""
    import re
    from pathlib import Path

    from brushnet.methods import load_method, registry

    docs = (Path(__file__).parents[2] / "docs" / "methods.md").read_text()
    section = docs[docs.index("## Adding a method") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {"__name__": "docs_example"}
    try:
        exec(compile(code, "docs/methods.md", "exec"), namespace)
        assert "sdedit-inpaint" in available_methods()
        method = load_method("sdedit-inpaint", {"base": tiny_models["base"]})
        image, mask = scene
        result = inpaint(method, image, mask, {**FAST, "options": {"strength": 0.5}})
        assert result.parameters["options"] == {"strength": 0.5}
        assert result.unet_calls == 2 * 2  # strength 0.5 of 4 steps, CFG pair
        far = np.ones((64, 64), bool)
        far[24 - 10 : 40 + 10, 24 - 10 : 40 + 10] = False  # outside the 21 px feather of the 16 px hole
        assert np.array_equal(np.asarray(result.images[0])[far], np.asarray(image)[far])
    finally:
        registry._REGISTRY.pop("sdedit-inpaint", None)


def test_a_half_precision_load_on_the_cpu_does_not_warn_that_it_cannot_run(tiny_models, logged):
    """diffusers warns four times per load that a float16 pipeline "cannot run" on the CPU; this torch runs it
    (the CLI's --dtype fp16 run ended with exit 0 after the four warnings). Other warnings pass."""
    import logging

    import torch

    from brushnet.methods import load_method

    with logged("diffusers.pipelines.pipeline_utils") as messages:
        models = {"base": tiny_models["base"], "brushnet": tiny_models["brushnet"]}
        method = load_method("brushnet", models, dtype="fp16")
        logging.getLogger("diffusers.pipelines.pipeline_utils").warning("another warning")
    assert not [message for message in messages if "cannot run with `cpu`" in message]
    assert "another warning" in messages and method.pipeline.unet.dtype == torch.float16


def test_load_method_names_the_paths_it_ignores_and_refuses_a_config_for_a_folder_base(
    tiny_models, caplog, monkeypatch
):
    """A path the method does not read is a warning naming it (a set for several methods is fine: each takes its
    own); ``base_config`` with a folder base, which carries its own config, is refused before loading (it was
    ignored, and recorded with the result as if used)."""
    import logging

    from brushnet.errors import InputError
    from brushnet.methods import load_method

    monkeypatch.setattr(get_method_class("brushnet"), "load", classmethod(lambda *a, **k: 1 / 0))
    models = {"base": tiny_models["base"], "brushnet": tiny_models["brushnet"]}
    with pytest.raises(
        InputError, match="^--base-config is read only for a single-file --base or --inpaint-model"
    ):
        load_method("brushnet", {**models, "base_config": "/nonexistent/config"})
    with caplog.at_level(logging.WARNING, logger="brushnet.methods.registry"):
        with pytest.raises(ZeroDivisionError):  # the checks passed: it went on to load
            load_method("brushnet", {**models, "controlnet": tiny_models["controlnet"]})
    assert "method 'brushnet' does not read controlnet; ignored (it reads base, brushnet)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="brushnet.methods.registry"):
        with pytest.raises(ZeroDivisionError):
            load_method("brushnet", models)
    assert "does not read" not in caplog.text


@pytest.mark.parametrize("request_value", [["steps", 2], "steps=2", 3])
def test_a_request_that_is_no_mapping_is_one_line(scene, request_value):
    """``inpaint(..., request=[...])`` / ``InpaintRequest.build("...")``: was ``TypeError: 'list' object is not a
    mapping``."""
    from brushnet.methods import InpaintRequest

    with pytest.raises(
        RequestError, match="^request must be an InpaintRequest or a dict of its fields, got "
    ):
        InpaintRequest.build(request_value)
    with pytest.raises(RequestError, match="^request must be an InpaintRequest"):
        prepare(get_method_class("brushnet"), *scene, request_value)


def test_fp16_on_the_cpu_says_it_is_slow_and_a_relative_base_says_where_it_was_looked_for(
    tiny_models, caplog
):
    """fp16 on the CPU ran without a word, about 9x slower than fp32 (70 s against 8 s for the README's example);
    ``base model not found: tests/fixtures/golden_tiny`` from another folder did not say it was relative."""
    import logging
    import os

    from brushnet.errors import CheckpointError
    from brushnet.methods import load_method

    models = {"base": tiny_models["base"], "brushnet": tiny_models["brushnet"]}
    with caplog.at_level(logging.WARNING, logger="brushnet"):
        load_method("brushnet", models, dtype="fp16")
        load_method("brushnet", models, dtype="fp32")
    slow = [r for r in caplog.records if "fp16 on the CPU runs, but several times slower" in r.getMessage()]
    assert len(slow) == 1
    with pytest.raises(CheckpointError) as error:
        load_method("brushnet", {**models, "base": "no/such/base"})
    assert str(error.value) == f"base model not found: no/such/base (relative to {os.getcwd()})"
