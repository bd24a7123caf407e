import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# One torch thread per test process (pytest-xdist gives the parallelism; see shared/STYLE.md), also for the CLI
# commands the tests run in-process, which honour OMP_NUM_THREADS; and OpenMP threads that sleep while waiting
# instead of spinning (read when torch loads OpenMP, so set before the import).
os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

torch.set_num_threads(1)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "golden_tiny"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Random tiny base + BrushNet folders, built once per test session (real files, real loaders)."""
    from brushnet.random_models import build_base, build_brushnet

    root = tmp_path_factory.mktemp("tiny_models")
    base = build_base(root / "base", "tiny", seed=0)
    brushnet = build_brushnet(root / "brushnet", base, seed=0)
    return {"base": base, "brushnet": brushnet, "root": root}


@pytest.fixture(scope="session")
def tiny_xl_models(tmp_path_factory):
    """Random tiny SDXL-layout base (model_index.json, two text encoders) + BrushNet, built once per session."""
    from brushnet.random_models import build_base, build_brushnet

    root = tmp_path_factory.mktemp("tiny_xl_models")
    base = build_base(root / "base", "tiny-xl", seed=0)
    brushnet = build_brushnet(root / "brushnet", base, seed=0)
    return {"base": base, "brushnet": brushnet, "root": root}


@pytest.fixture
def logged():
    """``with logged("diffusers.models.modeling_utils") as messages:`` collects the messages that reach that
    logger's handlers in the block (diffusers' loggers do not propagate to pytest's ``caplog``); the logger's
    filters apply first, so a message a filter drops is not collected."""
    import contextlib
    import logging

    @contextlib.contextmanager
    def collect(name: str):
        messages: list[str] = []

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                messages.append(record.getMessage())

        logger, keep = logging.getLogger(name), Keep()
        logger.addHandler(keep)
        try:
            yield messages
        finally:
            logger.removeHandler(keep)

    return collect
