"""twinrt: inference-time dynamic model merging (Twin-Merging) as a runtime.

A base model and N fine-tuned experts are split offline into a shared core (a static merge) and per-expert
low-rank exclusive factors; at serving time every request mixes the experts it needs.
"""

__version__ = "0.1.0"

from twinrt.errors import TwinError  # noqa: E402
from twinrt.runtime.model import TwinModel  # noqa: E402

__all__ = ["TwinError", "TwinModel", "__version__"]
