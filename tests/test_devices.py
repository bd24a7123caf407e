"""``brushnet.devices``: device names checked before loading, and moves that do not make the host wait."""

import pytest
import torch

from brushnet.devices import resolve_device, to_device
from brushnet.errors import InputError


def test_resolve_device_names_and_refusals():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(InputError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available here"):
            resolve_device("cuda")


def test_to_device_on_the_cpu_keeps_values_and_converts_after_the_move():
    ints = torch.arange(6).reshape(2, 3)
    moved = to_device(ints, "cpu")
    assert moved is ints  # nothing to do: no copy
    floats = to_device(ints, torch.device("cpu"), torch.float16)
    assert floats.dtype == torch.float16 and torch.equal(floats, ints.to(torch.float16))
    assert not floats.is_pinned()  # page-locked memory only for a copy to CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_device_copies_to_cuda_without_a_synchronisation():
    """The sync debug mode raises on a blocking host-to-device copy (checked first, so the test can fail) and
    not on :func:`to_device`'s, whose values are the same."""
    host = torch.randn(4, 3, 32, 32)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            host.to("cuda")
        moved = to_device(host, "cuda", torch.float16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert moved.device.type == "cuda" and moved.dtype == torch.float16
    assert torch.equal(moved.cpu(), host.to(torch.float16))


def test_encode_latents_draws_what_diffusers_draws():
    """``encode_latents`` samples the posterior itself when its generators are on the CPU (to move the draws
    without a wait): the same latents as diffusers' ``latent_dist.sample``, for one generator and for a list."""
    from diffusers import AutoencoderKL

    from brushnet.models.conditioning import encode_latents

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=16,
    ).eval()  # fmt: skip
    pixels = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
        for make in (
            lambda: torch.Generator().manual_seed(7),
            lambda: [torch.Generator().manual_seed(i) for i in range(3)],
        ):
            expected = dist.sample(make()) * vae.config.scaling_factor
            assert torch.equal(encode_latents(vae, pixels, make()), expected)
        assert torch.equal(encode_latents(vae, pixels, sample=False), dist.mode() * vae.config.scaling_factor)
        one, other = (encode_latents(vae, pixels, torch.Generator().manual_seed(seed)) for seed in (7, 8))
        assert not torch.equal(one, other)  # the generator's draws are what is sampled


def test_deferred_losses_read_in_batches_and_keep_the_order():
    """Losses wait as tensors until ``every`` are waiting or ``read`` is called; the list keeps step order and
    extends the one it was given (a resumed run's earlier losses)."""
    from brushnet.devices import DeferredLosses

    earlier = [9.0]
    pending = DeferredLosses(earlier, every=3)
    values = [torch.tensor(float(i), requires_grad=True) * 1.0 for i in range(5)]
    for value in values[:2]:
        pending.add(value)
    assert earlier == [9.0]  # nothing read yet: no host wait
    pending.add(values[2])
    assert earlier == [9.0, 0.0, 1.0, 2.0]  # the third add reads the batch
    pending.add(values[3])
    pending.add(values[4])
    assert pending.read() is earlier and earlier == [9.0, 0.0, 1.0, 2.0, 3.0, 4.0]
    assert pending.read() == earlier  # nothing waiting: unchanged
