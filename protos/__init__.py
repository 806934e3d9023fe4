"""Protocol buffer sources and the Python generated from them (see generate.py)."""
