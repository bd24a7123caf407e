import logging

import pytest
import torch
from transformers import BertTokenizer

import brushnet.metrics as metrics
from brushnet.metrics import METRICS, WEIGHT_KEYS, MetricSuite, available_metrics
from brushnet.metrics.hps import OpenCLIP, OpenCLIPConfig
from brushnet.metrics.image_reward import ImageReward, ImageRewardConfig
from brushnet.metrics.lpips import LPIPSSqueeze

PIXEL = ["psnr_brushbench", "mse_brushbench", "psnr", "mse", "ssim"]
HPS_TINY = OpenCLIPConfig(16, 28, 14, 32, 1, 2, 77, 514, 24, 1, 2)


def test_registry():
    assert available_metrics() == [
        "image_reward",
        "hps",
        "aesthetic",
        "psnr_brushbench",
        "mse_brushbench",
        "lpips",
        "clip_score",
        "psnr",
        "mse",
        "ssim",
    ]
    for spec in METRICS.values():
        assert set(spec.weights) <= set(WEIGHT_KEYS)
    assert METRICS["hps"].table_scale == 100 and METRICS["image_reward"].table_scale == 10


def test_missing_weights_skip_with_one_line_each(caplog, images):
    generated, original = images
    with caplog.at_level(logging.INFO, logger="brushnet.metrics.suite"):
        suite = MetricSuite({})
    lines = [record.getMessage() for record in caplog.records]
    hint = "; local paths only, see docs/benchmarking.md)"
    assert f"skipping hps: no weights given (--hps-weights, --hps-tokenizer-weights{hint}" in lines
    assert (
        f"skipping lpips: no weights given (--lpips-backbone-weights, --lpips-linear-weights{hint}" in lines
    )
    assert len(lines) == 5 and len(set(lines)) == 5
    assert suite.metrics == PIXEL and suite.skipped == [
        "image_reward",
        "hps",
        "aesthetic",
        "lpips",
        "clip_score",
    ]
    mask = torch.zeros(2, 1, 40, 48)
    mask[..., :20, :] = 1
    results = suite(generated, original, mask)
    assert list(results) == PIXEL
    torch.testing.assert_close(results["mse_brushbench"], metrics.mse_brushbench(generated, original, mask))
    torch.testing.assert_close(results["ssim"], metrics.ssim(generated, original, mask))


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown metric weight"):
        MetricSuite({"hsp": "x"})
    missing = tmp_path / "HPS_v2.1_compressed.pt"
    with pytest.raises(FileNotFoundError) as error:
        MetricSuite({"hps": missing})
    assert str(error.value) == (
        f"--hps-weights {missing}: not found; expected a local file: HPS_v2.1_compressed.pt"
    )
    with pytest.raises(FileNotFoundError, match=r"^--clip-weights .*: is a file; expected a local folder: "):
        MetricSuite({"clip": __file__})
    with pytest.raises(
        FileNotFoundError, match=r"^--image-reward-weights .*: is a folder; expected a local file"
    ):
        MetricSuite({"image_reward": tmp_path})
    with pytest.raises(ValueError, match="unknown metrics"):
        MetricSuite({}, metrics=["fid"])
    with pytest.raises(ValueError, match="original"):
        MetricSuite({}, metrics=["psnr"])(torch.rand(1, 3, 16, 16))


def test_full_suite_on_tiny_weights(tmp_path, tiny_clip_dir, bert_tokenizer_dir, images):
    torch.manual_seed(0)
    lpips = LPIPSSqueeze()
    torch.save({k[4:]: v for k, v in lpips.state_dict().items() if k.startswith("net.")}, tmp_path / "sq.pth")
    torch.save({k: v for k, v in lpips.state_dict().items() if k.startswith("lin")}, tmp_path / "lin.pth")
    torch.save({"weight": torch.randn(1, 16), "bias": torch.zeros(1)}, tmp_path / "aesthetic.pth")
    torch.save({"state_dict": OpenCLIP(HPS_TINY).state_dict()}, tmp_path / "hps.pt")
    reward_config = _reward_config(bert_tokenizer_dir)
    torch.save(ImageReward(reward_config).state_dict(), tmp_path / "ir.pt")
    weights = {
        "clip": tiny_clip_dir,
        "aesthetic": tmp_path / "aesthetic.pth",
        "hps": tmp_path / "hps.pt",
        "image_reward": tmp_path / "ir.pt",
        "image_reward_tokenizer": bert_tokenizer_dir,
        "lpips_backbone": tmp_path / "sq.pth",
        "lpips_linear": tmp_path / "lin.pth",
    }
    suite = MetricSuite(weights, hps_config=HPS_TINY, image_reward_config=reward_config)
    assert suite.metrics == available_metrics() and suite.skipped == []
    weighted = {name for name in available_metrics() if METRICS[name].weights}
    assert set(suite.weights_id) == weighted and suite.weights_id["hps"] != suite.weights_id["aesthetic"]
    generated, original = images
    results = suite(generated, original, None, ["a cat", "a dog on a sofa"])
    assert list(results) == available_metrics()
    for name, values in results.items():
        assert values.shape == (2,) and values.dtype == torch.float64, name
    assert ((results["clip_score"] >= 0) & (results["clip_score"] <= 100)).all()
    assert (results["hps"].abs() <= 1).all()
    again = suite(generated, original, None, ["a cat", "a dog on a sofa"])
    for name in results:
        torch.testing.assert_close(results[name], again[name])  # deterministic
    with pytest.raises(ValueError, match="captions"):
        suite(generated, original)


def test_weights_of_the_wrong_kind_are_refused_when_the_suite_loads(
    tmp_path, tiny_clip_dir, bert_tokenizer_dir
):
    """Each refused at load with one line naming the flag: an aesthetic head for another CLIP width (failed at the
    first image, mid-run), an ImageReward tokenizer folder without vocab.txt (every word [UNK], scored without an
    error), a corrupt or pickled checkpoint (torch's advice to unpickle it)."""
    torch.save({"weight": torch.randn(1, 512), "bias": torch.zeros(1)}, tmp_path / "b32_head.pth")
    with pytest.raises(ValueError) as error:
        MetricSuite({"clip": tiny_clip_dir, "aesthetic": tmp_path / "b32_head.pth"}, metrics=["aesthetic"])
    message = str(error.value)
    assert message.startswith("--aesthetic-weights: ") and "takes 512-wide CLIP embeddings" in message
    assert "gives 16" in message and "\n" not in message

    empty = tmp_path / "empty_tokenizer"
    empty.mkdir()
    torch.save(ImageReward(_reward_config(bert_tokenizer_dir)).state_dict(), tmp_path / "ir.pt")
    with pytest.raises(ValueError, match=r"^--image-reward-tokenizer-weights: .*no tokenizer vocabulary"):
        MetricSuite(
            {"image_reward": tmp_path / "ir.pt", "image_reward_tokenizer": empty},
            metrics=["image_reward"],
            image_reward_config=_reward_config(bert_tokenizer_dir),
        )

    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    torch.save(torch.nn.Linear(16, 1), tmp_path / "module.pth")  # a pickled module, not a state dict
    for name in ("garbage.pth", "module.pth"):
        with pytest.raises(ValueError) as error:
            MetricSuite({"clip": tiny_clip_dir, "aesthetic": tmp_path / name}, metrics=["aesthetic"])
        message = str(error.value)
        assert message.startswith(
            f"--aesthetic-weights: {tmp_path / name}: not a readable state-dict checkpoint"
        )
        assert "\n" not in message and "weights_only` set to `False`" not in message


def _reward_config(bert_tokenizer_dir):
    return ImageRewardConfig(
        32,
        16,
        32,
        1,
        2,
        len(BertTokenizer.from_pretrained(bert_tokenizer_dir)),
        64,
        24,
        1,
        2,
        48,
        8,
        (16, 8, 8, 4),
    )


def test_a_load_error_names_the_flag_of_the_file_it_is_about(tmp_path, tiny_clip_dir):
    """The flag was the first weights path the message contained: a bad head inside the CLIP folder was reported
    as --clip-weights."""
    import shutil

    clip = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, clip)
    (clip / "head.pth").write_bytes(b"garbage")
    with pytest.raises(
        ValueError, match=r"^--aesthetic-weights: .*head.pth: not a readable state-dict checkpoint"
    ):
        MetricSuite({"clip": clip, "aesthetic": clip / "head.pth"}, metrics=["aesthetic"])
