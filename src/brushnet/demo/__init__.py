"""The offline demo: small models trained on the procedural shapes world, shipped with the package.

- :mod:`brushnet.demo.train_world` trains every model from scratch (one command) on
  :mod:`brushnet.data.shapes` scenes: a VAE, a CLIP text encoder with a word-level tokenizer built offline,
  a text-to-image UNet, a BrushNet branch (with the project's own :mod:`brushnet.training`), a 9-channel
  inpainting UNet and an inpaint ControlNet.
- :mod:`brushnet.demo.assets` says where the shipped weights are and how each method loads them.
- :mod:`brushnet.demo.run` draws the demo grid; :mod:`brushnet.demo.cli` is ``brushnet demo``.
- :mod:`brushnet.demo.minibench` runs the mini-BrushBench through ``brushnet bench`` and summarises it.

Only light modules are imported here (the CLI imports this package at start-up).
"""

from .assets import DEMO_DIR, METHODS, method_models
from .cli import demo_command

__all__ = ["DEMO_DIR", "METHODS", "demo_command", "method_models"]
