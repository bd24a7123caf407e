"""Training a PowerPaint v2-style model: what learns (the branch and the task rows only), the loss reading the
task's texts, and a trained model written in a layout the method loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from brushnet.models.task_tokens import TASK_TOKENS, task_token_ids
from brushnet.training.loop import load_components
from brushnet.training.powerpaint import PowerPaintModel, powerpaint_training_loss


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from brushnet.random_models import build_base

    return build_base(tmp_path_factory.mktemp("pp_train") / "base", "tiny", seed=0)


@pytest.fixture(scope="module")
def components(base):
    parts = load_components(str(base))
    for module in parts.frozen_modules.values():
        module.requires_grad_(False).eval()
    return parts


def _model(components, trained: bool = True):
    """A fresh model; ``trained``: as after some training (taps not zero, so the branch's text reaches the
    output; task rows told apart), else exactly as ``from_base`` makes it."""
    family = components.family
    torch.manual_seed(0)
    model = PowerPaintModel.from_base(components.unet, family.text_encoder, family.tokenizer)
    if trained:
        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, param in model.brushnet.named_parameters():
                if name.startswith(("brushnet_down_blocks", "brushnet_mid_block", "brushnet_up_blocks")):
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
            rows = model.text_encoder.get_input_embeddings().weight[model.first_task_id :]
            rows.add_(torch.randn(rows.shape, generator=generator) * 0.5)
    return model


def _batch(tasks):
    generator = torch.Generator().manual_seed(1)
    size = len(tasks)
    mask = torch.zeros(size, 1, 64, 64)
    mask[:, :, 16:48, 16:48] = 1
    return {
        "pixel_values": torch.rand(size, 3, 64, 64, generator=generator) * 2 - 1,
        "mask": mask,
        "caption": ["a cat"] * size,
        "task": list(tasks),
    }


def test_fresh_model_task_rows_are_copies_of_a(components):
    model = _model(components, trained=False)
    tokenizer, table = model.tokenizer, model.text_encoder.get_input_embeddings().weight
    a = tokenizer("a").input_ids[1]
    ids = task_token_ids(tokenizer)
    assert list(ids) == list(TASK_TOKENS) and min(ids["P_ctxt"]) == model.first_task_id == table.shape[0] - 30
    assert torch.equal(table[model.first_task_id :], table[a].expand(30, -1))
    assert model.brushnet.uses_text
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "text_encoder.embeddings.token_embedding.weight" in trainable
    assert not {
        name for name in trainable if name.startswith("text_encoder.") and "token_embedding" not in name
    }


def test_only_the_branch_and_the_task_rows_learn(components):
    """One AdamW step with weight decay: the base vocabulary's rows come back unchanged (restored before each
    step), the task rows the batch used move, the other task rows do not; the frozen base does not change."""
    model = _model(components)
    table = model.text_encoder.get_input_embeddings().weight
    before = table.detach().clone()
    unet_before = {k: v.clone() for k, v in components.unet.state_dict().items()}
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1
    )
    loss = powerpaint_training_loss(
        model, components, _batch(["object-removal", "text-guided"]), torch.Generator().manual_seed(0)
    )
    assert torch.isfinite(loss)
    loss.backward()
    assert table.grad[: model.first_task_id].abs().max() == 0
    ids = task_token_ids(model.tokenizer)
    assert table.grad[ids["P_ctxt"]].abs().max() > 0 and table.grad[ids["P_obj"]].abs().max() > 0
    assert table.grad[ids["P_shape"]].abs().max() == 0  # no shape-guided sample in the batch
    assert model.brushnet.brushnet_down_blocks[0].weight.grad.abs().max() > 0
    optimizer.step()
    model.restore_base_rows()
    assert torch.equal(table[: model.first_task_id], before[: model.first_task_id])
    assert not torch.equal(table[ids["P_ctxt"]], before[ids["P_ctxt"]])
    assert all(torch.equal(v, unet_before[k]) for k, v in components.unet.state_dict().items())


def test_the_branch_reads_the_task_and_the_unet_the_users_words(components, monkeypatch):
    model = _model(components)
    seen = {}

    def spy_encode(captions, device, dtype, batch=None):
        seen["unet"] = list(captions)
        return original(captions, device, dtype, batch)

    original = components.family.encode
    monkeypatch.setattr(components.family, "encode", spy_encode)
    branch_texts = []
    handle = model.brushnet.register_forward_pre_hook(
        lambda m, a, kw: branch_texts.append(kw["encoder_hidden_states"].detach().clone()), with_kwargs=True
    )
    try:
        tasks = ["text-guided", "object-removal", "outpainting", "shape-guided"]
        powerpaint_training_loss(model, components, _batch(tasks), torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert seen["unet"] == ["a cat", "a cat empty scene blur", "a cat empty scene", "a cat"]
    hidden = branch_texts[0]
    assert not torch.equal(hidden[0], hidden[3])  # P_obj vs P_shape
    assert torch.equal(hidden[1], hidden[2])  # both P_ctxt
    with pytest.raises(ValueError, match="unknown PowerPaint task 'removal'"):
        powerpaint_training_loss(model, components, _batch(["removal"]), torch.Generator())


def test_a_trained_model_loads_as_the_powerpaint_method(components, base, tmp_path):
    from brushnet.methods import inpaint, load_method

    model = _model(components)
    with torch.no_grad():
        model.text_encoder.get_input_embeddings().weight[model.first_task_id :] += 1.0
        model.brushnet.brushnet_mid_block.weight.add_(0.1)
    model.save_pretrained(tmp_path / "pp")
    method = load_method("powerpaint", {"base": str(base), "powerpaint": str(tmp_path / "pp")})
    loaded = method.pipeline.text_encoder_brushnet.get_input_embeddings().weight
    assert torch.equal(loaded, model.text_encoder.get_input_embeddings().weight)
    assert torch.equal(
        method.pipeline.brushnet.brushnet_mid_block.weight, model.brushnet.brushnet_mid_block.weight
    )
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    result = inpaint(method, image, Image.fromarray(mask), steps=2, seed=0, options={"task": "object-removal"})
    assert result.images[0].size == (64, 64)
