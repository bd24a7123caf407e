"""BrushBench / EditBench metrics: pure functions on tensors, plus loaders for their feature models.

Conventions: images `N×3×H×W` float in [0, 1]; masks `N×1×H×W`, 1 = hole (generated), 0 = kept.
Every function returns one value per image. Importing this package loads no weights and does not
import transformers; the loaders (`load_*`) read local files only.
"""

from .aesthetic import PreferenceMLP, aesthetic_score, load_aesthetic_head
from .clip_score import clip_image_embeddings, clip_score, load_clip
from .hps import VIT_H_14, OpenCLIP, OpenCLIPConfig, hps_score, load_hps
from .image_reward import (
    IMAGE_REWARD_V1,
    ImageReward,
    ImageRewardConfig,
    image_reward_score,
    load_image_reward,
)
from .lpips import LPIPSSqueeze, load_lpips_squeeze, lpips_distance
from .pixel import keep_masked, mse, mse_brushbench, psnr, psnr_brushbench, ssim
from .suite import METRICS, WEIGHT_KEYS, MetricSpec, MetricSuite, available_metrics

__all__ = [
    "IMAGE_REWARD_V1",
    "METRICS",
    "VIT_H_14",
    "WEIGHT_KEYS",
    "ImageReward",
    "ImageRewardConfig",
    "LPIPSSqueeze",
    "MetricSpec",
    "MetricSuite",
    "OpenCLIP",
    "OpenCLIPConfig",
    "PreferenceMLP",
    "aesthetic_score",
    "available_metrics",
    "clip_image_embeddings",
    "clip_score",
    "hps_score",
    "image_reward_score",
    "keep_masked",
    "load_aesthetic_head",
    "load_clip",
    "load_hps",
    "load_image_reward",
    "load_lpips_squeeze",
    "lpips_distance",
    "mse",
    "mse_brushbench",
    "psnr",
    "psnr_brushbench",
    "ssim",
]
