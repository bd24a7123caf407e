"""UniPC without host synchronisation per step on a GPU (issue 14): :class:`SyncFreeUniPCMultistepScheduler`, what
:func:`brushnet.schedulers.make_scheduler` builds for ``unipc`` and ``unipc-original``."""

from __future__ import annotations

import torch

# SchedulerMixin in this module's namespace: diffusers reloads a saved pipeline's scheduler by looking up its
# loading base class in the module that model_index.json names (``brushnet.unipc``)
from diffusers import SchedulerMixin, UniPCMultistepScheduler  # noqa: F401

__all__ = ["SyncFreeUniPCMultistepScheduler"]


class SyncFreeUniPCMultistepScheduler(UniPCMultistepScheduler):
    """diffusers' UniPC (Zhao et al. 2023, the B(h) predictor and corrector), with the per-step coefficients kept on
    the host when the latents are on a GPU.

    diffusers keeps the sigmas on the CPU and copies each one it needs to the latents' device, then works out the
    step's coefficients there with a dozen tiny kernels and, for the corrector of order 2 and up, a
    ``torch.linalg.solve`` whose error check reads a value back: on CUDA that is 7 host synchronisations per step
    at the default order 2 (measured on an H100: ``benchmarks/compile_speed.py``'s ``syncs/step``), each of which
    makes the host wait for the GPU instead of queueing the next step's work. Here the same
    coefficients are computed with the same float32 operations on CPU tensors, and only the latent-sized
    arithmetic runs on the device, taking them as scalars: no copy to the device, no read back.

    Numbers: identical to diffusers' on the CPU (where both compute the same operations; the CPU path is
    diffusers' own), and on a GPU the same up to the last bits of the coefficients (the CPU's ``log``/``expm1``
    and 2×2 solve instead of the GPU's), far below fp16's resolution. Configurations this does not cover
    (``solver_p``) run diffusers' code unchanged. State, ``step``, ``set_timesteps`` and everything else are
    diffusers'.
    """

    #: take the host path for CPU latents too (tests compare it with diffusers' path that way)
    host_scalars_on_cpu: bool = False

    def _host_path(self, sample: torch.Tensor | None, order: int | None, extra: tuple, named: dict) -> bool:
        if sample is None or order is None or extra or named or self.solver_p is not None:
            return False
        return sample.device.type != "cpu" or self.host_scalars_on_cpu

    def _alpha_sigma_lambda(self, index: int):
        alpha, sigma = self._sigma_to_alpha_sigma_t(self.sigmas[index].cpu())
        return alpha, sigma, torch.log(alpha) - torch.log(sigma)

    def _coefficients(self, target: int, source: int, earlier: list[int]):
        """The B(h) coefficients of a step from sigma index ``source`` to ``target`` with the model outputs of
        ``earlier`` indices (newest first), as CPU float32 tensors: the factor on the sample, the factor on the
        newest output, the factor on the correction sum, the ratios r_k, and the order conditions R ρ = b."""
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(target)
        alpha_s0, sigma_s0, lambda_s0 = self._alpha_sigma_lambda(source)
        h = lambda_t - lambda_s0
        ratios = [(self._alpha_sigma_lambda(index)[2] - lambda_s0) / h for index in earlier]
        nodes = torch.stack([*ratios, torch.ones(())])
        hh = -h if self.predict_x0 else h
        h_phi_1 = torch.expm1(hh)
        if self.config.solver_type == "bh1":
            b_h = hh
        elif self.config.solver_type == "bh2":
            b_h = torch.expm1(hh)
        else:
            raise NotImplementedError(f"UniPC solver_type {self.config.solver_type!r}")
        rows, rhs = [], []
        h_phi_k, factorial = h_phi_1 / hh - 1, 1
        for k in range(1, len(earlier) + 2):
            rows.append(torch.pow(nodes, k - 1))
            rhs.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        if self.predict_x0:
            keep, scale = sigma_t / sigma_s0, alpha_t
        else:
            keep, scale = alpha_t / alpha_s0, sigma_t
        return keep, scale * h_phi_1, scale * b_h, ratios, torch.stack(rows), torch.stack(rhs)

    def multistep_uni_p_bh_update(self, model_output, *args, sample=None, order=None, **kwargs):
        if not self._host_path(sample, order, args, kwargs):
            return super().multistep_uni_p_bh_update(
                model_output, *args, sample=sample, order=order, **kwargs
            )
        outputs, step = self.model_outputs, self.step_index
        newest = outputs[-1]
        keep, on_newest, on_sum, ratios, rows, rhs = self._coefficients(
            step + 1, step, [step - k for k in range(1, order)]
        )
        x_t = keep * sample - on_newest * newest
        if order > 1:
            differences = [(outputs[-(k + 1)] - newest) / ratios[k - 1] for k in range(1, order)]
            if order == 2:
                weights = torch.ones(1, dtype=sample.dtype) * 0.5
            else:
                weights = torch.linalg.solve(rows[:-1, :-1], rhs[:-1]).to(sample.dtype)
            x_t = x_t - on_sum * _weighted_sum(weights, differences)
        return x_t.to(sample.dtype)

    def multistep_uni_c_bh_update(
        self, this_model_output, *args, last_sample=None, this_sample=None, order=None, **kwargs
    ):
        if this_sample is None or not self._host_path(last_sample, order, args, kwargs):
            return super().multistep_uni_c_bh_update(
                this_model_output,
                *args,
                last_sample=last_sample,
                this_sample=this_sample,
                order=order,
                **kwargs,
            )
        outputs, step = self.model_outputs, self.step_index
        newest = outputs[-1]
        keep, on_newest, on_sum, ratios, rows, rhs = self._coefficients(
            step, step - 1, [step - (k + 1) for k in range(1, order)]
        )
        x_t = keep * last_sample - on_newest * newest
        if order == 1:
            weights = torch.ones(1, dtype=last_sample.dtype) * 0.5
        else:
            weights = torch.linalg.solve(rows, rhs).to(last_sample.dtype)
        correction = weights[-1] * (this_model_output - newest)
        if order > 1:
            differences = [(outputs[-(k + 1)] - newest) / ratios[k - 1] for k in range(1, order)]
            correction = _weighted_sum(weights[:-1], differences) + correction
        return (x_t - on_sum * correction).to(last_sample.dtype)


def _weighted_sum(weights: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Σ_k weights[k]·tensors[k], the weights a CPU vector used as scalars (no copy to the tensors' device)."""
    total = weights[0] * tensors[0]
    for weight, tensor in zip(weights[1:], tensors[1:]):
        total = total + weight * tensor
    return total
