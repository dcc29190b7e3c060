"""Training data: rows (rows.py) -> examples (examples.py) -> tokens (tokenize.py, cache.py)
-> packed rows (packing.py)."""
