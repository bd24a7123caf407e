"""``python -m brushnet.cli``."""

from . import main

main()
