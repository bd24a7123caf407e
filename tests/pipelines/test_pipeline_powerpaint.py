"""PowerPaint v1 and v2 pipelines against the original code's outputs (tests/fixtures/powerpaint, open-mmlab/
PowerPaint 5b4c3d5 on tiny random weights), every task, guidance on and off; and every file layout loading.

What is compared: the final images (``output_type="np"``, 48×48) of our pipelines called with the task, the
user's prompts and the image/mask the original app hands to its pipelines, the start noise drawn from a CPU
generator seeded 1234 as in the fixture runs, and the schedulers the app uses. The prompts and embeddings
themselves are checked in test_powerpaint_prompts.py. The original's v2 raises without guidance; its
``cfg_off`` records come from the original with that one bug patched (FACTS.md, "Known bugs")."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from brushnet.errors import CheckpointError
from brushnet.loading_powerpaint import find_powerpaint, load_powerpaint_pipeline, save_powerpaint
from brushnet.random_models import build_base
from brushnet.schedulers import make_scheduler

from .conftest import POWERPAINT
from .test_powerpaint_prompts import OUR_TASK, USER

TOLERANCE = 1e-4  # the bar; measured: at most 1.3e-6 (fp32, CPU)
RUN_IDS = [
    f"{v}.{t}.{c}"
    for v, tasks in (
        (
            "v1",
            [
                "text-guided",
                "shape-guided_fd0.5",
                "shape-guided_fd1.0",
                "object-removal",
                "image-outpainting",
            ],
        ),
        (
            "v2",
            [
                "text-guided",
                "shape-guided_fd0.5",
                "shape-guided_fd1.0",
                "object-removal",
                "image-outpainting",
                "context-aware",
            ],
        ),
    )
    for t in tasks
    for c in ("cfg_on", "cfg_off")
]


def run_like_the_fixture(pipe, run, **overrides):
    return pipe(**{**_fixture_arguments(run), **overrides}).images[0]


def _fixture_arguments(run) -> dict:
    prompt, negative = USER[run["task"]]
    return dict(
        prompt=prompt,
        negative_prompt=negative,
        image=Image.open(POWERPAINT / run["image_passed_to_pipeline"]),
        mask_image=Image.open(POWERPAINT / run["mask"]),
        task=OUR_TASK.get(run["task"], run["task"]),
        fitting_degree=run["fitting_degree"],
        height=48,
        width=48,
        guidance_scale=run["guidance_scale"],
        num_inference_steps=run["num_inference_steps"],
        generator=torch.Generator().manual_seed(run["seed"]),
        output_type="np",
    )


@pytest.mark.parametrize("run_id", RUN_IDS)
def test_matches_the_original(powerpaint_reference, powerpaint_pipes, run_id):
    runs, tensors = powerpaint_reference
    run = runs[run_id]
    assert run["patched"] == (run_id.startswith("v2") and run_id.endswith("cfg_off"))
    out = run_like_the_fixture(powerpaint_pipes[run_id[:2]], run)
    error = float(np.abs(out - tensors[run["output_key"]].numpy()).max())
    assert error < TOLERANCE, error


def test_the_branch_and_the_fitting_degree_matter(powerpaint_reference, powerpaint_pipes):
    """Negative controls: switching the v2 branch off, or a wrong fitting degree, moves the output far beyond the
    tolerance (so the comparisons above can fail)."""
    runs, tensors = powerpaint_reference
    off = run_like_the_fixture(
        powerpaint_pipes["v2"], runs["v2.text-guided.cfg_on"], brushnet_conditioning_scale=0.0
    )
    assert np.abs(off - tensors["out.v2.text-guided.cfg_on"].numpy()).max() > 0.1
    shape = run_like_the_fixture(
        powerpaint_pipes["v1"], runs["v1.shape-guided_fd0.5.cfg_on"], fitting_degree=1.0
    )
    assert np.abs(shape - tensors["out.v1.shape-guided_fd0.5.cfg_on"].numpy()).max() > 0.01


def test_whole_image_equals_the_blacked_out_one(powerpaint_reference, powerpaint_pipes):
    """The app blacks the hole out before calling the v2 pipeline; ours does it itself, so the whole image gives
    the same result."""
    runs, tensors = powerpaint_reference
    run = runs["v2.object-removal.cfg_on"]
    out = run_like_the_fixture(powerpaint_pipes["v2"], run, image=Image.open(POWERPAINT / "image.png"))
    assert np.abs(out - tensors[run["output_key"]].numpy()).max() < TOLERANCE


def test_given_branch_embeddings_are_repeated_per_image_and_a_lone_negative_is_used(
    powerpaint_reference, powerpaint_pipes
):
    """Branch embeddings passed in were used as given: with num_images_per_prompt 2 the batch did not match
    (RuntimeError), and a negative passed without the positive was dropped (the output unchanged)."""
    from brushnet.pipelines.powerpaint_prompts import task_prompts

    runs, _ = powerpaint_reference
    run = runs["v2.text-guided.cfg_on"]
    pipe = powerpaint_pipes["v2"]
    prompt, negative = USER[run["task"]]
    built = [task_prompts(OUR_TASK.get(run["task"], run["task"]), prompt, negative, version="v2")]
    positive, negative_embeds = pipe.encode_task_prompt(built, run["fitting_degree"], 1.0, "cpu", 1, True)

    def two():  # fresh generators for each call
        return {
            "num_images_per_prompt": 2,
            "generator": [torch.Generator().manual_seed(run["seed"] + i) for i in (0, 1)],
        }

    from_task = pipe(**{**_fixture_arguments(run), **two()}).images
    given = pipe(
        **{**_fixture_arguments(run), **two()},
        brushnet_prompt_embeds=positive,
        negative_brushnet_prompt_embeds=negative_embeds,
    ).images
    assert np.abs(given - from_task).max() < 1e-5
    plain = run_like_the_fixture(pipe, run)
    other = run_like_the_fixture(pipe, run, negative_brushnet_prompt_embeds=negative_embeds * 0 + 5.0)
    assert np.abs(other - plain).max() > 1e-3


def test_v1_takes_clip_skip_and_the_text_encoders_lora_scale(powerpaint_reference, powerpaint_pipes):
    """v1 encodes its task prompts itself and hands diffusers the embeddings, so diffusers' clip_skip and the
    text encoder's LoRA scale (cross_attention_kwargs={"scale": s}) never applied: the output did not change."""
    from peft import LoraConfig, inject_adapter_in_model

    runs, _ = powerpaint_reference
    run = runs["v1.text-guided.cfg_on"]
    pipe = copy.deepcopy(powerpaint_pipes["v1"])
    plain = run_like_the_fixture(pipe, run)
    assert np.abs(run_like_the_fixture(pipe, run, clip_skip=1) - plain).max() > 1e-3
    torch.manual_seed(0)  # transformers' add_adapter needs a newer peft than the one installed here
    inject_adapter_in_model(
        LoraConfig(r=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"]), pipe.text_encoder
    )
    with_lora = run_like_the_fixture(pipe, run)
    assert np.abs(with_lora - plain).max() > 1e-3
    muted = run_like_the_fixture(pipe, run, cross_attention_kwargs={"scale": 0.0})
    assert np.abs(muted - plain).max() < 1e-5


def test_bad_arguments_are_errors(powerpaint_reference, powerpaint_pipes):
    runs, _ = powerpaint_reference
    run = runs["v2.text-guided.cfg_on"]
    for version in ("v1", "v2"):
        with pytest.raises(ValueError, match="unknown PowerPaint task 'image-outpainting'"):
            run_like_the_fixture(powerpaint_pipes[version], run, task="image-outpainting")
        with pytest.raises(ValueError, match="fitting_degree"):
            run_like_the_fixture(powerpaint_pipes[version], run, fitting_degree=1.5)
    with pytest.raises(TypeError, match="num_inference_stpes"):
        powerpaint_pipes["v1"](prompt="x", num_inference_stpes=3)


# ---- layouts -------------------------------------------------------------------------------------------------


def _base_v2():
    return POWERPAINT / "v2" / "ppt-v2" / "realisticVisionV60B1_v51VAE"


def _rerun(pipe, run, version):
    if version == "v2":
        pipe.scheduler = make_scheduler("unipc-original", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return run_like_the_fixture(pipe, run)


def test_released_v2_branch_without_config_is_built_for_the_base(powerpaint_reference, tmp_path):
    """The app reads no branch config: the released folder loads with or without config.json, identically."""
    runs, tensors = powerpaint_reference
    folder = tmp_path / "ppt-v2"
    shutil.copytree(POWERPAINT / "v2" / "ppt-v2" / "PowerPaint_Brushnet", folder / "PowerPaint_Brushnet")
    (folder / "PowerPaint_Brushnet" / "config.json").unlink()
    files = find_powerpaint(folder)
    assert (files.version, files.layout) == ("v2", "released")
    pipe, _ = load_powerpaint_pipeline(folder / "PowerPaint_Brushnet", _base_v2())  # the subfolder works too
    run = runs["v2.shape-guided_fd0.5.cfg_on"]
    assert np.abs(_rerun(pipe, run, "v2") - tensors[run["output_key"]].numpy()).max() < TOLERANCE


def test_diffusers_layouts_round_trip(powerpaint_reference, powerpaint_pipes, powerpaint_v1_base, tmp_path):
    """v2 written as PowerPaint_Brushnet/ + text_encoder_brushnet/ (IOPaint's layout, fp16 variant too) and v1 as
    unet/ + text_encoder/ folders load back to the same outputs."""
    runs, tensors = powerpaint_reference
    v2 = powerpaint_pipes["v2"]
    save_powerpaint(tmp_path / "v2", v2.brushnet, v2.text_encoder_brushnet)
    assert find_powerpaint(tmp_path / "v2").layout == "diffusers"
    run = runs["v2.text-guided.cfg_on"]
    pipe, _ = load_powerpaint_pipeline(tmp_path / "v2", _base_v2())
    assert np.abs(_rerun(pipe, run, "v2") - tensors[run["output_key"]].numpy()).max() < TOLERANCE

    half = tmp_path / "v2-fp16"
    # fp16 copies: the session's pipeline keeps its float32 weights
    copy.deepcopy(v2.brushnet).half().save_pretrained(half / "PowerPaint_Brushnet", variant="fp16")
    copy.deepcopy(v2.text_encoder_brushnet).half().save_pretrained(
        half / "text_encoder_brushnet", variant="fp16"
    )
    pipe, _ = load_powerpaint_pipeline(half, _base_v2())
    assert pipe.brushnet.dtype == torch.float32  # fp16 files, loaded in the requested dtype
    assert np.abs(_rerun(pipe, run, "v2") - tensors[run["output_key"]].numpy()).max() < 0.05

    v1 = powerpaint_pipes["v1"]
    v1.unet.save_pretrained(tmp_path / "v1" / "unet")
    v1.text_encoder.save_pretrained(tmp_path / "v1" / "text_encoder")
    assert (find_powerpaint(tmp_path / "v1").version, find_powerpaint(tmp_path / "v1").layout) == (
        "v1",
        "diffusers",
    )
    pipe, _ = load_powerpaint_pipeline(tmp_path / "v1", powerpaint_v1_base)
    run = runs["v1.object-removal.cfg_on"]
    assert np.abs(_rerun(pipe, run, "v1") - tensors[run["output_key"]].numpy()).max() < TOLERANCE


class _NotATensor:
    pass


def test_a_released_layout_with_an_fp16_copy_loads_the_full_precision_weights(tmp_path):
    """``sorted`` put ``diffusion_pytorch_model.fp16.safetensors`` first: a folder holding both loaded the copy."""
    from safetensors.torch import load_file, save_file

    root = tmp_path / "ppt-v2"
    shutil.copytree(POWERPAINT / "v2" / "ppt-v2", root)
    branch_dir = root / "PowerPaint_Brushnet"
    (branch_dir / "config.json").unlink()  # as released: the branch is built from the base's UNet
    full = load_file(branch_dir / "diffusion_pytorch_model.safetensors")
    save_file(
        {k: torch.zeros_like(v).half() for k, v in full.items()},
        branch_dir / "diffusion_pytorch_model.fp16.safetensors",
    )
    pipe, _ = load_powerpaint_pipeline(root, root / "realisticVisionV60B1_v51VAE")
    loaded = pipe.brushnet.state_dict()
    assert all(torch.equal(loaded[k].float(), full[k].float()) for k in full)


def test_the_released_bin_runs_no_pickled_code(tmp_path):
    """``pytorch_model.bin`` is read with ``torch.load(weights_only=True)``: a file holding anything but tensors
    is refused (one line naming --allow-pickle) before any of its objects is built."""
    folder = tmp_path / "ppt-v2" / "PowerPaint_Brushnet"
    shutil.copytree(POWERPAINT / "v2" / "ppt-v2" / "PowerPaint_Brushnet", folder)
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    torch.save(
        {**state, "extra": _NotATensor()},
        folder / "pytorch_model.bin",
    )
    with pytest.raises(CheckpointError, match="holds more than tensors.*--allow-pickle"):
        load_powerpaint_pipeline(folder.parent, _base_v2())
    with pytest.raises(CheckpointError, match="is not a state dict of tensors"):
        load_powerpaint_pipeline(folder.parent, _base_v2(), allow_pickle=True)


def test_wrong_folders_are_one_line_errors(tmp_path, powerpaint_v1_base):
    with pytest.raises(CheckpointError, match="not found"):
        find_powerpaint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        CheckpointError, match=r"expected PowerPaint_Brushnet/ \(v2, v2-1\) or unet/ \+ text_encoder/"
    ):
        find_powerpaint(tmp_path / "empty")
    lonely = tmp_path / "lonely" / "PowerPaint_Brushnet"
    lonely.mkdir(parents=True)
    shutil.copy(POWERPAINT / "v2/ppt-v2/PowerPaint_Brushnet/diffusion_pytorch_model.safetensors", lonely)
    with pytest.raises(CheckpointError, match="not its text encoder"):
        find_powerpaint(lonely.parent)
    shutil.copy(POWERPAINT / "v2/ppt-v2/PowerPaint_Brushnet/pytorch_model.bin", lonely)
    with pytest.raises(
        CheckpointError, match=r"pytorch_model.bin: .* has shape \(64, 32\), expected \(37, 32\)"
    ):
        load_powerpaint_pipeline(lonely.parent, build_base(tmp_path / "tiny_base", "tiny"))
    with pytest.raises(CheckpointError, match="does not fit the PowerPaint v2 branch"):
        load_powerpaint_pipeline(lonely.parent, _wider_unet_base(tmp_path))


def _wider_unet_base(tmp_path):
    """The fixture's v2 base with a UNet of other widths: the text encoder fits, the branch file does not."""
    from diffusers import UNet2DConditionModel

    base = tmp_path / "wider"
    shutil.copytree(_base_v2(), base)
    config = UNet2DConditionModel.load_config(base / "unet")
    UNet2DConditionModel.from_config({**config, "block_out_channels": [8, 8, 16, 32]}).save_pretrained(
        base / "unet"
    )
    return base


def test_v1_expands_a_multi_vector_textual_inversion_token(powerpaint_pipes):
    """PowerPaint v1 tokenized the user's text without diffusers' ``maybe_convert_prompt``: a 2-vector token kept
    only its first vector (the same image as a 1-vector token), where diffusers' inpainting pipeline uses both."""
    import copy

    pipe = copy.deepcopy(powerpaint_pipes["v1"])
    vectors = torch.randn(2, pipe.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(0))
    pipe.load_textual_inversion({"<tok>": vectors * 5})
    pipe.load_textual_inversion({"<one>": vectors[:1] * 5})  # the first vector alone

    def embeds(prompt: str, negative: str = "") -> torch.Tensor:
        return pipe.encode_task_prompt("text-guided", [prompt], [negative], 1.0, 1.0, True)

    with torch.no_grad():
        two, two_negative = embeds("a <tok> cat", "<tok>")
        one, one_negative = embeds("a <one> cat", "<one>")
    assert not torch.equal(two, one) and not torch.equal(two_negative, one_negative)
    assert pipe.maybe_convert_prompt("a <tok> cat", pipe.tokenizer) == "a <tok> <tok>_1 cat"


def test_v2_takes_diffusers_one_element_list_window(powerpaint_reference, powerpaint_pipes):
    """As the BrushNet pipelines: ``control_guidance_start=[0.5]`` is the number 0.5 (it was a TypeError)."""
    runs, _ = powerpaint_reference
    run = runs["v2.text-guided.cfg_on"]
    listed = run_like_the_fixture(powerpaint_pipes["v2"], run, control_guidance_start=[0.5])
    number = run_like_the_fixture(powerpaint_pipes["v2"], run, control_guidance_start=0.5)
    np.testing.assert_array_equal(listed, number)
