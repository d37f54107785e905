"""The dtypes twinrt knows, in one table each: the names users write, and safetensors' type codes."""

from __future__ import annotations

from typing import Literal, get_args

import torch

from twinrt.errors import TwinError

DtypeName = Literal["float32", "bfloat16", "float16"]  # what configs, CLIs and the server accept
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in get_args(DtypeName)}

# safetensors' dtype codes (the header's "dtype") <-> torch dtypes, for the tensors twinrt reads and writes
SAFETENSORS_CODES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
SAFETENSORS_CODE_OF: dict[torch.dtype, str] = {dt: code for code, dt in SAFETENSORS_CODES.items()}


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A dtype name ("float32", "bfloat16", "float16") or a torch dtype -> the torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise TwinError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}") from None
