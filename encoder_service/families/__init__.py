"""Per-family media preprocessing (tiling, normalisation, content hashing)."""
