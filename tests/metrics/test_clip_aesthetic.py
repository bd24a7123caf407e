import pytest
import torch

from brushnet.metrics.aesthetic import PreferenceMLP, aesthetic_score, load_aesthetic_head
from brushnet.metrics.clip_score import clip_image_embeddings, clip_score, load_clip
from brushnet.metrics.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_preprocess

CAPTIONS = ["a red cat on the sofa", "dog"]


@pytest.fixture(scope="module")
def clip(tiny_clip_dir):
    return load_clip(tiny_clip_dir)


def test_preprocess_constant_image_and_crop():
    constant = torch.full((1, 3, 50, 80), 0.5)
    out = clip_preprocess(constant, size=32)
    assert out.shape == (1, 3, 32, 32)
    expected = (0.5 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    torch.testing.assert_close(out[0, :, 5, 5], expected, atol=1e-5, rtol=0)
    # Already at size: only the centre crop (of the long side) and normalisation happen.
    image = torch.rand(1, 3, 32, 40)
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(clip_preprocess(image, size=32), (image[..., :, 4:36] - mean) / std)


def test_clip_score_matches_transformers_forward(clip):
    model, tokenizer = clip
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    scores = clip_score(model, tokenizer, images, CAPTIONS)
    tokens = tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=clip_preprocess(images, 32), **tokens)
    cosine = out.logits_per_image.diagonal() / model.logit_scale.exp()
    torch.testing.assert_close(scores, 100 * cosine.clamp_min(0), atol=1e-4, rtol=1e-5)
    assert scores.shape == (2,) and ((scores >= 0) & (scores <= 100)).all()


def test_clip_score_batch_equals_single_and_clamps(clip):
    model, tokenizer = clip
    images = torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(2))
    batch = clip_score(model, tokenizer, images, CAPTIONS)  # captions padded to different lengths
    singles = torch.cat(
        [clip_score(model, tokenizer, images[i : i + 1], CAPTIONS[i : i + 1]) for i in range(2)]
    )
    torch.testing.assert_close(batch, singles, atol=1e-4, rtol=1e-5)
    # An image embedding exactly opposite the text embedding gives a negative cosine → clamped to 0.
    with torch.no_grad():
        model.visual_projection.weight.neg_()
        flipped = clip_score(model, tokenizer, images, CAPTIONS)
        model.visual_projection.weight.neg_()
    for before, after in zip(batch, flipped):
        assert after.item() == 0.0 or before.item() == 0.0
    with pytest.raises(ValueError, match="captions"):
        clip_score(model, tokenizer, images, CAPTIONS[:1])


def test_image_embeddings_are_unit_norm(clip):
    model, _ = clip
    embeddings = clip_image_embeddings(model, torch.rand(3, 3, 32, 32))
    assert embeddings.shape == (3, 16)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(3))


def test_preference_mlp_published_layout():
    shapes = {k: tuple(v.shape) for k, v in PreferenceMLP(768).state_dict().items()}
    assert shapes == {
        "layers.0.weight": (1024, 768),
        "layers.0.bias": (1024,),
        "layers.2.weight": (128, 1024),
        "layers.2.bias": (128,),
        "layers.4.weight": (64, 128),
        "layers.4.bias": (64,),
        "layers.6.weight": (16, 64),
        "layers.6.bias": (16,),
        "layers.7.weight": (1, 16),
        "layers.7.bias": (1,),
    }


def test_aesthetic_linear_head_hand_computed(clip, tmp_path):
    model, _ = clip
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    # weight = first basis vector, bias 5 → score = 5 + first coordinate of the unit embedding.
    weight = torch.zeros(1, 16)
    weight[0, 0] = 1.0
    torch.save({"weight": weight, "bias": torch.tensor([5.0])}, tmp_path / "sa_0_4_vit_l_14_linear.pth")
    head = load_aesthetic_head(tmp_path / "sa_0_4_vit_l_14_linear.pth")
    assert isinstance(head, torch.nn.Linear)
    expected = 5.0 + clip_image_embeddings(model, images)[:, 0]
    torch.testing.assert_close(aesthetic_score(head, model, images), expected)


def test_aesthetic_mlp_head_round_trip(clip, tmp_path):
    model, _ = clip
    torch.manual_seed(0)
    mlp = PreferenceMLP(16).eval()
    torch.save(mlp.state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    head = load_aesthetic_head(tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    assert isinstance(head, PreferenceMLP) and not head.training
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    scores = aesthetic_score(head, model, images)
    assert scores.shape == (2,)
    with torch.no_grad():
        torch.testing.assert_close(scores, mlp(clip_image_embeddings(model, images)).squeeze(-1))
    torch.save({"something": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="aesthetic"):
        load_aesthetic_head(tmp_path / "bad.pth")


def test_preprocess_pad_fit_resizes_the_longest_side_and_pads_black_centred():
    """HPS as the `hpsv2` package scores: the longest side to the input size, black bars, centred (the scorer
    centre-cropped instead, which scores non-square images differently)."""
    image = torch.rand(1, 3, 20, 40)
    out = clip_preprocess(image, size=10, fit="pad")
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    black = ((0.0 - mean) / std).expand(1, 3, 1, 10)
    assert out.shape == (1, 3, 10, 10)
    # 5 rows of image, 5 of black: 2 above, 3 below
    torch.testing.assert_close(out[..., :2, :], black.expand(1, 3, 2, 10))
    resized = torch.nn.functional.interpolate(image, size=(5, 10), mode="bicubic", antialias=True).clamp(0, 1)
    torch.testing.assert_close(out[..., 2:7, :], (resized - mean) / std)
    torch.testing.assert_close(out[..., 7:, :], black.expand(1, 3, 3, 10))
    # a square image: the same as the crop fit
    square = torch.rand(2, 3, 48, 48)
    torch.testing.assert_close(clip_preprocess(square, 16, fit="pad"), clip_preprocess(square, 16))
    with pytest.raises(ValueError, match="fit must be"):
        clip_preprocess(square, 16, fit="stretch")


def test_load_clip_refuses_other_models_and_empty_tokenizers(tiny_clip_dir, tmp_path):
    """A CLIPTextModel folder (an SD text_encoder/) loaded as CLIPModel with every weight newly drawn, and a
    folder without vocabulary files gave a tokenizer of special tokens only: both scored without an error."""
    import shutil

    from transformers import CLIPTextModel

    text_only = tmp_path / "text_encoder"
    CLIPTextModel.from_pretrained(tiny_clip_dir).save_pretrained(text_only)
    for file in tiny_clip_dir.iterdir():
        if file.name.startswith("tokenizer") or file.name in ("vocab.json", "merges.txt"):
            shutil.copy(file, text_only / file.name)
    with pytest.raises(ValueError, match=r"a 'clip_text_model' model, not CLIP"):
        load_clip(text_only)

    no_vocab = tmp_path / "no_vocab"
    shutil.copytree(tiny_clip_dir, no_vocab)
    for name in (
        "vocab.json",
        "tokenizer.json",
    ):  # transformers 5 saves tokenizer.json, 4 vocab.json + merges.txt
        (no_vocab / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match=r"no tokenizer vocabulary \(expected vocab.json and merges.txt"):
        load_clip(no_vocab)

    renamed = tmp_path / "renamed"
    shutil.copytree(tiny_clip_dir, renamed)
    from safetensors.torch import load_file, save_file

    weights = load_file(renamed / "model.safetensors")
    weights["extra.weight"] = torch.zeros(1)
    del weights["visual_projection.weight"]
    save_file(weights, renamed / "model.safetensors")
    with pytest.raises(ValueError, match=r"weights do not match CLIPModel \(1 missing.*1 unexpected"):
        load_clip(renamed)
