"""The offline demo: small models trained on the procedural shapes world, shipped with the package.

- :mod:`brushnet.demo.assets` says where the shipped weights are and which of them each method loads.
- :mod:`brushnet.demo.run` draws the demo grid (``brushnet demo``, in :mod:`brushnet.cli.demo`).
- :mod:`brushnet.demo.minibench` runs the mini-BrushBench through ``brushnet bench`` and summarises it.

The models are trained by the recipe in ``examples/demo_world/`` (not installed). Only light modules are
imported here.
"""

from .assets import DEMO_DIR, METHODS, method_models

__all__ = ["DEMO_DIR", "METHODS", "method_models"]
