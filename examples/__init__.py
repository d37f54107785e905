"""Runnable examples of twinrt (run from the repository root as modules: `python -m examples.<path>`)."""
