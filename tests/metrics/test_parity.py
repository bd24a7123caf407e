"""Parity with the reference packages on random weights. Each test runs only where its package imports
(torchmetrics, lpips, open_clip and ImageReward all need torchvision except torchmetrics' pixel
metrics); elsewhere it is skipped."""

import json
import re

import pytest
import torch

from brushnet.metrics.hps import OpenCLIP, OpenCLIPConfig, tokenize_open_clip
from brushnet.metrics.lpips import LPIPSSqueeze, lpips_distance
from brushnet.metrics.pixel import keep_masked, mse, psnr, ssim

# lpips' slices of squeezenet1_1.features (module names inside a slice keep the features index).
SLICE_OF_FEATURE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 2, 5: 3, 6: 3, 7: 3, 8: 4, 9: 4, 10: 5, 11: 6, 12: 7}


def _mask(n, h, w):
    mask = torch.zeros(n, 1, h, w)
    mask[..., h // 4 : 3 * h // 4, : w // 2] = 1
    return mask


def test_pixel_metrics_match_torchmetrics(images):
    functional = pytest.importorskip("torchmetrics.functional")
    generated, original = (t.double() for t in images)
    mask = _mask(2, 40, 48)
    for i in range(2):
        g, o = (
            keep_masked(generated[i : i + 1], mask[i : i + 1]),
            keep_masked(original[i : i + 1], mask[i : i + 1]),
        )
        torch.testing.assert_close(
            ssim(generated, original, mask)[i],
            functional.structural_similarity_index_measure(g, o, data_range=1.0).double(),
        )
        torch.testing.assert_close(
            mse(generated, original, mask)[i], functional.mean_squared_error(g, o).double()
        )
        torch.testing.assert_close(
            psnr(generated, original, mask)[i],
            functional.peak_signal_noise_ratio(g, o, data_range=1.0).double(),
        )


def _lpips_slices_to_ours(state_dict):
    """Reference LPIPS state dict -> ours. The backbone is split into slices, named ``net.slice{k}.{i}.*`` by
    the lpips package and ``net.slices.{k}.{i}.*`` by torchmetrics 1.9 (``i`` = torchvision's index, ours);
    the heads are ``lin{k}.*`` and again as the list ``lins.{k}.*`` (torchmetrics 1.9 keeps only the list)."""
    converted, listed = {}, {}
    for key, value in state_dict.items():
        backbone = re.match(r"net\.(?:slice\d+|slices\.\d+)\.(\d+\..+)$", key)
        head = re.match(r"lins\.(\d+)\.(.+)$", key)
        if backbone:
            converted[f"net.features.{backbone.group(1)}"] = value
        elif re.match(r"lin\d+\.", key):
            converted[key] = value
        elif head:
            listed[f"lin{head.group(1)}.{head.group(2)}"] = value
    for key, value in listed.items():
        converted.setdefault(key, value)
    return converted


@pytest.mark.parametrize("package", ["lpips", "torchmetrics"])
def test_lpips_matches_reference(package, images):
    if package == "lpips":
        lpips = pytest.importorskip("lpips")
        reference = lpips.LPIPS(pretrained=False, net="squeeze", pnet_rand=True, verbose=False)
    else:
        module = pytest.importorskip("torchmetrics.functional.image.lpips")
        try:
            reference = module._LPIPS(pretrained=False, net="squeeze", pnet_rand=True)
        except ModuleNotFoundError as error:  # torchvision missing
            pytest.skip(str(error))
    torch.manual_seed(0)
    for name, param in reference.named_parameters():
        if name.startswith("lin"):
            param.data = torch.rand_like(param)
    reference.eval()
    ours = LPIPSSqueeze()
    ours.load_state_dict(_lpips_slices_to_ours(reference.state_dict()))
    generated, original = images
    mask = _mask(2, 40, 48)
    with torch.no_grad():
        expected = reference(
            keep_masked(generated, mask) * 2 - 1, keep_masked(original, mask) * 2 - 1
        ).flatten()
    torch.testing.assert_close(
        lpips_distance(ours.eval(), generated, original, mask), expected, atol=1e-6, rtol=1e-5
    )


def test_hps_towers_match_open_clip(clip_tokenizer_dir):
    open_clip = pytest.importorskip("open_clip")
    from transformers import CLIPTokenizer

    config = OpenCLIPConfig(16, 28, 14, 32, 2, 2, 77, 514, 24, 2, 2)
    torch.manual_seed(0)
    reference = open_clip.model.CLIP(
        embed_dim=16,
        vision_cfg=open_clip.model.CLIPVisionCfg(
            layers=2, width=32, head_width=16, patch_size=14, image_size=28
        ),
        text_cfg=open_clip.model.CLIPTextCfg(context_length=77, vocab_size=514, width=24, heads=2, layers=2),
    ).eval()
    ours = OpenCLIP(config)
    ours.load_state_dict(reference.state_dict(), strict=True)
    pixel_values = torch.randn(2, 3, 28, 28)
    ids = tokenize_open_clip(
        CLIPTokenizer.from_pretrained(clip_tokenizer_dir), ["a cat", "a red dog on the sofa"]
    )
    with torch.no_grad():
        torch.testing.assert_close(
            ours.encode_image(pixel_values), reference.encode_image(pixel_values), atol=1e-5, rtol=1e-4
        )
        torch.testing.assert_close(ours.encode_text(ids), reference.encode_text(ids), atol=1e-5, rtol=1e-4)


BLIP_MED_CONFIG = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": 30524,
    "encoder_width": 768,
    "add_cross_attention": True,
}


@pytest.mark.slow
def test_image_reward_matches_package(tmp_path):
    """Full-size ImageReward v1.0 architecture on random weights vs the `ImageReward` package."""
    package = pytest.importorskip("ImageReward.ImageReward")
    from brushnet.metrics.image_reward import ImageReward

    (tmp_path / "med_config.json").write_text(json.dumps(BLIP_MED_CONFIG))
    try:
        reference = package.ImageReward(med_config=str(tmp_path / "med_config.json"), device="cpu").eval()
    except OSError as error:  # its BLIP tokenizer wants bert-base-uncased from the Hub
        pytest.skip(str(error))
    ours = ImageReward()
    state_dict = {
        k: v for k, v in reference.state_dict().items() if k != "blip.text_encoder.embeddings.position_ids"
    }
    ours.load_state_dict(state_dict, strict=True)
    pixel_values = torch.randn(1, 3, 224, 224)
    input_ids = torch.tensor([[101, 1037, 4937, 102] + [0] * 31])
    attention_mask = (input_ids != 0).long()
    with torch.no_grad():
        embeds = reference.blip.visual_encoder(pixel_values)
        hidden = reference.blip.text_encoder(
            input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=embeds,
            encoder_attention_mask=torch.ones(embeds.shape[:-1], dtype=torch.long),
            return_dict=True,
        ).last_hidden_state[:, 0]
        expected = ((reference.mlp(hidden) - reference.mean) / reference.std).flatten()
        torch.testing.assert_close(
            ours(pixel_values, input_ids, attention_mask), expected, atol=1e-4, rtol=1e-4
        )


@pytest.mark.parametrize("size, atol", [((32, 32), 1e-3), ((64, 80), 0.05)])
def test_clip_score_matches_torchmetrics(tiny_clip_dir, tmp_path, size, atol):
    """At the model's input size neither side resizes (tight); larger images differ by PIL-vs-torch
    bicubic resampling (loose)."""
    clip_score_module = pytest.importorskip("torchmetrics.functional.multimodal.clip_score")
    from transformers import CLIPImageProcessor

    from brushnet.metrics.clip_score import clip_image_embeddings, clip_score, clip_text_embeddings, load_clip

    model, tokenizer = load_clip(tiny_clip_dir)
    image = torch.randint(
        0, 256, (1, 3, *size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    caption = ["a red dog on the sofa"]
    with torch.no_grad():
        cosine = (
            clip_image_embeddings(model, image / 255) * clip_text_embeddings(model, tokenizer, caption)
        ).sum()
        if cosine < 0:  # random weights: make the cosine positive so the clamp at 0 does not hide differences
            model.visual_projection.weight.neg_()
    folder = tmp_path / "openai" / "tiny-clip"  # torchmetrics loads local folders whose path names "openai"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    ours = clip_score(model, tokenizer, image / 255, caption)
    assert ours.item() > 0
    try:
        expected = clip_score_module.clip_score(image[0], caption[0], model_name_or_path=str(folder))
    except AttributeError as error:  # torchmetrics <= 1.9 expects transformers 4's tensor-returning API
        pytest.skip(f"this torchmetrics does not support this transformers: {error}")
    torch.testing.assert_close(ours[0], expected.float(), atol=atol, rtol=0)
