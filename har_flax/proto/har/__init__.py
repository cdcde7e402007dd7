"""Generated package (see har_flax/proto/__init__.py)."""
