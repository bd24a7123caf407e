"""How much a VAE decoder's kept pixels depend on what is in the hole: the check behind stage ``decoder_local``.

    python examples/demo_world/locality.py --vae src/brushnet/assets/demo_world/base/vae

prints, for the decoder of ``--vae``:

- its reconstruction PSNR on the first ``--scenes`` held-out scenes (``autoencoder.reconstruction_psnr``);
- its locality on the same scenes (``autoencoder.decoder_locality``: one random box of latent cells per scene
  replaced by another scene's latents, the latent's mean or noise; PSNR of the kept pixels, outside the box and
  a one-cell margin, against the decode of the untouched latent; higher is more local);
- per scene of ``brushnet demo``: the same kept-pixel PSNR when the latent cells of the scene's own hole hold the
  image's mean latent, or zeros, as a method's hole content would.

With ``--models DIR`` (a demo model set) it also runs ``--methods`` on the demo's scenes with the demo's settings
and prints each raw output's mean absolute error on the kept region, in 0-255 levels, against the input; the VAE
round trip's own error is the floor.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

__all__ = ["demo_scene_locality", "main", "method_kept_error"]


def _pixels(image) -> torch.Tensor:
    """PIL RGB → ``(1, 3, H, W)`` in [−1, 1] (``world_data.to_unit``, what the VAE stages read)."""
    from world_data import to_unit

    return to_unit(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None])


@torch.no_grad()
def demo_scene_locality(vae) -> list[dict]:
    """Per demo scene: kept-pixel PSNR (dB) of the decode with the hole's latent cells set to the image's mean
    latent / to zeros, against the decode of the untouched latent."""
    from brushnet.demo.run import DEMO_SCENES, demo_scene
    from brushnet.methods.latent_method import latent_hole

    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    rows = []
    for spec in DEMO_SCENES:
        scene = demo_scene(spec)
        z = vae.encode(_pixels(scene.image).to(vae.device)).latent_dist.mode()
        hole = torch.from_numpy(scene.hole)[None, None].float()
        in_hole = (latent_hole(hole, factor, 0) > 0.5).to(z.device)
        keep = torch.from_numpy(~scene.hole).to(z.device)
        clean = vae.decode(z).sample.clamp(-1, 1)
        row = {"scene": scene.label}
        for name, fill in (
            ("mean", z.mean(dim=(2, 3), keepdim=True).expand_as(z)),
            ("zeros", torch.zeros_like(z)),
        ):
            moved = vae.decode(torch.where(in_hole, fill, z)).sample.clamp(-1, 1)
            mse = ((moved - clean) / 2)[0].permute(1, 2, 0)[keep].pow(2).mean().clamp_min(1e-10)
            row[name] = float(10 * torch.log10(1 / mse))
        rows.append(row)
    return rows


@torch.no_grad()
def method_kept_error(models: str | Path, methods: list[str]) -> dict[str, list[float]]:
    """``{method: [mean |raw − input| on the kept region, 0-255, per demo scene]}`` with the demo's request and
    options; ``"vae round trip"`` is the floor."""
    from diffusers import AutoencoderKL
    from evaluate import SETTINGS

    from brushnet.demo.run import DEMO_SCENES, SIZE, demo_options, demo_scene, method_models
    from brushnet.methods import inpaint, load_method

    scenes = [demo_scene(spec) for spec in DEMO_SCENES]

    def error(image, scene) -> float:
        difference = np.abs(np.asarray(image, dtype=float) - np.asarray(scene.image, dtype=float))
        return float(difference[~scene.hole].mean())

    vae = AutoencoderKL.from_pretrained(Path(models) / "base" / "vae").eval()
    floor = []
    for scene in scenes:
        pixels = vae.decode(vae.encode(_pixels(scene.image)).latent_dist.mode()).sample.clamp(-1, 1)
        floor.append(error(((pixels[0].permute(1, 2, 0) + 1) * 127.5).round().numpy(), scene))
    errors = {"vae round trip": floor}
    for name in methods:
        method = load_method(name, method_models(name, models))
        errors[name] = [
            error(
                inpaint(
                    method, scene.image, scene.hole, {**SETTINGS, "prompt": scene.prompt, "blend": False,
                    "resolution": SIZE}, options=demo_options(name, scene.removal),
                ).images[0],
                scene,
            )
            for scene in scenes
        ]  # fmt: skip
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python examples/demo_world/locality.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--vae", required=True, help="An AutoencoderKL folder (a demo set's base/vae).")
    parser.add_argument(
        "--scenes", type=int, default=256, help="Held-out scenes (default 256, the record's)."
    )
    parser.add_argument("--models", help="A demo model set: also run --methods on the demo's scenes.")
    parser.add_argument(
        "--methods",
        default="blended-latent-diffusion,repaint,sd-inpainting,hd-painter",
        help="Comma-separated methods for --models.",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process (default 1).")
    args = parser.parse_args(argv)
    if not (Path(args.vae) / "config.json").is_file():
        parser.error(f"--vae {args.vae}: not a VAE folder (no config.json)")
    if args.models and not (Path(args.models) / "base" / "vae").is_dir():
        parser.error(f"--models {args.models}: not a demo model set (no base/vae folder)")
    if args.scenes < 1:
        parser.error("--scenes must be at least 1")
    from brushnet.methods.registry import available_methods

    unknown = [name for name in filter(None, args.methods.split(",")) if name not in available_methods()]
    if unknown:
        parser.error(
            f"--methods: unknown method(s) {', '.join(unknown)}; choose from {', '.join(available_methods())}"
        )
    torch.set_num_threads(args.threads)
    from autoencoder import decoder_locality, held_out_images, reconstruction_psnr
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(args.vae).eval()
    images = held_out_images(args.scenes)
    print(f"{args.vae}: {args.scenes} held-out scenes")
    print(f"reconstruction PSNR {reconstruction_psnr(vae, images):.2f} dB")
    scores = {fill: decoder_locality(vae, images, fill) for fill in ("other", "mean", "noise")}
    print("locality, one random box per scene: " + ", ".join(f"{k} {v:.2f} dB" for k, v in scores.items()))
    print("| demo scene | hole = mean latent | hole = zeros |\n| --- | ---: | ---: |")
    for row in demo_scene_locality(vae):
        print(f"| {row['scene']} | {row['mean']:.1f} dB | {row['zeros']:.1f} dB |")
    if args.models:
        errors = method_kept_error(args.models, list(filter(None, args.methods.split(","))))
        print("kept-region mean absolute error of the raw output (0-255), per demo scene:")
        for name, values in errors.items():
            print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
