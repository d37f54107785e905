"""Reading base models and experts tensor by tensor."""

from twinrt.sources.checkpoint import GGUFFile, SafetensorsDir, TensorMeta, TensorSource, open_base, sha256_file
from twinrt.sources.experts import FullExpert, LoraExpert, check_compatible, open_expert

__all__ = ["FullExpert", "GGUFFile", "LoraExpert", "SafetensorsDir", "TensorMeta", "TensorSource",
           "check_compatible", "open_base", "open_expert", "sha256_file"]
