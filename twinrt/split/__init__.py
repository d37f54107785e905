"""The offline split: base + experts -> shared core + low-rank exclusive factors (a twinrt/1 artifact)."""
