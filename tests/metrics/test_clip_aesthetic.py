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
