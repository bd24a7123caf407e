"""Training an SDXL branch: the SDXL text side and time ids, the loss on a fixed batch, exact resume with EMA,
validation with the SDXL pipeline and the exported branch in it — on the tiny random SDXL base."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from brushnet import StableDiffusionXLBrushNetPipeline
from brushnet.data.brushdata import BrushDataStream
from brushnet.models.brushnet import BrushNetModel
from brushnet.training import family, loop
from brushnet.training.config import load_config_file, make_config
from brushnet.training.data import build_train_dataloader, iterate_batches

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "train"
REFERENCE = Path(__file__).resolve().parents[1] / "fixtures" / "reference"


@pytest.fixture(scope="module")
def xl_base(tiny_xl_models) -> Path:
    return tiny_xl_models["base"]


@pytest.fixture
def xl_config(base_config, xl_base):
    return {**base_config, "pretrained_model_name_or_path": str(xl_base), "validation_guidance_scale": 5.0}


def _first_batch(config):
    dataset = BrushDataStream(config.train_shards, config.resolution, config.mask, seed=0, shuffle_buffer=0)
    return next(iterate_batches(build_train_dataloader(config, dataset), dataset, epoch=0))


def test_sdxl_family_encodes_as_the_pipeline_and_takes_time_ids_from_the_batch(xl_base):
    components = loop.load_components(str(xl_base))
    assert isinstance(components.family, family.SDXLFamily)
    assert family.family_for_unet(components.unet) is family.SDXLFamily
    assert set(components.frozen_modules) == {"vae", "unet", "text_encoder", "text_encoder_2"}

    batch = {
        "pixel_values": torch.zeros(2, 3, 16, 16),
        "original_size": torch.tensor([[480, 640], [512, 512]]),
        "crop_top_left": torch.tensor([[0, 53], [10, 0]]),
    }
    hidden, added = components.family.encode(["a red ball", ""], "cpu", torch.float32, batch)
    pipe = components.family.pipeline(components.vae, components.unet, BrushNetModel.from_unet(components.unet),
                                      components.noise_scheduler)  # fmt: skip
    assert isinstance(pipe, StableDiffusionXLBrushNetPipeline)
    expected, _, pooled, _ = pipe.encode_prompt(
        ["a red ball", ""], device="cpu", do_classifier_free_guidance=False
    )
    torch.testing.assert_close(hidden, expected)  # both encoders' penultimate layers, concatenated
    torch.testing.assert_close(added["text_embeds"], pooled)
    assert added["time_ids"].tolist() == [[480, 640, 0, 53, 16, 16], [512, 512, 10, 0, 16, 16]]

    uncropped = {"pixel_values": torch.zeros(2, 3, 16, 16)}  # a dataset that does not report them
    assert components.family.time_ids(uncropped).tolist() == [[16, 16, 0, 0, 16, 16]] * 2
    with pytest.raises(ValueError, match="time ids"):
        components.family.encode(["x"], "cpu", torch.float32)


def test_the_branch_gets_each_samples_real_size_and_crop(xl_base, tmp_path):
    """The data pipeline reports each sample's size before resizing and its random crop in the resized image
    (here 24 × 40 → 16 × 27, so the crop's left edge moves); they reach the branch as SDXL time ids."""
    from brushnet.data.folder import FolderDataset
    from brushnet.training.data import collate

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(
            tmp_path / "images" / f"{i}.png"
        )
    dataset = FolderDataset(tmp_path / "images", 16, seed=0)
    batch = collate([dataset[0], dataset[1]])
    assert batch["original_size"].tolist() == [[24, 40], [24, 40]]
    assert (batch["crop_top_left"][:, 0] == 0).all() and batch["crop_top_left"][:, 1].max() > 0

    components = loop.load_components(str(xl_base))
    brushnet = BrushNetModel.from_unet(components.unet)
    seen = []
    brushnet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs), with_kwargs=True)
    with torch.no_grad():
        loop.brushnet_training_loss(brushnet, components, batch, torch.Generator().manual_seed(0))
    time_ids = seen[0]["added_cond_kwargs"]["time_ids"]
    expected = torch.cat([batch["original_size"], batch["crop_top_left"], torch.full((2, 2), 16)], dim=1)
    assert torch.equal(time_ids.long(), expected)
    assert seen[0]["added_cond_kwargs"]["text_embeds"].shape == (2, 24)


def test_time_ids_reach_the_unet_and_the_branch_exact_under_bf16(xl_base):
    """The time ids were cast to the mixed-precision dtype with the text: in bfloat16 a 1365 px side became 1368 and
    a crop at 683 became 684, and the sinusoidal embedding's high frequencies (up to 1 per pixel) came out other
    than for the real size and crop. They stay float32; the UNet and the branch embed them in float32."""
    components = loop.load_components(str(xl_base))
    brushnet = BrushNetModel.from_unet(components.unet)
    loop.freeze(components, torch.bfloat16, "cpu")
    seen = {}
    for name, module in (("unet", components.unet), ("branch", brushnet)):
        module.add_time_proj.register_forward_pre_hook(
            lambda m, args, name=name: seen.update({name: args[0]})
        )
    real = [[1365, 2047, 683, 301, 16, 16], [16, 16, 0, 0, 16, 16]]
    batch = {
        "pixel_values": torch.rand(2, 3, 16, 16) * 2 - 1,
        "mask": torch.zeros(2, 1, 16, 16),
        "caption": ["a red ball", ""],
        "original_size": torch.tensor([[1365, 2047], [16, 16]]),
        "crop_top_left": torch.tensor([[683, 301], [0, 0]]),
    }
    _, added = components.family.encode(batch["caption"], "cpu", torch.bfloat16, batch)
    assert added["text_embeds"].dtype == torch.bfloat16 and added["time_ids"].tolist() == real
    _, unconditional = components.family.unconditional(2, "cpu", torch.bfloat16, batch)
    assert unconditional["time_ids"].tolist() == real
    with torch.no_grad():
        loss = loop.brushnet_training_loss(
            brushnet, components, batch, torch.Generator().manual_seed(0), weight_dtype=torch.bfloat16
        )
    assert torch.isfinite(loss)
    assert seen["unet"].tolist() == seen["branch"].tolist() == sum(real, [])


def test_sdxl_loss_falls_when_overfitting_one_batch(xl_config, xl_base, overfit):
    components = loop.load_components(str(xl_base))
    loop.freeze(components, torch.float32, "cpu")
    brushnet = BrushNetModel.from_unet(components.unet).train()
    batch = _first_batch(make_config(xl_config))
    losses = overfit(brushnet, components, batch, 20)
    assert losses[-1] < 0.6 * losses[0], losses


def test_sdxl_four_steps_equal_two_plus_resume_plus_two_with_ema(xl_config, tmp_path):
    values = {**xl_config, "use_ema": True, "ema_decay": 0.5}
    straight = loop.train(make_config({**values, "output_dir": str(tmp_path / "a"), "max_train_steps": 4}))
    split = {**values, "output_dir": str(tmp_path / "b")}
    first = loop.train(make_config({**split, "max_train_steps": 2}))
    second = loop.train(make_config({**split, "max_train_steps": 4, "resume_from_checkpoint": "latest"}))
    assert first.losses + second.losses == straight.losses and len(straight.losses) == 4
    a = load_file(straight.final_model_dir / "diffusion_pytorch_model.safetensors")
    b = load_file(second.final_model_dir / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "add_embedding.linear_1.weight" in a  # an SDXL branch


def test_resuming_with_a_base_of_the_other_family_is_one_line_naming_both(xl_config, base_config, tmp_path):
    """An SDXL run resumed with an SD1.5 base said only "cannot resume from …: Error(s) in loading state_dict for
    BrushNetModel:" (torch's first line)."""
    from brushnet.errors import CheckpointError

    loop.train(make_config({**xl_config, "output_dir": str(tmp_path / "run"), "max_train_steps": 2}))
    other = {**base_config, "output_dir": str(tmp_path / "run"), "max_train_steps": 4}
    with pytest.raises(CheckpointError) as error:
        loop.train(make_config({**other, "resume_from_checkpoint": "latest"}))
    message = str(error.value)
    assert message.startswith(f"cannot resume from {tmp_path / 'run' / 'checkpoint-2'} with this ")
    assert "this SDXL BrushNet" in message and "does not fit an SD1.5 base" in message and "\n" not in message


def test_sdxl_validation_grid_and_the_exported_branch_runs_in_the_pipeline(xl_config, xl_base, tmp_path):
    config = make_config(
        {**xl_config, "max_train_steps": 2, "validation_steps": 2, "validation_inference_steps": 2,
         "num_validation_samples": 2}
    )  # fmt: skip
    loop.train(config)
    out = Path(config.output_dir)
    grid = Image.open(out / "validation" / "step-2.png")
    assert grid.size == (3 * 16, 2 * 16)

    def run(branch_dir):
        brushnet = BrushNetModel.from_pretrained(branch_dir)
        pipe = StableDiffusionXLBrushNetPipeline.from_pretrained(str(xl_base), brushnet=brushnet)
        pipe.set_progress_bar_config(disable=True)
        rng = np.random.default_rng(0)
        image = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
        mask = np.zeros((16, 16), np.uint8)
        mask[4:12, 4:12] = 255
        return pipe(
            "a red square", image=image, mask_image=Image.fromarray(mask), num_inference_steps=2,
            generator=torch.Generator().manual_seed(0), output_type="np",
        ).images  # fmt: skip

    trained = run(out / "checkpoint-2" / "brushnet")
    # the original's layout: every tensor the run exports has a name the released SDXL checkpoints use (the tiny
    # base's last level keeps its width, so it lacks their conv_shortcut there) and config.json has every key
    # of theirs, so the original's BrushNetModel.from_pretrained builds this branch, not its SD1.5 defaults
    exported = out / "brushnet"
    manifest = (REFERENCE / "brushnet-sdxl-state-dict.txt").read_text().splitlines()
    released_keys = {line.split()[0] for line in manifest if line.strip() and not line.startswith("#")}
    exported_keys = set(load_file(exported / "diffusion_pytorch_model.safetensors"))
    assert exported_keys <= released_keys and len(exported_keys) == 250
    released_config = json.loads((REFERENCE / "brushnet_sdxl_config.json").read_text())
    assert set(released_config) - {"_name_or_path"} <= set(json.loads((exported / "config.json").read_text()))
    loop.initial_branch(loop.load_components(str(xl_base))).save_pretrained(tmp_path / "untrained")
    untrained = run(tmp_path / "untrained")
    assert trained.shape == (1, 16, 16, 3) and np.abs(trained - untrained).max() > 1e-4


def test_sdxl_validation_images_default_to_sdxls_guidance(xl_config, monkeypatch):
    """--validation_guidance_scale unset drew SDXL validation images at SD1.5's 7.5; inference on SDXL (the CLI, the
    service, the pipeline and the original's SDXL validation) uses 5.0. Unset, it is now the family's value, and the
    resolved value is what train_config.yaml records."""
    calls = []
    call = StableDiffusionXLBrushNetPipeline.__call__

    def recording(self, *args, **kwargs):
        calls.append(kwargs["guidance_scale"])
        return call(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionXLBrushNetPipeline, "__call__", recording)
    values = {k: v for k, v in xl_config.items() if k != "validation_guidance_scale"}
    config = make_config(
        {**values, "max_train_steps": 1, "validation_steps": 1, "validation_inference_steps": 1,
         "num_validation_samples": 1}
    )  # fmt: skip
    loop.train(config)
    assert calls == [5.0]
    assert load_config_file(Path(config.output_dir) / "train_config.yaml")["validation_guidance_scale"] == 5.0


def test_fp16_keeps_the_overflowing_sdxl_vae_in_float32(xl_base, tiny_base):
    xl = loop.load_components(str(xl_base))
    loop.freeze(xl, torch.float16, "cpu")
    assert xl.vae.dtype == torch.float32 and xl.vae.config.force_upcast
    assert {xl.unet.dtype, xl.family.text_encoder.dtype, xl.family.text_encoder_2.dtype} == {torch.float16}
    xl = loop.load_components(str(xl_base))
    loop.freeze(xl, torch.bfloat16, "cpu")  # bf16 has float32's range
    assert xl.vae.dtype == torch.bfloat16
    sd15 = loop.load_components(str(tiny_base))
    loop.freeze(sd15, torch.float16, "cpu")
    assert {m.dtype for m in sd15.frozen_modules.values()} == {torch.float16}
    assert not any(p.requires_grad for m in sd15.frozen_modules.values() for p in m.parameters())


def _overflow(vae) -> None:
    """Scale the VAE's first convs by 1e5: in float16 the activations that follow overflow (65504), in float32 the
    group norms bring them back (tests/pipelines/test_pipeline_brushnet_sdxl.py::_overflowing_vae)."""
    with torch.no_grad():
        for conv in (vae.encoder.conv_in, vae.decoder.conv_in):
            conv.weight.mul_(1e5)
            conv.bias.mul_(1e5)


def test_the_float32_vae_stays_float32_under_fp16_autocast(xl_config, xl_base):
    """freeze() kept the overflowing SDXL VAE in float32, but the loss and the validation run inside
    ``accelerator.autocast()``, which ran its convolutions in float16 all the same: a NaN loss and NaN validation
    images under fp16 mixed precision on a GPU (CPU autocast in float16 stands in for it here)."""
    config = make_config(xl_config)
    batch = _first_batch(config)
    components = loop.load_components(str(xl_base))
    _overflow(components.vae)
    loop.freeze(components, torch.float16, "cpu")
    dtypes = []
    components.vae.encoder.conv_in.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    brushnet = BrushNetModel.from_unet(components.unet).float()

    def loss(autocast: bool) -> float:
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast), torch.no_grad():
            return loop.brushnet_training_loss(
                brushnet, components, batch, torch.Generator().manual_seed(0), weight_dtype=torch.float16
            ).item()

    plain = loss(False)
    assert np.isfinite(plain) and loss(True) == plain
    assert dtypes and set(dtypes) == {torch.float32}

    pipe = components.family.pipeline(components.vae, components.unet, brushnet, components.noise_scheduler)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    with torch.autocast("cpu", dtype=torch.float16):
        out = pipe(
            "a red ball", image=image, mask_image=Image.fromarray(mask), num_inference_steps=2,
            generator=torch.Generator().manual_seed(0), output_type="np",
        ).images  # fmt: skip
    assert np.isfinite(out).all() and components.vae.dtype == torch.float32


def test_the_float32_vae_reads_the_pixels_unrounded_under_fp16(xl_config, xl_base):
    """The pixels were cast to the mixed-precision dtype before the VAE that stays in float32 (force_upcast): float16
    rounds an 8-bit level's value in [-1, 1] by up to about 1/16 of a level. The VAE reads them as the batch has them."""
    config = make_config(xl_config)
    batch = _first_batch(config)
    components = loop.load_components(str(xl_base))
    loop.freeze(components, torch.float16, "cpu")
    seen = []
    components.vae.encoder.conv_in.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    brushnet = BrushNetModel.from_unet(components.unet).float()
    with torch.no_grad():
        loop.brushnet_training_loss(
            brushnet, components, batch, torch.Generator().manual_seed(0), weight_dtype=torch.float16
        )
    pixels = batch["pixel_values"].float()
    assert not torch.equal(pixels.half().float(), pixels)  # float16 would round these
    assert seen and seen[0].dtype == torch.float32 and torch.equal(seen[0], pixels)


def test_sdxl_recipe_config_is_the_originals():
    config = make_config(load_config_file(CONFIGS / "sdxl_brushnet.yaml"))
    assert (config.resolution, config.train_batch_size, config.gradient_accumulation_steps) == (1024, 1, 4)
    assert config.learning_rate == 1e-5 and config.mixed_precision == "bf16"
    assert config.pretrained_model_name_or_path == "stabilityai/stable-diffusion-xl-base-1.0"
