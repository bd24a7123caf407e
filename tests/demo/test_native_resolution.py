"""``--crop-to-mask`` works at the loaded model's native resolution (issue 19, stumble 4): 128 px for the shipped
demo models (it used a fixed 512, which took 82 s on them and filled the hole with noise)."""

import numpy as np
import pytest
from PIL import Image

from brushnet.demo.assets import method_models
from brushnet.methods import inpaint, load_method


@pytest.mark.parametrize("name", ["brushnet", "sd-inpainting", "repaint"])  # pipeline and latent-loop methods
def test_demo_models_work_at_128(name):
    method = load_method(name, method_models(name))
    assert method.native_resolution == 128  # the UNet's sample_size 32 x the VAE factor 4
    if name != "brushnet":
        return
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    hole = np.zeros((300, 400), bool)
    hole[100:160, 150:230] = True
    result = inpaint(method, image, hole, seed=1, steps=1, crop_to_mask=True)
    region = result.parameters["region"]
    width, height = region["size"]
    assert abs(width * height - 128 * 128) <= 0.15 * 128 * 128, region  # area ~ 128², not 512²
    assert result.images[0].size == (400, 300)


def test_controlnet_inpaint_rounds_to_multiples_of_8_on_a_factor_4_vae():
    """The demo VAE downsamples by 4, so a 100 px side passed the size rounding and then failed in diffusers
    ("height and width have to be divisible by 8"); the ControlNet inpaint pipeline wants multiples of 8."""
    method = load_method("controlnet-inpaint", method_models("controlnet-inpaint"))
    assert method.pipeline.vae_scale_factor == 4 and method.size_multiple == 8
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 100, 3), dtype=np.uint8))
    hole = np.zeros((100, 100), bool)
    hole[30:70, 30:70] = True
    result = inpaint(method, image, hole, seed=1, steps=1)
    assert result.parameters["region"]["size"] == [96, 96] and result.images[0].size == (100, 100)
