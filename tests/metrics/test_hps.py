import pytest
import torch
from transformers import CLIPTokenizer

from brushnet.metrics.hps import VIT_H_14, OpenCLIP, OpenCLIPConfig, hps_score, load_hps, tokenize_open_clip
from brushnet.metrics.preprocess import clip_preprocess

TINY = OpenCLIPConfig(
    embed_dim=16,
    image_size=28,
    patch_size=14,
    vision_width=32,
    vision_layers=2,
    vision_heads=2,
    context_length=77,
    vocab_size=514,
    text_width=24,
    text_layers=2,
    text_heads=2,
)
CAPTIONS = ["a photo of a cat", "blue dog"]


@pytest.fixture(scope="module")
def tiny_hps(tmp_path_factory, clip_tokenizer_dir):
    torch.manual_seed(0)
    model = OpenCLIP(TINY)
    path = tmp_path_factory.mktemp("hps") / "HPS_v2.1_compressed.pt"
    torch.save(
        {"state_dict": {k: v.half() for k, v in model.state_dict().items()}}, path
    )  # fp16 like the release
    return model, path, clip_tokenizer_dir


def _expected_keys(prefix, layers):
    names = ("ln_1", "attn.in_proj", "attn.out_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
    suffixes = []
    for name in names:
        suffixes += (
            [f"{name}_weight", f"{name}_bias"]
            if name == "attn.in_proj"
            else [f"{name}.weight", f"{name}.bias"]
        )
    return {f"{prefix}transformer.resblocks.{i}.{s}" for i in range(layers) for s in suffixes}


def test_openclip_key_layout():
    with torch.device("meta"):
        model = OpenCLIP(VIT_H_14)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    top_level = {
        "visual.conv1.weight": (1280, 3, 14, 14),
        "visual.class_embedding": (1280,),
        "visual.positional_embedding": (257, 1280),
        "visual.ln_pre.weight": (1280,),
        "visual.ln_pre.bias": (1280,),
        "visual.ln_post.weight": (1280,),
        "visual.ln_post.bias": (1280,),
        "visual.proj": (1280, 1024),
        "token_embedding.weight": (49408, 1024),
        "positional_embedding": (77, 1024),
        "ln_final.weight": (1024,),
        "ln_final.bias": (1024,),
        "text_projection": (1024, 1024),
        "logit_scale": (),
    }
    expected = set(top_level) | _expected_keys("visual.", 32) | _expected_keys("", 24)
    assert set(shapes) == expected
    assert {k: shapes[k] for k in top_level} == top_level
    assert shapes["visual.transformer.resblocks.0.attn.in_proj_weight"] == (3 * 1280, 1280)
    assert shapes["visual.transformer.resblocks.31.mlp.c_fc.weight"] == (5120, 1280)
    assert shapes["transformer.resblocks.23.mlp.c_proj.weight"] == (1024, 4096)
    assert "attn_mask" not in shapes  # non-persistent, as in OpenCLIP


def test_tokenize_open_clip(clip_tokenizer_dir):
    tokenizer = CLIPTokenizer.from_pretrained(clip_tokenizer_dir)
    ids = tokenize_open_clip(tokenizer, ["a cat", "x" * 200])
    assert ids.shape == (2, 77)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert ids[0, 0] == bos and ids[0, 1:6].tolist() == tokenizer("a cat", add_special_tokens=False)[
        "input_ids"
    ] + [eos]
    assert (ids[0, 6:] == 0).all()  # zero padding
    assert ids[1, 0] == bos and ids[1, -1] == eos  # truncated, EOT kept last
    assert (ids.argmax(dim=-1) == torch.tensor([5, 76])).all()  # pooling position = EOT


def test_round_trip_and_score(tiny_hps, images):
    model, path, tokenizer_dir = tiny_hps
    loaded, tokenizer = load_hps(path, tokenizer_dir, config=TINY)
    generated, _ = images
    scores = hps_score(loaded, tokenizer, generated, CAPTIONS)
    assert scores.shape == (2,) and (scores.abs() <= 1).all()
    # Same as the fp16-rounded original model.
    reference = OpenCLIP(TINY)
    reference.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    torch.testing.assert_close(scores, hps_score(reference.eval(), tokenizer, generated, CAPTIONS))
    # Hand-assembled: cosine of the two towers' outputs, no logit scale.
    with torch.no_grad():
        image_features = loaded.encode_image(clip_preprocess(generated, 28, fit="pad"))
        text_features = loaded.encode_text(tokenize_open_clip(tokenizer, CAPTIONS))
    torch.testing.assert_close(scores, torch.nn.functional.cosine_similarity(image_features, text_features))
    singles = torch.cat(
        [hps_score(loaded, tokenizer, generated[i : i + 1], CAPTIONS[i : i + 1]) for i in range(2)]
    )
    torch.testing.assert_close(scores, singles, atol=1e-5, rtol=1e-4)


def test_text_tower_is_causal(tiny_hps, clip_tokenizer_dir):
    model, _, _ = tiny_hps
    tokenizer = CLIPTokenizer.from_pretrained(clip_tokenizer_dir)
    ids = tokenize_open_clip(tokenizer, ["a cat"])
    changed = ids.clone()
    changed[0, 10:] = 7  # tokens after EOT must not change the pooled EOT feature
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ids), model.encode_text(changed))
        changed[0, 1] = 9  # a token before EOT must
        assert not torch.allclose(model.encode_text(ids), model.encode_text(changed))


def test_missing_key_raises(tiny_hps, tmp_path, clip_tokenizer_dir):
    model, _, _ = tiny_hps
    state_dict = model.state_dict()
    del state_dict["visual.proj"]
    torch.save(state_dict, tmp_path / "raw.pt")  # raw state dict (no "state_dict" wrapper)
    with pytest.raises(ValueError, match="1 missing"):
        load_hps(tmp_path / "raw.pt", clip_tokenizer_dir, config=TINY)
