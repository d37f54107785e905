"""A streaming safetensors writer: tensors are appended one at a time, so memory holds one tensor, not a model.

The file layout is safetensors' own: an 8-byte little-endian header length, a JSON header (names, dtypes,
shapes, byte offsets, `__metadata__`), padded with spaces to 8 bytes, then the raw little-endian data.
Data goes to a side file while tensors arrive; `close()` writes the header and appends the data.
Files larger than `max_shard_bytes` are split into HF-style shards with a `*.safetensors.index.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch

from twinrt.dtypes import SAFETENSORS_CODE_OF


class _Shard:
    def __init__(self, data_path: Path) -> None:
        self.data_path = data_path
        self.data = open(data_path, "wb")
        self.header: dict[str, dict] = {}
        self.offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> int:
        t = tensor.detach().to("cpu").contiguous()
        # flattened first: a "contiguous" [n, 1] tensor may still have a last-dim stride != 1 (rank-1 factors
        # are such views), which .view(uint8) refuses
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        self.data.write(raw)
        self.header[name] = {"dtype": SAFETENSORS_CODE_OF[t.dtype], "shape": list(t.shape),
                             "data_offsets": [self.offset, self.offset + len(raw)]}
        self.offset += len(raw)
        return len(raw)

    def finish(self, path: Path, metadata: dict[str, str]) -> None:
        self.data.close()
        header = dict(self.header)
        if metadata:
            header["__metadata__"] = metadata
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(path, "wb") as out, open(self.data_path, "rb") as data:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            shutil.copyfileobj(data, out, 1 << 22)
        os.unlink(self.data_path)


class SafetensorsWriter:
    """Write `<stem>.safetensors` (or `<stem>-0000i-of-0000n.safetensors` + index) tensor by tensor."""

    def __init__(self, directory: Path, stem: str = "model", max_shard_bytes: int = 5 << 30,
                 metadata: dict[str, str] | None = None) -> None:
        self.dir = Path(directory)
        self.stem = stem
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards: list[_Shard] = []
        self.total_bytes = 0
        self.names: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.names:
            raise ValueError(f"tensor {name} written twice")
        if tensor.dtype not in SAFETENSORS_CODE_OF:
            raise ValueError(f"tensor {name}: dtype {tensor.dtype} cannot be stored in safetensors")
        nbytes = tensor.numel() * tensor.element_size()
        if not self.shards or (self.shards[-1].offset and self.shards[-1].offset + nbytes > self.max_shard_bytes):
            self.shards.append(_Shard(self.dir / f".{self.stem}.part{len(self.shards)}.data"))
        self.total_bytes += self.shards[-1].add(name, tensor)
        self.names.add(name)

    def close(self) -> list[Path]:
        """Write the file(s); returns the paths written (shards and index)."""
        if not self.shards:
            self.shards.append(_Shard(self.dir / f".{self.stem}.part0.data"))
        n = len(self.shards)
        if n == 1:
            path = self.dir / f"{self.stem}.safetensors"
            self.shards[0].finish(path, self.metadata)
            return [path]
        paths, weight_map = [], {}
        for i, shard in enumerate(self.shards):
            path = self.dir / f"{self.stem}-{i + 1:05d}-of-{n:05d}.safetensors"
            weight_map.update({name: path.name for name in shard.header})
            shard.finish(path, self.metadata)
            paths.append(path)
        index = self.dir / f"{self.stem}.safetensors.index.json"
        index.write_text(json.dumps({"metadata": {"total_size": self.total_bytes},
                                     "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        return [*paths, index]
