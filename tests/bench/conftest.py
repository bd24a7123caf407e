"""Tiny random-weight models and a tiny shapes-world BrushBench set, built once per session."""

import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    from brushnet.bench.speed import random_weight_models

    return random_weight_models("tiny", tmp_path_factory.mktemp("models"), ["brushnet", "sd-inpainting"])


@pytest.fixture(scope="session")
def shapes_set(tmp_path_factory):
    from brushnet.data.shapes_writers import write_eval_set

    out = tmp_path_factory.mktemp("shapes")
    write_eval_set(out, num_scenes=2, size=64, seed=3)
    return out
