"""Shared code of the toolkit's scripts (finetune.py, merge.py, inference.py)."""

from platy.cli import quiet_libraries

quiet_libraries()  # before any script imports transformers or bitsandbytes
