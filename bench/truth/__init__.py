"""Ground truth: each method checked against what the toy world knows (its labels, masks and palette)."""
