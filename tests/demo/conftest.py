"""The demo's training recipe lives in examples/demo_world/ (not installed): its modules import each other by
name, as when ``python examples/demo_world/train_world.py`` runs, so the folder goes on ``sys.path``."""

import sys
from pathlib import Path

EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "examples" / "demo_world"
if str(EXAMPLE_DIR) not in sys.path:
    sys.path.insert(0, str(EXAMPLE_DIR))
