"""HD-Painter on a 9-channel Stable Diffusion inpainting UNet (Manukyan et al., "HD-Painter: High-Resolution
and Prompt-Faithful Text-Guided Image Inpainting with Diffusion Models", arXiv 2312.14091), on upstream
diffusers.

The inpainting stage of the original (github.com/Picsart-AI-Research/HD-Painter @ d452186; what it does is
written down in ``tools/hd_painter_reference/FACTS.md``), reproduced to ~1e-4 on images
(``tests/pipelines/test_pipeline_hd_painter.py``): its pre-processing (1-px mask dilation, padding to a
multiple of 64, bicubic masks, posterior-mean masked latent), its DDIM loop on its own timestep grid
``T−1, T−1−Δ, …`` (Δ = T // steps), PAIntA (:mod:`.hd_painter_attention`) and RASG, whose update replaces
DDIM's fresh noise by the normalised gradient of a cross-attention score (paper eq. 7–8). The output is the
decoded last ``x̂0``. Differences from the original, each on purpose:

- the last step's RASG backward pass and update, whose result the original throws away, are skipped (the
  output is the same); so is the whole RASG backward pass when ``rasg_eta`` is 0 (it would be multiplied by 0);
- ``guidance_scale <= 1`` runs the conditional half only (the original always runs both halves; with
  ``guidance_scale = 1`` the result is the same up to float rounding);
- batches: every image of a batch is computed as if alone (PAIntA's relevance, RASG's gradient
  normalisation are per image); the original runs one image at a time;
- v-prediction models are supported (``x̂0`` and ``ε̂`` from the guided ``v``); the original has only
  epsilon models;
- ``timestep_spacing="trailing"`` gives exactly ``num_inference_steps`` steps (the original's grid runs
  ``⌈(T−1)/Δ⌉`` steps when the count does not divide T, e.g. 8 for 7; that stays the default).

The original's RASG σ is reproduced with its bug (single-step ``α = 1 − β`` instead of ``ᾱ``, FACTS §6):
it sets how strongly RASG acts at a given ``rasg_eta``. The super-resolution stage is not part of this
pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin
from diffusers.models import AutoencoderKL, UNet2DConditionModel
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, StableDiffusionMixin
from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from ..errors import InputError
from ..models.conditioning import encode_latents, from_model_latents
from ..schedulers import original_and_noise
from .common import (
    CheckedSourceMixin,
    check_finite,
    check_generator,
    check_image_dtype,
    check_positive_int,
    check_prompt,
    fit_one_row,
    warn_unused_negative,
)
from .hd_painter_attention import HDPainterAttentionState, hd_painter_attention

__all__ = ["StableDiffusionHDPainterPipeline", "hd_painter_timesteps", "hd_painter_token_indices"]

PAD_MULTIPLE = 64
"""The original pads image and mask (right and bottom, zeros = black and keep) to a multiple of 64 pixels."""


def hd_painter_timesteps(
    num_inference_steps: int, num_train_timesteps: int = 1000, spacing: str = "original"
):
    """The timesteps HD-Painter visits, noisiest first.

    ``"original"``: ``T−1, T−1−Δ, …`` while positive, ``Δ = T // num_inference_steps`` — diffusers' DDIM
    ``trailing`` grid when the count divides T, else more steps than asked (7 → 8: 999, 857, …, 147, 5).
    ``"trailing"``: diffusers' DDIM trailing grid, exactly ``num_inference_steps`` steps.
    """
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be in 1..{num_train_timesteps}, got {num_inference_steps}"
        )
    if spacing == "original":
        return list(range(num_train_timesteps - 1, 0, -(num_train_timesteps // num_inference_steps)))
    if spacing == "trailing":
        grid = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_inference_steps)) - 1
        return [int(t) for t in grid]
    raise ValueError(f"timestep_spacing must be 'original' or 'trailing', got {spacing!r}")


def hd_painter_token_indices(tokenizer, prompt: str, full_prompt: str) -> list[int]:
    """Positions of the text tokens PAIntA and RASG look at: the bare prompt's BPE tokens (after the start
    token) and the end token of the full prompt (prompt + positive addition), as the original selects them.

    Example: ``"a yellow teapot"`` with ``", Full HD, 4K, high quality, high resolution"`` → ``[1, 2, 3, 16]``.
    """
    length = tokenizer.model_max_length
    bare = tokenizer(prompt, truncation=True, max_length=length).input_ids
    full = tokenizer(full_prompt, truncation=True, max_length=length).input_ids
    return list(range(1, len(bare) - 1)) + [len(full) - 1]


def _dilate_cross(hole: torch.Tensor) -> torch.Tensor:
    """One step of binary dilation with the 4-neighbour cross (scipy's default structure), ``(B, 1, H, W)``."""
    padded = F.pad(hole, (1, 1, 1, 1))
    neighbours = (
        padded[..., :-2, 1:-1],
        padded[..., 2:, 1:-1],
        padded[..., 1:-1, :-2],
        padded[..., 1:-1, 2:],
    )
    out = hole.clone()
    for shifted in neighbours:
        out = torch.maximum(out, shifted)
    return out


def _bicubic(hole: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """PIL bicubic resize of a 0/1 mask as 0/255 ``L`` images to ``size = (h, w)``, back in [0, 1] (float64)."""
    out = []
    for mask in hole[:, 0].cpu().numpy():
        small = Image.fromarray((mask * 255).astype(np.uint8), "L").resize(
            size[::-1], Image.Resampling.BICUBIC
        )
        out.append(torch.from_numpy(np.asarray(small, np.float64) / 255.0))
    return torch.stack(out)[:, None]


class StableDiffusionHDPainterPipeline(
    CheckedSourceMixin,
    DiffusionPipeline,
    StableDiffusionMixin,
    TextualInversionLoaderMixin,
    StableDiffusionLoraLoaderMixin,
):
    r"""Text-guided inpainting with HD-Painter's PAIntA and RASG on a 9-channel SD1.x/SD2 inpainting UNet.

    Args:
        vae, text_encoder, tokenizer: the inpainting model's.
        unet: a 9-channel ``UNet2DConditionModel`` (latent 4 + mask 1 + masked-image latent 4). The pipeline
            sets attention processors on it for a call and restores the previous ones afterwards.
        scheduler: read for its noise schedule (``alphas_cumprod``, ``betas``) and ``prediction_type`` only;
            the loop is HD-Painter's own DDIM.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _callback_tensor_inputs = [
        "latents",
        "prompt_embeds",
        "noise_pred",
        "pred_original_sample",
        "rasg_gradient",
    ]

    encode_prompt = StableDiffusionPipeline.encode_prompt

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
    ):
        super().__init__()
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler
        )
        self.vae_scale_factor = (
            2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 8
        )
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Read at every step: a step callback that sets ``pipe._guidance_scale`` to ≤ 1 (diffusers'
        ``SDCFGCutoffCallback``) switches guidance off from the next step on."""
        return self._guidance_scale > 1

    # ------------------------------------------------------------------ inputs

    def prepare_conditions(
        self, image: torch.Tensor, mask_image: torch.Tensor, scales: tuple[int, ...]
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The original's pre-processing (FACTS §3) of an image and its hole.

        The hole is dilated by one pixel (4-neighbour cross), then image and hole are zero-padded right and
        bottom to a multiple of 64 (black, keep). The masked image (hole = 0, i.e. grey in [−1, 1]) is encoded
        to its posterior mean; the latent mask is the bicubic-resized hole where nonzero; the attention masks
        are the bicubic-resized hole above 0.5.

        Args:
            image: ``(B, 3, H, W)`` in [0, 1].
            mask_image: ``(B, 1, H, W)``; any value above 0 is hole (as the original's dilation reads it).
            scales: latent downscales the attention masks are wanted at (e.g. 2 and 4).
        Returns:
            ``condition`` ``(B, 5, h, w)`` (latent mask, masked-image latent; the UNet's channels 4–8) at the
            padded size, and ``{scale: (B, tokens) float, 1 = hole}``.
        """
        height, width = image.shape[-2:]
        hole = _dilate_cross((mask_image > 0).float())
        pad = (0, -width % PAD_MULTIPLE, 0, -height % PAD_MULTIPLE)
        image, hole = F.pad(image.float(), pad), F.pad(hole, pad)
        masked_image = (image * 2 - 1) * (1 - hole)
        device = self._execution_device
        with torch.no_grad():
            masked_latents = encode_latents(self.vae, masked_image.to(device), sample=False).float()
        latent_size = masked_latents.shape[-2:]
        latent_mask = (_bicubic(hole, latent_size) != 0).float().to(device)
        masks = {}
        for scale in scales:
            size = (latent_size[0] // scale, latent_size[1] // scale)
            masks[scale] = (_bicubic(hole, size) > 0.5).float().flatten(1).to(device)
        return torch.cat([latent_mask, masked_latents], dim=1), masks

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` from a step callback to skip the remaining steps (as in diffusers)."""
        return getattr(self, "_interrupt", False)

    def _image_tensor(self, image, name: str) -> torch.Tensor:
        if isinstance(image, Image.Image):
            image = [image]
        if isinstance(image, list):
            mode = "RGB" if name == "image" else "L"
            arrays = [np.asarray(im.convert(mode), np.float32) / 255.0 for im in image]
            image = torch.from_numpy(np.stack(arrays))
            image = image.permute(0, 3, 1, 2) if mode == "RGB" else image[:, None]
        if not isinstance(image, torch.Tensor) or image.ndim != 4:
            raise ValueError(f"`{name}` must be a PIL image, a list of them or a (B, C, H, W) tensor")
        if name == "image" and image.min() < 0:  # [-1, 1], as diffusers' image processor reads such a tensor
            image = (image + 1) / 2
        return image

    # ------------------------------------------------------------------ call

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = "",
        image: torch.Tensor | Image.Image | list[Image.Image] | None = None,
        mask_image: torch.Tensor | Image.Image | list[Image.Image] | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        positive_prompt: str = "",
        use_painta: bool = True,
        use_rasg: bool = True,
        rasg_eta: float = 0.1,
        painta_end_timestep: int = 500,
        timestep_spacing: str = "original",
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
    ):
        r"""Inpaint ``image`` where ``mask_image`` is white.

        Args:
            prompt: what to paint; PAIntA and RASG look at its tokens.
            image: ``(B or 1, 3, H, W)`` float in [0, 1] (or [-1, 1], read as diffusers reads it), or PIL; any
                size (padded to a multiple of 64 inside, the output cropped back). With several prompts, one
                image per prompt is repeated for its ``num_images_per_prompt`` images.
            mask_image: ``(B or 1, 1, H, W)`` or PIL, white / > 0 = region to generate.
            num_inference_steps: requested steps (see ``timestep_spacing``).
            guidance_scale: classifier-free guidance; at ``<= 1`` the conditional half only.
            negative_prompt: the unconditional text (``None`` = ``""``).
            positive_prompt: appended to each prompt as ``", <positive_prompt>"`` for the text encoder (the
                original's CLI default is ``"Full HD, 4K, high quality, high resolution"``; ``""`` = none).
            use_painta: PAIntA on the self-attention at 1/2 and 1/4 of the latent size, while
                ``t > painta_end_timestep``.
            use_rasg: RASG on every step but the last (one backward pass through the UNet each).
            rasg_eta: RASG's η: weight of the normalised gradient (and the matching cut of ``ε̂``), in [0, 1].
            painta_end_timestep: PAIntA acts on the steps whose timestep is above this (original: 500).
            timestep_spacing: ``"original"`` (the original's grid) or ``"trailing"``, see
                :func:`hd_painter_timesteps`.
            num_images_per_prompt, generator, latents: as in diffusers; image i draws its start noise
                ``(1, 4, h, w)`` from generator i, ``h, w`` the padded size / 8.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` (``(B, 3, H, W)`` in [0, 1]) or ``"latent"`` (the last
                ``x̂0``, undecoded, at the padded size).
            callback_on_step_end: called after each step with ``callback_on_step_end_tensor_inputs`` from
                ``latents`` (``z`` for the next step; after the last step the ``x̂0`` that is decoded),
                ``noise_pred`` (the guided model output), ``pred_original_sample`` (``x̂0``),
                ``rasg_gradient`` (the score's gradient before normalisation, ``None`` where none was
                computed), ``prompt_embeds``. A callback that sets ``pipe._guidance_scale`` to ≤ 1
                (diffusers' CFG-cutoff callbacks) turns guidance off for the remaining steps: the UNet then
                runs the conditional half only (the conditional half of ``prompt_embeds`` if it is still
                doubled), PAIntA and RASG with it.
            cross_attention_kwargs: as in diffusers: ``{"scale": s}`` weighs a LoRA loaded with
                ``load_lora_weights`` (UNet and text encoder); the rest reaches the attention processors. Textual
                inversion tokens (``load_textual_inversion``) expand as in diffusers, and PAIntA and RASG look at
                every vector's token.

        Returns:
            ``StableDiffusionPipelineOutput`` (``nsfw_content_detected`` is None) or a tuple.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback tensor inputs {unknown} are not among {self._callback_tensor_inputs}")
        if image is None or mask_image is None:
            raise ValueError("both `image` and `mask_image` are required")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        check_image_dtype("image", image)
        check_prompt("prompt", prompt)
        num_inference_steps = check_positive_int("num_inference_steps", num_inference_steps)
        num_images_per_prompt = check_positive_int("num_images_per_prompt", num_images_per_prompt)
        check_finite("guidance_scale", guidance_scale)
        warn_unused_negative(guidance_scale, negative_prompt=negative_prompt)
        if not 0.0 <= rasg_eta <= 1.0:
            raise ValueError(f"`rasg_eta` must be in [0, 1], got {rasg_eta}")
        prediction_type = self.scheduler.config.prediction_type
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"HD-Painter supports epsilon and v_prediction models, not {prediction_type!r}")
        if self.unet.config.in_channels != 9:
            raise ValueError(
                f"HD-Painter needs a 9-channel inpainting UNet, got {self.unet.config.in_channels}"
            )

        # 1. prompts, token positions, text embeddings
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        batch_size = len(prompts)
        if negative_prompt is None or isinstance(negative_prompt, str):
            negatives = [negative_prompt or ""] * batch_size
        else:
            negatives = [n for n in negative_prompt for _ in range(num_images_per_prompt)]
        if len(negatives) != batch_size:
            raise ValueError(f"{len(negatives)} negative prompts for {batch_size} prompts")
        check_generator(generator, batch_size)
        full_prompts = [f"{p}, {positive_prompt}" if positive_prompt else p for p in prompts]
        device = self._execution_device
        self._guidance_scale = guidance_scale
        cfg = self.do_classifier_free_guidance
        lora_scale = (cross_attention_kwargs or {}).get("scale")
        prompt_embeds, negative_embeds = self.encode_prompt(
            full_prompts, device, 1, cfg, negatives, lora_scale=lora_scale
        )
        if cfg:
            prompt_embeds = torch.cat([negative_embeds, prompt_embeds])
        token_weights = torch.zeros(batch_size, prompt_embeds.shape[1], device=device)
        for i, (bare, full) in enumerate(zip(prompts, full_prompts)):
            # the positions in what encode_prompt encodes: a textual inversion token as all its vectors' tokens
            bare, full = (self.maybe_convert_prompt(text, self.tokenizer) for text in (bare, full))
            token_weights[i, hd_painter_token_indices(self.tokenizer, bare, full)] = 1.0

        # 2. timesteps and the noise schedule
        timesteps = hd_painter_timesteps(
            num_inference_steps, self.scheduler.config.num_train_timesteps, timestep_spacing
        )
        alphas_cumprod = self.scheduler.alphas_cumprod.to(torch.float64)
        step_alphas = 1.0 - self.scheduler.betas.to(torch.float64)  # the original's RASG sigma uses these
        self._num_timesteps = len(timesteps)

        # 3. conditioning and start latents
        image = self._image_tensor(image, "image")
        mask_image = self._image_tensor(mask_image, "mask_image")
        height, width = image.shape[-2:]
        if mask_image.shape[-2:] != (height, width):
            raise ValueError(
                f"mask size {tuple(mask_image.shape[-2:])} differs from image size {(height, width)}"
            )
        painta_scales, rasg_scale = (2, 4), 4
        condition, masks = self.prepare_conditions(image, mask_image, painta_scales)
        if num_images_per_prompt > 1 and condition.shape[0] == batch_size // num_images_per_prompt > 1:
            # one image per prompt, as diffusers takes them: each repeated for its prompt's images
            condition = condition.repeat_interleave(num_images_per_prompt, dim=0)
            masks = {k: v.repeat_interleave(num_images_per_prompt, dim=0) for k, v in masks.items()}
        condition, masks = (
            self._per_sample(condition, batch_size),
            {k: self._per_sample(v, batch_size) for k, v in masks.items()},
        )
        shape = (batch_size, 4, *condition.shape[-2:])
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif latents.shape != shape:
            raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device=device, dtype=torch.float32)

        # 4. the loop
        state = HDPainterAttentionState(
            latent_size=tuple(condition.shape[-2:]),
            masks=masks,
            token_weights=token_weights,
            cfg=cfg,
            painta_scales=painta_scales,
            rasg_scale=rasg_scale,
        )
        unet_dtype = self.unet.dtype
        pred_original_sample = latents
        self._interrupt = False
        with hd_painter_attention(self.unet, state), self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:  # a callback set it: the remaining steps are skipped, as in diffusers
                    continue
                last = i == len(timesteps) - 1
                painta = use_painta and t > painta_end_timestep
                rasg = use_rasg and rasg_eta > 0 and not last
                cfg = self.do_classifier_free_guidance  # a step callback may have switched it off
                prompt_embeds = self._step_prompt_embeds(prompt_embeds, cfg, batch_size)
                state.cfg = cfg
                state.start_call(painta, rasg)
                with torch.enable_grad() if rasg else torch.no_grad():
                    sample = latents.detach().requires_grad_(rasg)
                    model_input = torch.cat([sample, condition], dim=1)
                    model_input = torch.cat([model_input] * 2) if cfg else model_input
                    timestep = torch.full((model_input.shape[0],), t, device=device, dtype=torch.long)
                    out = self.unet(
                        model_input.to(unet_dtype),
                        timestep,
                        encoder_hidden_states=prompt_embeds,
                        cross_attention_kwargs=cross_attention_kwargs,
                    ).sample
                self._check_layers(state, painta, rasg)
                noise_pred = out.detach().float()
                if cfg:
                    uncond, cond = noise_pred.chunk(2)
                    noise_pred = uncond + self.guidance_scale * (cond - uncond)

                pred_original_sample, eps = original_and_noise(
                    noise_pred, sample.detach(), float(alphas_cumprod[t]), prediction_type
                )

                rasg_gradient = None
                if last:
                    latents = pred_original_sample  # the original decodes the last x0 prediction
                else:
                    s = timesteps[i + 1]
                    a_s = float(alphas_cumprod[s])
                    if rasg:
                        rasg_gradient = self._rasg_gradient(state, sample)
                        # ĝ = g / std(g) per image (no mean subtracted, as the original); a zero gradient stays 0
                        spread = rasg_gradient.flatten(1).std(dim=1).clamp_min(1e-30).view(-1, 1, 1, 1)
                        normalised = rasg_gradient / spread
                        sigma = self._rasg_sigma(step_alphas, t, s)
                        noise_weight = max(0.0, 1 - a_s - (rasg_eta * sigma) ** 2) ** 0.5
                        latents = (
                            a_s**0.5 * pred_original_sample
                            + noise_weight * eps
                            + rasg_eta * sigma * normalised
                        )
                    else:
                        latents = a_s**0.5 * pred_original_sample + (1 - a_s) ** 0.5 * eps
                del out, sample, model_input

                if callback_on_step_end is not None:
                    values = {
                        "latents": latents,
                        "prompt_embeds": prompt_embeds,
                        "noise_pred": noise_pred,
                        "pred_original_sample": pred_original_sample,
                        "rasg_gradient": rasg_gradient,
                    }
                    outputs = callback_on_step_end(
                        self, i, t, {k: values[k] for k in callback_on_step_end_tensor_inputs}
                    )
                    latents = outputs.pop("latents", latents)
                    prompt_embeds = fit_one_row(
                        {"prompt_embeds": outputs.pop("prompt_embeds", prompt_embeds)},
                        {"prompt_embeds": prompt_embeds},
                        batch_size,
                    )["prompt_embeds"]
                progress_bar.update()

        # 5. decode the last x0 prediction, crop the padding
        if output_type == "latent":
            self.maybe_free_model_hooks()
            return (latents, None) if not return_dict else StableDiffusionPipelineOutput(latents, None)
        with torch.no_grad():
            decoded = self.vae.decode(from_model_latents(self.vae, latents)).sample
        images = ((decoded.float().clamp(-1, 1) + 1) / 2)[:, :, :height, :width]
        self.maybe_free_model_hooks()
        if output_type == "pt":
            images = images.cpu()
        else:
            images = self.image_processor.pt_to_numpy(images.cpu())
            if output_type == "pil":
                images = self.image_processor.numpy_to_pil(images)
        if not return_dict:
            return (images, None)
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)

    # ------------------------------------------------------------------ parts of the loop

    @staticmethod
    def _per_sample(tensor: torch.Tensor, batch_size: int) -> torch.Tensor:
        if tensor.shape[0] == batch_size:
            return tensor
        if tensor.shape[0] != 1:
            raise ValueError(f"{tensor.shape[0]} images or masks for a batch of {batch_size}")
        return tensor.expand(batch_size, *tensor.shape[1:])

    @staticmethod
    def _step_prompt_embeds(prompt_embeds: torch.Tensor, cfg: bool, batch_size: int) -> torch.Tensor:
        """The text embeddings for this step's UNet batch: after guidance was switched off mid-loop, the
        conditional half of a still doubled ``[negative; prompt]``."""
        if not cfg and prompt_embeds.shape[0] == 2 * batch_size:
            prompt_embeds = prompt_embeds.chunk(2)[1]
        expected = 2 * batch_size if cfg else batch_size
        if prompt_embeds.shape[0] != expected:
            raise ValueError(
                f"prompt_embeds has {prompt_embeds.shape[0]} rows for {batch_size} images with guidance "
                f"{'on' if cfg else 'off'} (expected {expected}): a step callback that changes guidance must "
                "return matching prompt_embeds (diffusers' SDCFGCutoffCallback keeps the last row: a batch of one)"
            )
        return prompt_embeds

    @staticmethod
    def _check_layers(state: HDPainterAttentionState, painta: bool, rasg: bool) -> None:
        """One-line errors for a UNet without the layers the parts need (PAIntA and RASG would do nothing)."""
        if painta and not state.painta_layers:
            raise InputError(
                "PAIntA found no self-attention layer at 1/2 or 1/4 of the latent size in this UNet; turn it "
                "off (use_painta=False / option painta=false)"
            )
        if rasg and not state.rasg_scores:
            raise InputError(
                "RASG found no cross-attention layer at 1/4 of the latent size in this UNet; turn it off "
                "(use_rasg=False / option rasg=false)"
            )

    @staticmethod
    def _rasg_gradient(state: HDPainterAttentionState, sample: torch.Tensor) -> torch.Tensor:
        """∂S/∂z_t of RASG's score ``S = −Σ_k BCEWithLogits(Ā_k − 1, M)`` (paper eq. 7), ``Ā_k`` the
        cross-attention scores of text token k averaged over the heads of every layer at 1/4 of the latent
        size, ``M`` the hole at that size, the sum over the prompt's tokens; per image."""
        with torch.enable_grad():
            scores = torch.cat(state.rasg_scores, dim=1).float().mean(dim=1)  # (B, tokens, text)
            target = state.masks[state.rasg_scale][:, :, None].expand_as(scores).to(scores)
            bce = F.binary_cross_entropy_with_logits(scores - 1.0, target, reduction="none").mean(dim=1)
            score = -(bce * state.token_weights.to(bce)).sum()
            (gradient,) = torch.autograd.grad(score, sample)
        state.rasg_scores = []
        return gradient.float()

    @staticmethod
    def _rasg_sigma(step_alphas: torch.Tensor, t: int, s: int) -> float:
        """The original's RASG σ between timesteps ``t`` and ``s``: DDIM's formula evaluated with the
        single-step ``α = 1 − β`` instead of ``ᾱ`` (its bug, kept: it sets RASG's strength)."""
        alpha_t, alpha_s = float(step_alphas[t]), float(step_alphas[s])
        return math.sqrt((1 - alpha_s) / (1 - alpha_t) * (1 - alpha_t / alpha_s))
