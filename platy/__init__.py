"""The library below the toolkit's scripts (finetune.py, merge.py, inference.py, refine.py, evaluate.py):
the layout is in docs/architecture.md."""

from platy.cli import quiet_libraries

quiet_libraries()  # before any script imports transformers or bitsandbytes
