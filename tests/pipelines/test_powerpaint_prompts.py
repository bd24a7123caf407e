"""PowerPaint's task prompts built as the original builds them: the strings (against every prompt the original
app handed to its pipelines), their token ids, and the interpolated embeddings each model receives (against
the tensors captured inside the original pipelines)."""

from __future__ import annotations

import json

import pytest
import torch

from brushnet.models.task_tokens import expand_task_tokens
from brushnet.pipelines.powerpaint_prompts import TASKS, encode_task_prompts, encode_text, task_prompts

from .conftest import POWERPAINT

APP = json.loads((POWERPAINT / "app_level.json").read_text())["records"]
OUR_TASK = {"image-outpainting": "outpainting"}  # the original app's name for our `outpainting`
# the user's two text boxes of the pipeline-level runs (tools/powerpaint_reference/make_fixtures.py)
USER = {
    "text-guided": ("a red ball", "ugly"),
    "shape-guided": ("a red ball", "ugly"),
    "object-removal": ("", ""),
    "image-outpainting": ("", ""),
    "context-aware": ("empty scene", ""),  # ComfyUI-BrushNet's advice: say "empty scene" yourself
}
KEYS = {  # the original's argument names
    "promptA": "prompt_a",
    "promptB": "prompt_b",
    "negative_promptA": "negative_a",
    "negative_promptB": "negative_b",
    "promptU": "unet_prompt",
    "negative_promptU": "unet_negative",
}


def _as_original(built, version):
    out = {original: getattr(built, ours) for original, ours in KEYS.items()}
    if version == "v1":
        del out["promptU"], out["negative_promptU"]
    return out


@pytest.mark.parametrize("record", APP, ids=[r["id"] for r in APP])
def test_strings_equal_what_the_original_app_passes(record):
    """Every app.py record (v1 and v2, every task, outpainting at four expansion ratios): the exact strings,
    spaces included, built from the user's text boxes."""
    version = record["version"].removeprefix("ppt-")
    built = task_prompts(
        OUR_TASK.get(record["task"], record["task"]),
        record["user_prompt"],
        record["user_negative_prompt"],
        version,
    )
    recorded = {k: record["pipeline_kwargs"][k] for k in _as_original(built, version)}
    assert _as_original(built, version) == recorded
    assert (
        record["pipeline_kwargs"]["tradoff"]
        == record["pipeline_kwargs"]["tradoff_nag"]
        == record["fitting_degree"]
    )


def test_every_task_and_version_has_rules():
    for version in ("v1", "v2"):
        for task in TASKS:
            built = task_prompts(task, "a cat", "dog", version)
            assert (built.unet_prompt is None) == (version == "v1")
    assert task_prompts("shape-guided", "x", "", "v2").prompt_b == " P_ctxt"
    with pytest.raises(ValueError, match="unknown PowerPaint task 'image-outpainting'"):
        task_prompts("image-outpainting")
    with pytest.raises(ValueError, match="unknown PowerPaint version"):
        task_prompts("text-guided", version="v3")


def _runs(reference, guidance):
    runs, _ = reference
    return [r for r in runs.values() if r["guidance_scale"] == guidance]


def test_pipeline_level_prompts_and_token_ids(powerpaint_reference, powerpaint_pipes):
    """The strings of the 22 pipeline-level runs and the ids our tokenizers give them (task words expanded into
    their ten placeholders) equal the recorded ones."""
    runs, _ = powerpaint_reference
    for run in runs.values():
        version = run["version"].removeprefix("ppt-")
        prompt, negative = USER[run["task"]]
        built = _as_original(
            task_prompts(OUR_TASK.get(run["task"], run["task"]), prompt, negative, version), version
        )
        recorded = {k: v for k, v in run["prompts"].items() if k in KEYS}
        if run["task"] == "context-aware":  # the fixture wrote the UNet prompt as "" + " empty scene"
            assert recorded.pop("promptU").strip() == built.pop("promptU")
            recorded = {k: v for k, v in recorded.items() if k in built}
        assert built == recorded, run["id"]
        pipe = powerpaint_pipes[version]
        tokenizer = pipe.tokenizer_brushnet if version == "v2" else pipe.tokenizer
        for key, text in built.items():
            if key.endswith("U"):  # the UNet reads the user's words through the plain base tokenizer
                ids = pipe.tokenizer(text).input_ids
            else:
                ids = tokenizer(expand_task_tokens(text)).input_ids
            assert ids == run["token_ids"][key], (run["id"], key)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_embeddings_equal_the_ones_the_original_models_received(
    powerpaint_reference, powerpaint_pipes, version
):
    """v1: the UNet's encoder_hidden_states; v2: the branch's (task words through its own encoder) and the UNet's
    (user words through the base encoder); [negative, positive] with guidance, as captured in the original."""
    runs, tensors = powerpaint_reference
    pipe = powerpaint_pipes[version]
    worst = 0.0
    for run in [r for r in _runs(powerpaint_reference, 7.5) if r["version"] == f"ppt-{version}"]:
        prompt, negative = USER[run["task"]]
        built = task_prompts(OUR_TASK.get(run["task"], run["task"]), prompt, negative, version)
        t = run["fitting_degree"]
        encoder = pipe.text_encoder_brushnet if version == "v2" else pipe.text_encoder
        tokenizer = pipe.tokenizer_brushnet if version == "v2" else pipe.tokenizer
        with torch.no_grad():
            task_embeds = torch.cat(
                [
                    encode_task_prompts(encoder, tokenizer, [built.negative_a], [built.negative_b], t),
                    encode_task_prompts(encoder, tokenizer, [built.prompt_a], [built.prompt_b], t),
                ]
            )
            key = run["embeddings"]["unet_encoder_hidden_states"].removesuffix(".unet")
            if version == "v2":
                worst = max(worst, float((task_embeds - tensors[key + ".brushnet"]).abs().max()))
                positive, negative_embeds = pipe.encode_prompt(
                    [built.unet_prompt], "cpu", 1, True, [built.unet_negative]
                )
                unet_embeds = torch.cat([negative_embeds, positive])
            else:
                unet_embeds = task_embeds
        worst = max(worst, float((unet_embeds - tensors[key + ".unet"]).abs().max()))
    assert worst < 1e-5, worst


def test_fitting_degree_interpolates_the_two_prompts(powerpaint_pipes):
    pipe = powerpaint_pipes["v2"]
    encoder, tokenizer = pipe.text_encoder_brushnet, pipe.tokenizer_brushnet
    with torch.no_grad():
        shape = encode_text(encoder, tokenizer, ["P_shape"])
        context = encode_text(encoder, tokenizer, ["P_ctxt"])
        mixed = encode_task_prompts(encoder, tokenizer, ["P_shape"], ["P_ctxt"], 0.3)
    torch.testing.assert_close(mixed, 0.3 * shape + 0.7 * context)
    assert (shape - context).abs().max() > 0.1  # the task words differ, so the degree matters


def test_a_prompt_that_would_cut_its_task_word_is_refused(powerpaint_pipes):
    pipe = powerpaint_pipes["v1"]
    long = "a " * 100 + "P_obj"
    with pytest.raises(ValueError, match="prompt too long: its task word would be cut at 77 tokens"):
        encode_text(pipe.text_encoder, pipe.tokenizer, [long])
    encode_text(pipe.text_encoder, pipe.tokenizer, ["a " * 100])  # a long prompt without a task word is cut
