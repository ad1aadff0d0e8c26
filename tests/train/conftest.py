"""Trainer tests: make the repository root importable so ``configs.*`` resolve like in main.py."""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
