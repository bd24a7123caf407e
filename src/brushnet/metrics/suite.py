"""The metric registry and `MetricSuite`, which loads the feature models it was given weights for and
scores (generated, original, mask, caption) batches with every requested metric.

A metric whose weights were not given is skipped with one log line, e.g.
`skipping hps: no weights given (--hps-weights)`. Values are what each reference implementation
returns (HPS a cosine, ImageReward a normalised reward, MSE in [0, 1] units); BrushBench tables print
IR×10, HPS×100, MSE×10³ and LPIPS×10³ (`MetricSpec.table_scale`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from . import pixel

logger = logging.getLogger(__name__)

__all__ = [
    "MetricSpec",
    "METRICS",
    "WEIGHT_KEYS",
    "FOLDER_KEYS",
    "available_metrics",
    "check_weight_path",
    "weights_fingerprint",
    "MetricSuite",
]

WEIGHT_KEYS: dict[str, str] = {
    "clip": "folder with CLIP ViT-L/14 in Hugging Face layout (openai/clip-vit-large-patch14)",
    "aesthetic": "LAION aesthetic head (sa_0_4_vit_l_14_linear.pth or sac+logos+ava1-l14-linearMSE.pth)",
    "hps": "HPS_v2.1_compressed.pt",
    "hps_tokenizer": "folder with the CLIP BPE tokenizer for HPS (defaults to the `clip` folder)",
    "image_reward": "ImageReward.pt (v1.0)",
    "image_reward_tokenizer": "folder with the bert-base-uncased tokenizer for ImageReward",
    "lpips_backbone": "torchvision squeezenet1_1 weights (squeezenet1_1-*.pth)",
    "lpips_linear": "lpips v0.1 squeeze.pth linear heads",
}
"""Keys accepted in `MetricSuite(weights=...)`; the CLI flag for key `k` is `--{k with - for _}-weights`."""

FOLDER_KEYS = frozenset({"clip", "hps_tokenizer", "image_reward_tokenizer"})
"""Weight keys that name a folder; the others name one file."""


def weight_flag(key: str) -> str:
    """CLI flag name used in skip messages for a weight key, e.g. `hps` → `--hps-weights`."""
    return f"--{key.replace('_', '-')}-weights"


def check_weight_path(key: str, path: str | os.PathLike) -> None:
    """Raise a one-line `FileNotFoundError` when the local path given for weight `key` is missing or of the
    wrong kind (file vs folder), naming the flag and what it should hold. Nothing is ever downloaded."""
    want_folder = key in FOLDER_KEYS
    exists = os.path.isdir(path) if want_folder else os.path.isfile(path)
    if not exists:
        what = "folder" if want_folder else "file"
        problem = (
            "is a folder" if os.path.isdir(path) else "is a file" if os.path.exists(path) else "not found"
        )
        raise FileNotFoundError(
            f"{weight_flag(key)} {os.fspath(path)}: {problem}; expected a local {what}: {WEIGHT_KEYS[key]}"
        )


def weights_fingerprint(*paths: str | os.PathLike) -> str:
    """A short id that changes with the contents of the given weight files and folders: SHA-256 over each file's
    size and its first and last MiB (all of it up to 2 MiB; a folder: every file below it with its relative path,
    so any file added to the folder counts). Reading at most 2 MiB of a 2 GB checkpoint keeps this instant; two
    files of one size that differ only in their middle share an id."""
    import hashlib

    digest = hashlib.sha256()
    for path in paths:
        root = os.fspath(path)
        files = (
            sorted(
                os.path.relpath(os.path.join(folder, name), root)
                for folder, _, names in os.walk(root)
                for name in names
            )
            if os.path.isdir(root)
            else [""]
        )
        for relative in files:
            file = os.path.join(root, relative) if relative else root
            size = os.path.getsize(file)
            digest.update(f"{relative}\0{size}\0".encode())
            with open(file, "rb") as f:
                digest.update(f.read(1 << 20))
                if size > 1 << 20:  # the last MiB, or what follows the first MiB of a smaller file
                    f.seek(max(1 << 20, size - (1 << 20)))
                    digest.update(f.read())
        digest.update(b"\1")
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class MetricSpec:
    """One registered metric.

    Attributes:
        name: registry key.
        weights: keys of `WEIGHT_KEYS` it needs.
        region: "whole" (generated image alone, with caption) or "kept" (generated vs original on the
            kept region).
        higher_is_better: direction.
        table_scale: factor BrushBench tables print the value with.
    """

    name: str
    weights: tuple[str, ...]
    region: str
    higher_is_better: bool
    table_scale: float = 1.0


METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec("image_reward", ("image_reward", "image_reward_tokenizer"), "whole", True, 10.0),
        MetricSpec("hps", ("hps", "hps_tokenizer"), "whole", True, 100.0),
        MetricSpec("aesthetic", ("aesthetic", "clip"), "whole", True),
        MetricSpec("psnr_brushbench", (), "kept", True),
        MetricSpec("mse_brushbench", (), "kept", False, 1e3),
        MetricSpec("lpips", ("lpips_backbone", "lpips_linear"), "kept", False, 1e3),
        MetricSpec("clip_score", ("clip",), "whole", True),
        MetricSpec("psnr", (), "kept", True),
        MetricSpec("mse", (), "kept", False, 1e3),
        MetricSpec("ssim", (), "kept", True, 100.0),
    )
}


def available_metrics() -> list[str]:
    """Names of all registered metrics, in BrushBench column order then the corrected pixel metrics."""
    return list(METRICS)


class MetricSuite:
    """Loads the feature models for the requested metrics and computes them per image.

    Args:
        weights: `WEIGHT_KEYS` key → local path. Missing keys make the metrics that need them skipped
            (one INFO log line each). `hps_tokenizer` defaults to `clip`.
        metrics: names to compute (default: all registered).
        device: where the feature models run.
        hps_config, image_reward_config: architectures (defaults: the published ones); tests pass
            tiny ones.

    Example:
        suite = MetricSuite({"clip": "ckpt/clip-vit-large-patch14"}, metrics=["clip_score", "psnr"])
        scores = suite(generated, original, mask, captions)  # {"clip_score": tensor(N), "psnr": ...}
    """

    def __init__(
        self,
        weights: Mapping[str, str | os.PathLike] | None = None,
        metrics: Sequence[str] | None = None,
        device: str | torch.device = "cpu",
        hps_config=None,
        image_reward_config=None,
    ):
        weights = self.check_weights(weights)
        if "clip" in weights:
            weights.setdefault("hps_tokenizer", weights["clip"])
        requested = list(metrics) if metrics is not None else available_metrics()
        unknown = sorted(set(requested) - set(METRICS))
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; available: {available_metrics()}")
        self.device = torch.device(device)
        self.metrics: list[str] = []
        self.skipped: list[str] = []
        for name in requested:
            missing = [key for key in METRICS[name].weights if key not in weights]
            if missing:
                logger.info(
                    "skipping %s: no weights given (%s; local paths only, see docs/benchmarking.md)",
                    name,
                    ", ".join(map(weight_flag, missing)),
                )
                self.skipped.append(name)
            else:
                self.metrics.append(name)
        self.weights_id: dict[str, str] = {
            name: weights_fingerprint(*(weights[key] for key in METRICS[name].weights))
            for name in self.metrics
            if METRICS[name].weights
        }
        """Active metric -> an id of the weight files it scores with (:func:`weights_fingerprint`); ``bench run``
        records it per row file and re-scores rows scored with other weights."""
        self._load(weights, hps_config, image_reward_config)

    @staticmethod
    def check_weights(weights: Mapping[str, str | os.PathLike] | None) -> dict[str, str | os.PathLike]:
        """The given weights (``None`` values dropped), each checked to exist, before anything loads.

        Raises:
            ValueError: an unknown key, or a path that is not the expected local file or folder.
        """
        weights = {key: value for key, value in (weights or {}).items() if value is not None}
        unknown = sorted(set(weights) - set(WEIGHT_KEYS))
        if unknown:
            raise ValueError(f"unknown metric weight keys {unknown}; known: {sorted(WEIGHT_KEYS)}")
        for key, path in weights.items():
            check_weight_path(key, path)
        return weights

    def _load(self, weights, hps_config, image_reward_config) -> None:
        try:
            self._load_models(weights, hps_config, image_reward_config)
        except ValueError as exc:  # which flag's file it was: each loader names the path, not the flag
            # the longest path the message names: --aesthetic-weights ckpt/clip/head.pth, not --clip-weights ckpt/clip
            named = [(len(os.fspath(v)), k) for k, v in weights.items() if os.fspath(v) in str(exc)]
            key = max(named)[1] if named else None
            if key is None:
                raise
            raise ValueError(f"{weight_flag(key)}: {exc}") from None

    def _load_models(self, weights, hps_config, image_reward_config) -> None:
        wanted = set(self.metrics)
        self.clip = self.clip_tokenizer = self.aesthetic_head = self.lpips = None
        self.hps = self.hps_tokenizer = self.image_reward = self.image_reward_tokenizer = None
        if wanted & {"clip_score", "aesthetic"}:
            from .clip_score import load_clip

            self.clip, self.clip_tokenizer = load_clip(weights["clip"], device=self.device)
        if "aesthetic" in wanted:
            from .aesthetic import load_aesthetic_head

            self.aesthetic_head = load_aesthetic_head(weights["aesthetic"]).to(self.device)
            head_in = next(self.aesthetic_head.parameters()).shape[1]
            clip_out = self.clip.config.projection_dim
            if head_in != clip_out:
                raise ValueError(
                    f"{os.fspath(weights['aesthetic'])}: the aesthetic head takes {head_in}-wide CLIP embeddings "
                    f"but the CLIP model (--clip-weights) gives {clip_out}: the LAION head for ViT-L/14 takes 768"
                )
        if "lpips" in wanted:
            from .lpips import load_lpips_squeeze

            self.lpips = load_lpips_squeeze(weights["lpips_backbone"], weights["lpips_linear"]).to(
                self.device
            )
        if "hps" in wanted:
            from .hps import VIT_H_14, load_hps

            self.hps, self.hps_tokenizer = load_hps(
                weights["hps"], weights["hps_tokenizer"], config=hps_config or VIT_H_14, device=self.device
            )
        if "image_reward" in wanted:
            from .image_reward import IMAGE_REWARD_V1, load_image_reward

            self.image_reward, self.image_reward_tokenizer = load_image_reward(
                weights["image_reward"],
                weights["image_reward_tokenizer"],
                config=image_reward_config or IMAGE_REWARD_V1,
                device=self.device,
            )

    @torch.no_grad()
    def __call__(
        self,
        generated: torch.Tensor,
        original: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        captions: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Scores a batch.

        Args:
            generated: `N×3×H×W` in [0, 1].
            original: `N×3×H×W` in [0, 1]; needed by the kept-region metrics.
            mask: `N×1×H×W`, 1 = hole; None = the whole image counts as kept.
            captions: N strings; needed by clip_score, hps and image_reward.

        Returns:
            metric name → `N` float64 values on the CPU, for every active metric.
        """
        results: dict[str, torch.Tensor] = {}
        for name in self.metrics:
            spec = METRICS[name]
            if spec.region == "kept" and original is None:
                raise ValueError(f"{name} compares with the original image: pass `original`")
            if name in ("clip_score", "hps", "image_reward") and captions is None:
                raise ValueError(f"{name} needs captions")
            results[name] = self._compute(name, generated, original, mask, captions).detach().double().cpu()
        return results

    def _compute(self, name, generated, original, mask, captions) -> torch.Tensor:
        if name in ("psnr_brushbench", "mse_brushbench", "ssim"):
            return getattr(pixel, name)(generated, original, mask)
        if name in ("psnr", "mse"):
            # corrected definition: per-channel mean over the kept pixels only (= mse_brushbench / 3)
            return getattr(pixel, name)(generated, original, mask, region="kept")
        generated = generated.to(self.device)
        if name == "lpips":
            from .lpips import lpips_distance

            mask = None if mask is None else mask.to(self.device)
            return lpips_distance(self.lpips, generated, original.to(self.device), mask)
        if name == "clip_score":
            from .clip_score import clip_score

            return clip_score(self.clip, self.clip_tokenizer, generated, captions)
        if name == "aesthetic":
            from .aesthetic import aesthetic_score

            return aesthetic_score(self.aesthetic_head, self.clip, generated)
        if name == "hps":
            from .hps import hps_score

            return hps_score(self.hps, self.hps_tokenizer, generated, captions)
        if name == "image_reward":
            from .image_reward import image_reward_score

            return image_reward_score(self.image_reward, self.image_reward_tokenizer, generated, captions)
        raise AssertionError(name)
