import pytest
import torch
from transformers import BertTokenizer

from brushnet.metrics.image_reward import (
    IMAGE_REWARD_MEAN,
    IMAGE_REWARD_STD,
    IMAGE_REWARD_V1,
    ImageReward,
    ImageRewardConfig,
    image_reward_score,
    load_image_reward,
)

CAPTIONS = ["a red cat on the sofa", "dog"]


def _tiny_config(vocab_size):
    return ImageRewardConfig(
        image_size=32,
        patch_size=16,
        vision_width=32,
        vision_layers=2,
        vision_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=64,
        text_width=24,
        text_layers=2,
        text_heads=2,
        text_intermediate=48,
        embed_dim=8,
        mlp_hidden=(16, 8, 8, 4),
    )


@pytest.fixture(scope="module")
def tiny_reward(tmp_path_factory, bert_tokenizer_dir):
    tokenizer = BertTokenizer.from_pretrained(bert_tokenizer_dir)
    config = _tiny_config(len(tokenizer))
    torch.manual_seed(0)
    model = ImageReward(config)
    state_dict = {f"module.{k}": v for k, v in model.state_dict().items()}  # DataParallel-style prefix
    state_dict["module.blip.text_encoder.embeddings.position_ids"] = torch.arange(64)[None]  # old buffer
    path = tmp_path_factory.mktemp("image_reward") / "ImageReward.pt"
    torch.save(state_dict, path)
    return model, config, path, tokenizer


def test_published_key_layout():
    with torch.device("meta"):
        model = ImageReward(IMAGE_REWARD_V1)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "blip.visual_encoder.cls_token": (1, 1, 1024),
        "blip.visual_encoder.pos_embed": (1, 197, 1024),  # 224 px / 16 → 14² + 1
        "blip.visual_encoder.patch_embed.proj.weight": (1024, 3, 16, 16),
        "blip.visual_encoder.patch_embed.proj.bias": (1024,),
        "blip.visual_encoder.blocks.23.norm1.weight": (1024,),
        "blip.visual_encoder.blocks.23.attn.qkv.weight": (3072, 1024),
        "blip.visual_encoder.blocks.23.attn.qkv.bias": (3072,),
        "blip.visual_encoder.blocks.23.attn.proj.weight": (1024, 1024),
        "blip.visual_encoder.blocks.23.mlp.fc1.weight": (4096, 1024),
        "blip.visual_encoder.blocks.23.mlp.fc2.weight": (1024, 4096),
        "blip.visual_encoder.norm.bias": (1024,),
        "blip.text_encoder.embeddings.word_embeddings.weight": (30524, 768),
        "blip.text_encoder.embeddings.position_embeddings.weight": (512, 768),
        "blip.text_encoder.embeddings.LayerNorm.weight": (768,),
        "blip.text_encoder.encoder.layer.11.attention.self.query.weight": (768, 768),
        "blip.text_encoder.encoder.layer.11.attention.output.dense.weight": (768, 768),
        "blip.text_encoder.encoder.layer.11.attention.output.LayerNorm.bias": (768,),
        "blip.text_encoder.encoder.layer.11.crossattention.self.query.weight": (768, 768),
        "blip.text_encoder.encoder.layer.11.crossattention.self.key.weight": (768, 1024),
        "blip.text_encoder.encoder.layer.11.crossattention.self.value.weight": (768, 1024),
        "blip.text_encoder.encoder.layer.11.intermediate.dense.weight": (3072, 768),
        "blip.text_encoder.encoder.layer.11.output.dense.weight": (768, 3072),
        "blip.text_encoder.encoder.layer.11.output.LayerNorm.weight": (768,),
        "blip.vision_proj.weight": (256, 1024),
        "blip.text_proj.weight": (256, 768),
        "mlp.layers.0.weight": (1024, 768),
        "mlp.layers.7.weight": (1, 16),
    }
    assert {k: shapes.get(k) for k in expected} == expected
    assert not any(k.startswith("blip.text_encoder.pooler") or "token_type" in k for k in shapes)
    # ViT: 6 fixed + 12 per block; BERT: 4 embedding + 26 per layer; 2 projections; 5 MLP linears.
    assert len(shapes) == (6 + 24 * 12) + (4 + 12 * 26) + 4 + 10


def test_round_trip_accepts_published_extras(tiny_reward, bert_tokenizer_dir, images):
    model, config, path, tokenizer = tiny_reward
    loaded, loaded_tokenizer = load_image_reward(path, bert_tokenizer_dir, config=config)
    generated, _ = images
    scores = image_reward_score(loaded, loaded_tokenizer, generated, CAPTIONS)
    torch.testing.assert_close(scores, image_reward_score(model, tokenizer, generated, CAPTIONS))
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    singles = torch.cat(
        [image_reward_score(loaded, tokenizer, generated[i : i + 1], CAPTIONS[i : i + 1]) for i in range(2)]
    )
    torch.testing.assert_close(scores, singles, atol=1e-5, rtol=1e-4)


def test_unexpected_key_raises(tiny_reward, bert_tokenizer_dir, tmp_path):
    model, config, _, _ = tiny_reward
    state_dict = dict(model.state_dict(), **{"blip.itm_head.weight": torch.zeros(2, 24)})
    torch.save({"state_dict": state_dict}, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match="1 unexpected"):
        load_image_reward(tmp_path / "extra.pt", bert_tokenizer_dir, config=config)


def test_normalisation_constants(tiny_reward, images):
    model, config, _, tokenizer = tiny_reward
    generated, _ = images
    head = ImageReward(config)
    head.load_state_dict(model.state_dict())
    with torch.no_grad():
        for layer in head.mlp.layers:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.zero_()
                layer.bias.zero_()
        head.mlp.layers[7].bias.fill_(IMAGE_REWARD_MEAN + IMAGE_REWARD_STD)  # raw output μ + σ → reward 1
    torch.testing.assert_close(image_reward_score(head.eval(), tokenizer, generated, CAPTIONS), torch.ones(2))


def test_padding_is_masked_and_image_matters(tiny_reward, images):
    model, config, _, tokenizer = tiny_reward
    generated, original = images
    longer = ImageReward(ImageRewardConfig(**{**config.__dict__, "max_text_length": 50}))
    longer.load_state_dict(model.state_dict())
    torch.testing.assert_close(
        image_reward_score(longer.eval(), tokenizer, generated, CAPTIONS),
        image_reward_score(model, tokenizer, generated, CAPTIONS),
        atol=1e-5,
        rtol=1e-4,
    )
    assert not torch.allclose(
        image_reward_score(model, tokenizer, generated, CAPTIONS),
        image_reward_score(model, tokenizer, 1 - original, CAPTIONS),
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scores_in_half_precision(tiny_reward, bert_tokenizer_dir, images, dtype):
    """The head got a float32 input while it had been cast with the model: "mat1 and mat2 must have the same
    dtype" in fp16 and bf16, while HPS and CLIP score ran."""
    _, config, path, _ = tiny_reward
    generated, _ = images
    full, tokenizer = load_image_reward(path, bert_tokenizer_dir, config=config)
    half, _ = load_image_reward(path, bert_tokenizer_dir, config=config, dtype=dtype)
    scores = image_reward_score(half, tokenizer, generated, CAPTIONS)
    assert scores.dtype == torch.float32 and scores.shape == (2,)
    torch.testing.assert_close(
        scores, image_reward_score(full, tokenizer, generated, CAPTIONS), atol=0.15, rtol=0
    )
