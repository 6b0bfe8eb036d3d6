"""``python -m export ARGS`` is ``ldm export ARGS``."""
import sys

from ldm_runtime.cli import main

sys.exit(main(["export", *sys.argv[1:]]))
