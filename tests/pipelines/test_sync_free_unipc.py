"""UniPC with its per-step coefficients on the host (issue 14: diffusers' UniPC synchronised the host with the GPU
7 times per step): the same trajectory as diffusers' scheduler, no copy to or read-back from the latents' device,
and what the scheduler names build."""

from __future__ import annotations

import pytest
import torch
from diffusers import UniPCMultistepScheduler
from torch.utils._python_dispatch import TorchDispatchMode

from brushnet.schedulers import make_scheduler
from brushnet.unipc import SyncFreeUniPCMultistepScheduler

SD_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}

# the last step to sigma 0 gives diffusers itself inf/NaN or a singular solve in some settings, so those end at
# sigma_min (what the original BrushNet's UniPC did)
MIN = {"final_sigmas_type": "sigma_min"}
CONFIGS = {
    "default (order 2, bh2, x0)": {},
    "original (ends at sigma_min)": {"final_sigmas_type": "sigma_min"},
    "order 3": {"solver_order": 3},
    "order 3, bh1": {"solver_order": 3, "solver_type": "bh1", **MIN},
    "noise prediction (predict_x0 off)": {"predict_x0": False, **MIN},
    "v-prediction": {"prediction_type": "v_prediction"},
    "no lower order at the end": {"lower_order_final": False, "solver_order": 3, **MIN},
    "corrector off at steps 0-2": {"disable_corrector": [0, 1, 2]},
    "karras sigmas": {"use_karras_sigmas": True},
}


def _model(sample: torch.Tensor, t) -> torch.Tensor:
    """A smooth stand-in for a denoiser: depends on the sample and the timestep."""
    return 0.3 * sample + torch.sin(sample * 2 + float(t) / 300)


def _trajectory(scheduler, steps: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    scheduler.set_timesteps(steps, device=device)
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    for t in scheduler.timesteps:
        sample = scheduler.step(_model(sample, t), t, sample, return_dict=False)[0]
    return sample


@pytest.mark.parametrize("name", list(CONFIGS))
def test_host_path_follows_diffusers_trajectory(name):
    config = {**SD_CONFIG, **CONFIGS[name]}
    reference = _trajectory(UniPCMultistepScheduler.from_config(config), 25)
    assert torch.isfinite(reference).all()
    ours = SyncFreeUniPCMultistepScheduler.from_config(config)
    ours.host_scalars_on_cpu = True  # the GPU path, run on CPU tensors
    calls: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        for method in ("multistep_uni_p_bh_update", "multistep_uni_c_bh_update"):
            original = getattr(UniPCMultistepScheduler, method)

            def counting(self, *args, _name=method, _original=original, **kwargs):
                calls.append(_name)  # diffusers' own update must not run: the host path replaces it
                return _original(self, *args, **kwargs)

            patch.setattr(UniPCMultistepScheduler, method, counting)
        result = _trajectory(ours, 25)
    assert calls == []
    assert (result - reference).abs().max() <= 1e-5 * reference.abs().max()


def test_cpu_latents_take_diffusers_path_bit_for_bit():
    config = {**SD_CONFIG, "solver_order": 3}
    reference = _trajectory(UniPCMultistepScheduler.from_config(config), 20)
    assert torch.equal(_trajectory(SyncFreeUniPCMultistepScheduler.from_config(config), 20), reference)


def test_half_precision_matches_diffusers():
    config = {**SD_CONFIG, "final_sigmas_type": "sigma_min"}
    reference = _trajectory(UniPCMultistepScheduler.from_config(config), 20, dtype=torch.bfloat16)
    ours = SyncFreeUniPCMultistepScheduler.from_config(config)
    ours.host_scalars_on_cpu = True
    result = _trajectory(ours, 20, dtype=torch.bfloat16)
    assert (result.float() - reference.float()).abs().max() <= 2e-2


class _DeviceTraffic(TorchDispatchMode):
    """Records ops that move data between the CPU and the 'meta' device standing in for a GPU: a copy of a CPU
    tensor that is not a 0-dim scalar, a read-back, a linear solve on the device."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)]
        on_meta = any(t.device.type == "meta" for t in tensors)
        name = str(func.overloadpacket)
        if on_meta:
            if name in ("aten._local_scalar_dense", "aten.linalg_solve_ex", "aten._linalg_solve_ex"):
                self.found.append(name)
            if any(t.device.type == "cpu" and t.dim() > 0 for t in tensors):
                self.found.append(f"{name} with a CPU tensor")
        if name in ("aten._to_copy", "aten.copy_") and kwargs.get("device") is not None:
            if torch.device(kwargs["device"]).type == "meta" and tensors and tensors[0].device.type == "cpu":
                self.found.append(f"{name} cpu -> device")
        if name == "aten.copy_" and len(args) > 1 and args[0].device.type == "meta":
            if args[1].device.type == "cpu":
                self.found.append("copy_ cpu -> device")
        return func(*args, **kwargs)


def _traffic(scheduler) -> list[str]:
    scheduler.set_timesteps(10)
    sample = torch.zeros(1, 4, 8, 8, device="meta")
    with _DeviceTraffic() as mode:
        for t in scheduler.timesteps:
            sample = scheduler.step(torch.zeros_like(sample), t, sample, return_dict=False)[0]
    return mode.found


def test_no_transfer_or_read_back_per_step_on_the_device():
    config = {**SD_CONFIG, "final_sigmas_type": "sigma_min", "solver_order": 3}
    # the control: diffusers' own scheduler copies sigmas to the device and solves there
    assert _traffic(UniPCMultistepScheduler.from_config(config))
    assert _traffic(SyncFreeUniPCMultistepScheduler.from_config(config)) == []


def test_scheduler_names_build_the_sync_free_unipc():
    for name in ("unipc", "unipc-original"):
        scheduler = make_scheduler(name, SD_CONFIG)
        assert type(scheduler) is SyncFreeUniPCMultistepScheduler
        assert isinstance(scheduler, UniPCMultistepScheduler)
    assert make_scheduler("unipc-original", SD_CONFIG).config.final_sigmas_type == "sigma_min"
    assert type(make_scheduler("ddim", SD_CONFIG)).__name__ == "DDIMScheduler"


def test_solver_p_runs_diffusers_code():
    from diffusers import DDIMScheduler

    config = dict(SD_CONFIG)
    solver_p = DDIMScheduler.from_config(config)
    reference = _trajectory(UniPCMultistepScheduler.from_config(config, solver_p=solver_p), 10)
    ours = SyncFreeUniPCMultistepScheduler.from_config(config, solver_p=DDIMScheduler.from_config(config))
    ours.host_scalars_on_cpu = True
    assert torch.equal(_trajectory(ours, 10), reference)
