"""One denoising prediction of a BrushNet pipeline as a plain function of tensors: what the loop calls each step.

:func:`guided_noise` = the branch, an optional ControlNet, the stock UNet with the branch's residuals added in-line
(:func:`~brushnet.models.unet_injection.run_unet_with_brushnet`), then classifier-free guidance (and its rescale).
With perturbed-attention guidance (PAG, Ahn et al. 2024) on, the UNet's batch gets a third copy of the conditional
input, whose self-attention the pipeline's PAG processors replace by the identity, and the prediction is
``ε_u + w (ε_c − ε_u) + s (ε_c − ε_perturbed)``, as diffusers' PAG pipelines compute it.
It reads nothing from the pipeline: the models come as arguments and what stays fixed during a call (guidance on
or off, where the branch runs, the models' dtypes) as a frozen :class:`StepPlan`. So the same function runs eagerly
(the default path, bit-for-bit the pipelines' previous arithmetic) and under ``torch.compile`` (``pipe.compile()``,
:mod:`brushnet.pipelines.fast_path`), where the plan's fields are the compiled graph's guards and every number that
changes per step or per call (timestep, branch scale, guidance scale) is a tensor, so nothing recompiles.

Nothing here synchronises with the device: no ``.item()``, no data-dependent Python branch, no dtype look-ups
(``ModelMixin.dtype`` walks the parameters; the plan holds the dtypes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.unet_injection import run_unet_with_brushnet

__all__ = ["StepPlan", "guided_noise", "predict_noise", "controlnet_residuals"]


@dataclass(frozen=True)
class StepPlan:
    """What one denoising prediction depends on besides its tensors; fixed for a call (or until a callback switches
    guidance off).

    Args:
        guidance: classifier-free guidance on: the model input is the doubled batch ``[unconditional, conditional]``.
        branch_on_doubled_batch: under guidance, run the branch on the doubled batch (it reads text: SDXL's pooled
            text, PowerPaint's cross-attention); otherwise once, on the conditional half, its residuals repeated.
        guess_mode: ControlNet-style guess mode (the unconditional half gets no residuals).
        rescale: apply ``guidance_rescale`` (Lin et al. 2023, §3.4).
        branch_dtype, unet_dtype, controlnet_dtype: the models' parameter dtypes.
        pag: perturbed-attention guidance on: the UNet's batch ends with a copy of the conditional input for the
            perturbed pass (``[unconditional, conditional, perturbed]``, or ``[conditional, perturbed]`` without
            classifier-free guidance). The branch does not run on that copy: its residuals are the conditional's.
        controlnet_guess_mode: the guide ControlNet runs in guess mode whatever ``guess_mode`` says (a ControlNet
            with ``global_pool_conditions``, as diffusers' ControlNet pipelines decide); the branch does not.
    """

    guidance: bool
    branch_on_doubled_batch: bool
    guess_mode: bool
    rescale: bool
    branch_dtype: torch.dtype
    unet_dtype: torch.dtype
    controlnet_dtype: torch.dtype | None = None
    pag: bool = False
    controlnet_guess_mode: bool = False

    @property
    def copies(self) -> int:
        """How many copies of the latents the UNet's batch holds: 1, 2 (CFG or PAG) or 3 (both)."""
        return 1 + int(self.guidance) + int(self.pag)


def guided_noise(
    brushnet: torch.nn.Module,
    unet: torch.nn.Module,
    controlnet: torch.nn.Module | None,
    plan: StepPlan,
    latents: torch.Tensor,
    t: torch.Tensor,
    prompt_embeds: torch.Tensor,
    brushnet_cond: torch.Tensor,
    conditioning_scale: float | torch.Tensor,
    guidance_scale: float | torch.Tensor,
    guidance_rescale: float | torch.Tensor = 0.0,
    *,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    timestep_cond: torch.Tensor | None = None,
    brushnet_prompt_embeds: torch.Tensor | None = None,
    image_embeds: list[torch.Tensor] | None = None,
    control_images: list[torch.Tensor] | None = None,
    controlnet_scale: float | list[float] | None = None,
    cross_attention_kwargs: dict | None = None,
    pag_scale: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """The guided noise prediction for ``latents`` (the scheduler-scaled latents, not doubled).

    Args:
        latents: ``(B, 4, h, w)``, already through ``scheduler.scale_model_input``; doubled here under guidance.
        guidance_scale, guidance_rescale: CFG weight and rescale factor (floats eagerly, 0-d tensors compiled).
        pag_scale: the perturbed-attention guidance weight at this step (``plan.pag``; the UNet's PAG processors
            are the pipeline's to set).
        the rest: as :func:`predict_noise` (batched ``[unconditional, conditional]`` under guidance; the perturbed
            copy is appended here).

    Returns:
        ``(B, 4, h, w)``: ``ε_u + w (ε_c − ε_u)`` under guidance (rescaled if ``plan.rescale``), else ``ε``; with
        PAG, ``+ s (ε_c − ε_perturbed)``.
    """
    copies = plan.copies
    latent_model_input = torch.cat([latents] * copies) if copies > 1 else latents
    if plan.pag:

        def with_perturbed(x: torch.Tensor | None) -> torch.Tensor | None:
            if x is None:
                return None
            if not plan.guidance and x.shape[0] == 2 * latents.shape[0]:  # guidance switched off mid-loop
                x = x.chunk(2)[1]
            return torch.cat([x, x.chunk(2)[1] if plan.guidance else x])

        prompt_embeds = with_perturbed(prompt_embeds)
        brushnet_prompt_embeds = with_perturbed(brushnet_prompt_embeds)
        if added_cond_kwargs:
            added_cond_kwargs = {k: with_perturbed(v) for k, v in added_cond_kwargs.items()}
        if image_embeds is not None:
            image_embeds = [with_perturbed(e) for e in image_embeds]
    noise_pred = predict_noise(
        brushnet,
        unet,
        controlnet,
        plan,
        latent_model_input,
        t,
        prompt_embeds,
        brushnet_cond,
        conditioning_scale,
        added_cond_kwargs=added_cond_kwargs,
        timestep_cond=timestep_cond,
        brushnet_prompt_embeds=brushnet_prompt_embeds,
        image_embeds=image_embeds,
        control_images=control_images,
        controlnet_scale=controlnet_scale,
        cross_attention_kwargs=cross_attention_kwargs,
    )
    if plan.pag:
        chunks = noise_pred.chunk(copies)
        noise_text, noise_perturbed = chunks[-2], chunks[-1]
        if not plan.guidance:
            return noise_text + pag_scale * (noise_text - noise_perturbed)
        noise_uncond = chunks[0]
        noise_pred = (
            noise_uncond
            + guidance_scale * (noise_text - noise_uncond)
            + pag_scale * (noise_text - noise_perturbed)
        )
    elif not plan.guidance:
        return noise_pred
    else:
        noise_uncond, noise_text = noise_pred.chunk(2)
        noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
    if plan.rescale:
        from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg

        noise_pred = rescale_noise_cfg(noise_pred, noise_text, guidance_rescale=guidance_rescale)
    return noise_pred


def predict_noise(
    brushnet: torch.nn.Module,
    unet: torch.nn.Module,
    controlnet: torch.nn.Module | None,
    plan: StepPlan,
    latent_model_input: torch.Tensor,
    t: torch.Tensor,
    prompt_embeds: torch.Tensor,
    brushnet_cond: torch.Tensor,
    conditioning_scale: float | torch.Tensor,
    *,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    timestep_cond: torch.Tensor | None = None,
    brushnet_prompt_embeds: torch.Tensor | None = None,
    image_embeds: list[torch.Tensor] | None = None,
    control_images: list[torch.Tensor] | None = None,
    controlnet_scale: float | list[float] | None = None,
    cross_attention_kwargs: dict | None = None,
) -> torch.Tensor:
    """One UNet prediction with the branch's residuals added in-line (and a ControlNet's on the skips).

    Under classifier-free guidance (inputs are the doubled batch, unconditional half first) the branch runs:

    - on the doubled batch when ``plan.branch_on_doubled_batch`` (its residuals depend on the text), as the
      originals do;
    - once, on the conditional half, when they do not (SD1.5): both halves would get identical residuals, so they
      are computed once and repeated;
    - once, on the conditional half, in guess mode; the unconditional half then gets no residuals;
    - not at all where ``conditioning_scale`` is a Python 0 (the eager loop's scale outside
      ``control_guidance_start/end``): its residuals would be zero, and the UNet runs without them. A tensor scale
      (the compiled step's) always runs it, so the graph does not depend on the scale's value.

    Args:
        brushnet, unet, controlnet: the models (``controlnet`` may be ``None``; ``unet`` may be compiled or carry
            offload hooks: it is run through :func:`~brushnet.models.unet_injection.run_unet_with_brushnet`).
        plan: the call's fixed settings (:class:`StepPlan`).
        latent_model_input: the scheduler-scaled latents, ``(B, 4, h, w)`` or ``(2B, 4, h, w)`` with guidance.
        t: the timestep.
        prompt_embeds: text embeddings matching ``latent_model_input``'s batch (or the doubled batch after a
            callback switched guidance off: the conditional halves are kept).
        brushnet_cond: ``(B, 5, h, w)`` (un-doubled).
        conditioning_scale: the branch's scale at this step.
        added_cond_kwargs: SDXL's ``{"text_embeds", "time_ids"}`` matching ``latent_model_input``'s batch.
        timestep_cond: the UNet's guidance embedding, if any.
        brushnet_prompt_embeds: the branch's own text embeddings (PowerPaint: its own text encoder), batched like
            ``prompt_embeds``; ``None``: the branch reads ``prompt_embeds``.
        image_embeds: IP-Adapter image embeddings (one tensor per adapter, batched like ``prompt_embeds``); the UNet
            reads them through its ``encoder_hid_proj``, the branch does not.
        control_images: the ControlNets' conditioning images ``(B, 3, H, W)`` (un-doubled), one per net.
        controlnet_scale: the ControlNets' scale at this step (a list with several nets); 0 skips them.
        cross_attention_kwargs: passed to the attention processors.

    Returns:
        The UNet's prediction for ``latent_model_input`` (guidance not yet applied).
    """
    cfg = plan.guidance
    if not cfg and prompt_embeds.shape[0] == 2 * latent_model_input.shape[0]:
        # guidance was switched off mid-loop (CFG-cutoff callbacks): keep the conditional halves
        prompt_embeds = prompt_embeds.chunk(2)[1]
    if image_embeds is not None and not cfg and image_embeds[0].shape[0] == 2 * latent_model_input.shape[0]:
        image_embeds = [e.chunk(2)[1] for e in image_embeds]
    if not torch.is_tensor(conditioning_scale) and conditioning_scale == 0:
        # a step outside control_guidance_start/end, or a scale of 0: every residual would be zero, so the branch
        # is not run and the UNet gets none (the same prediction, x + 0 = x, at the cost of the UNet alone)
        down = mid = up = None
    else:
        down, mid, up = branch_residuals(
            brushnet,
            plan,
            latent_model_input,
            t,
            prompt_embeds if brushnet_prompt_embeds is None else brushnet_prompt_embeds,
            brushnet_cond,
            conditioning_scale,
            added_cond_kwargs,
        )

    unet_dtype = plan.unet_dtype
    control_down = control_mid = None
    if control_images is not None and any(s != 0 for s in _as_list(controlnet_scale)):
        control_down, control_mid = controlnet_residuals(
            controlnet,
            plan,
            latent_model_input,
            t,
            prompt_embeds,
            control_images,
            controlnet_scale,
            added_cond_kwargs,
        )
        control_down = [r.to(unet_dtype) for r in control_down]
        control_mid = control_mid.to(unet_dtype)
    unet_added = _cast_added(added_cond_kwargs, unet_dtype) if added_cond_kwargs else {}
    if image_embeds is not None:
        unet_added["image_embeds"] = [e.to(unet_dtype) for e in image_embeds]
    return run_unet_with_brushnet(
        unet,
        latent_model_input.to(unet_dtype),
        t,
        prompt_embeds.to(unet_dtype),
        None if down is None else [r.to(unet_dtype) for r in down],
        None if mid is None else mid.to(unet_dtype),
        None if up is None else [r.to(unet_dtype) for r in up],
        timestep_cond=timestep_cond,
        cross_attention_kwargs=cross_attention_kwargs,
        added_cond_kwargs=unet_added or None,
        down_block_additional_residuals=control_down,
        mid_block_additional_residual=control_mid,
    )


def branch_residuals(
    brushnet: torch.nn.Module,
    plan: StepPlan,
    latent_model_input: torch.Tensor,
    t: torch.Tensor,
    branch_text: torch.Tensor,
    brushnet_cond: torch.Tensor,
    conditioning_scale: float | torch.Tensor,
    added_cond_kwargs: dict[str, torch.Tensor] | None,
) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
    """The branch's ``(down, mid, up)`` residuals (scaled), batched like ``latent_model_input``.

    ``branch_text``: the text the branch reads (:func:`predict_noise`'s ``brushnet_prompt_embeds`` or, without
    them, ``prompt_embeds``); the other arguments as :func:`predict_noise`.
    """
    cfg, guess_mode, copies = plan.guidance, plan.guess_mode, plan.copies
    # the branch runs on the distinct inputs only: [unconditional, conditional] when it reads text under guidance
    # (not in guess mode), else the conditional copy; its residuals are then laid out like the UNet's batch
    on_doubled_batch = cfg and plan.branch_on_doubled_batch and not guess_mode
    if not cfg and branch_text.shape[0] == 2 * latent_model_input.shape[0]:
        branch_text = branch_text.chunk(2)[1]
    conditional = 1 if cfg else 0  # the conditional copy's index in the UNet's batch
    if on_doubled_batch and copies == 2:
        branch_input, branch_added = latent_model_input, added_cond_kwargs
    elif on_doubled_batch:  # [unconditional, conditional] of [unconditional, conditional, perturbed]
        pair = 2 * brushnet_cond.shape[0]
        branch_input, branch_text = latent_model_input[:pair], branch_text[:pair]
        branch_added = {k: v[:pair] for k, v in added_cond_kwargs.items()} if added_cond_kwargs else None
    elif copies > 1:  # the conditional copy only
        branch_input = latent_model_input.chunk(copies)[conditional]
        branch_text = branch_text.chunk(copies)[conditional]
        branch_added = (
            {k: v.chunk(copies)[conditional] for k, v in added_cond_kwargs.items()}
            if added_cond_kwargs
            else None
        )
    else:
        branch_input, branch_added = latent_model_input, added_cond_kwargs
    branch_cond = torch.cat([brushnet_cond] * 2) if on_doubled_batch else brushnet_cond

    dtype = plan.branch_dtype
    down, mid, up = brushnet(
        branch_input.to(dtype),
        t,
        encoder_hidden_states=branch_text.to(dtype),
        brushnet_cond=branch_cond.to(dtype),
        conditioning_scale=conditioning_scale,
        guess_mode=guess_mode,
        added_cond_kwargs=_cast_added(branch_added, dtype) if branch_added else None,
        return_dict=False,
    )
    if on_doubled_batch and copies == 3:  # the perturbed copy gets the conditional residuals

        def expand(r):
            return torch.cat([r, r.chunk(2)[1]])

        down, mid, up = [expand(r) for r in down], expand(mid), [expand(r) for r in up]
    elif not on_doubled_batch and copies > 1:
        # every copy gets the same residuals; in guess mode the unconditional copy gets none

        def expand(r):
            return torch.cat(
                [torch.zeros_like(r) if cfg and guess_mode and k == 0 else r for k in range(copies)]
            )

        down, mid, up = [expand(r) for r in down], expand(mid), [expand(r) for r in up]
    return down, mid, up


def controlnet_residuals(
    controlnet: torch.nn.Module,
    plan: StepPlan,
    latent_model_input: torch.Tensor,
    t: torch.Tensor,
    prompt_embeds: torch.Tensor,
    control_images: list[torch.Tensor],
    scale: float | list[float],
    added_cond_kwargs: dict[str, torch.Tensor] | None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The ControlNets' skip and mid residuals, summed over nets, batched like ``latent_model_input``.

    Under classifier-free guidance they run on the doubled batch (they read the text), or, in guess mode, on the
    conditional half only, the unconditional half getting none (as diffusers' ControlNet pipelines).
    """
    guess_mode = plan.guess_mode or plan.controlnet_guess_mode
    conditional_only = plan.guidance and guess_mode
    net_input, net_text, net_added = latent_model_input, prompt_embeds, added_cond_kwargs
    copies = plan.copies
    if conditional_only:  # the copies after the unconditional one
        net_input, net_text = latent_model_input.chunk(copies)[1], prompt_embeds.chunk(copies)[1]
        net_added = (
            {k: v.chunk(copies)[1] for k, v in added_cond_kwargs.items()} if added_cond_kwargs else None
        )
    batch = net_input.shape[0]
    dtype = plan.controlnet_dtype
    images = [
        img if img.shape[0] == batch else torch.cat([img] * (batch // img.shape[0])) for img in control_images
    ]
    controlnet_kwargs = dict(
        encoder_hidden_states=net_text.to(dtype),
        guess_mode=guess_mode,
        added_cond_kwargs=_cast_added(net_added, dtype) if net_added else None,
        return_dict=False,
    )
    if len(images) == 1 and not isinstance(scale, (list, tuple)):
        down, mid = controlnet(
            net_input.to(dtype), t, controlnet_cond=images[0], conditioning_scale=scale, **controlnet_kwargs
        )
    else:
        down, mid = controlnet(
            net_input.to(dtype),
            t,
            controlnet_cond=images,
            conditioning_scale=list(scale),
            **controlnet_kwargs,
        )
    if conditional_only:
        down = [torch.cat([torch.zeros_like(r)] + [r] * (copies - 1)) for r in down]
        mid = torch.cat([torch.zeros_like(mid)] + [mid] * (copies - 1))
    return list(down), mid


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _cast_added(added: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """SDXL's added conditions in the model's dtype, except the time ids: they are pixel counts that the model
    embeds in float32 (``add_time_proj``), which bfloat16 would round (1365 to 1368)."""
    return {k: v if k == "time_ids" else v.to(dtype) for k, v in added.items()}
