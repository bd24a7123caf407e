import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

# One torch thread per test process: pytest-xdist gives the parallelism (see shared/STYLE.md).
torch.set_num_threads(1)
