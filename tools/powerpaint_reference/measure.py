"""How far this project's PowerPaint is from the original's recorded outputs: the max abs error of every
pipeline-level run (tests/fixtures/powerpaint) and of the embeddings each model received.

Runs in the project's own environment (not the throw-away one of FACTS.md)::

    OMP_NUM_THREADS=1 python tools/powerpaint_reference/measure.py

The tests (tests/pipelines/test_pipeline_powerpaint.py, test_powerpaint_prompts.py) assert the same
comparisons against a 1e-4 / 1e-5 bar; this prints the numbers docs/powerpaint.md quotes.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import numpy as np
    from tests.pipelines import conftest
    from tests.pipelines.test_pipeline_powerpaint import RUN_IDS, run_like_the_fixture
    from tests.pipelines.test_powerpaint_prompts import OUR_TASK, USER

    from brushnet.pipelines.powerpaint_prompts import encode_task_prompts, task_prompts

    torch.set_num_threads(1)
    reference = conftest.powerpaint_reference.__wrapped__()
    runs, tensors = reference

    class Factory:  # stands in for pytest's tmp_path_factory
        def mktemp(self, name):
            return Path(tempfile.mkdtemp(prefix=name))

    pipes = conftest.powerpaint_pipes.__wrapped__(conftest.powerpaint_v1_base.__wrapped__(Factory()))
    worst = {"v1": 0.0, "v2": 0.0}
    for run_id in RUN_IDS:
        run = runs[run_id]
        out = run_like_the_fixture(pipes[run_id[:2]], run)
        error = float(np.abs(out - tensors[run["output_key"]].numpy()).max())
        worst[run_id[:2]] = max(worst[run_id[:2]], error)
        print(
            f"{run_id:36s} image max abs error {error:.2e}{'  (original patched: no guidance)' if run['patched'] else ''}"
        )
    embeddings = 0.0
    for run in runs.values():
        if run["guidance_scale"] != 7.5:
            continue
        version = run["version"].removeprefix("ppt-")
        pipe = pipes[version]
        built = task_prompts(OUR_TASK.get(run["task"], run["task"]), *USER[run["task"]], version)
        encoder = pipe.text_encoder_brushnet if version == "v2" else pipe.text_encoder
        tokenizer = pipe.tokenizer_brushnet if version == "v2" else pipe.tokenizer
        key = run["embeddings"]["unet_encoder_hidden_states"].removesuffix(".unet")
        with torch.no_grad():
            t = run["fitting_degree"]
            task = torch.cat(
                [
                    encode_task_prompts(encoder, tokenizer, [built.negative_a], [built.negative_b], t),
                    encode_task_prompts(encoder, tokenizer, [built.prompt_a], [built.prompt_b], t),
                ]
            )
            embeddings = max(
                embeddings,
                float((task - tensors[key + (".brushnet" if version == "v2" else ".unet")]).abs().max()),
            )
    print(
        f"worst image error: v1 {worst['v1']:.2e}, v2 {worst['v2']:.2e}; worst task-prompt embedding error {embeddings:.2e}"
    )


if __name__ == "__main__":
    main()
