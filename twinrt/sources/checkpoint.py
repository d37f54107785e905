"""Checkpoints read tensor by tensor: HF safetensors dirs (sharded or not) and GGUF files.

Only safetensors (and GGUF, through transformers) are ever read: pickle-based checkpoints are refused, since
unpickling an untrusted file runs arbitrary code.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open

from twinrt.dtypes import SAFETENSORS_CODES
from twinrt.errors import TwinError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype


class TensorSource(Protocol):
    """Named tensors of one model, readable one at a time."""

    label: str

    def names(self) -> list[str]: ...

    def meta(self, name: str) -> TensorMeta: ...

    def get(self, name: str) -> torch.Tensor: ...


def refuse_pickles(path: Path, what: str) -> None:
    """Raise if `path` holds only pickle-based weights (the caller found no safetensors)."""
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise TwinError(
            f"{what} {path} has only pickle-based weights ({', '.join(pickles)}); twinrt loads safetensors "
            "only, because unpickling runs arbitrary code. Convert with `save_pretrained(..., "
            "safe_serialization=True)` in a trusted environment."
        )


def read_header(file: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header and the byte offset where its data starts."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint_files(paths: Iterable[Path]) -> str:
    """sha256 over the given files' names and contents, in name order."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.name.encode())
        h.update(bytes.fromhex(sha256_file(p)))
    return "sha256:" + h.hexdigest()


class SafetensorsDir:
    """A Hugging Face model directory: config.json plus model.safetensors or a sharded index."""

    def __init__(self, path: Path, what: str = "model") -> None:
        self.path = Path(path)
        self.label = str(path)
        if not self.path.exists():
            raise TwinError(f"{what} {path} does not exist")
        if not self.path.is_dir():
            raise TwinError(f"{what} {path} is not a directory (expected a Hugging Face model dir)")
        config = self.path / "config.json"
        if not config.is_file():
            raise TwinError(f"{what} {path} has no config.json (expected a Hugging Face model dir)")
        try:
            self.config: dict[str, Any] = json.loads(config.read_text())
        except json.JSONDecodeError as e:
            raise TwinError(f"{config} is not valid JSON: {e}") from None
        self._handles: dict[Path, Any] = {}
        self._headers: dict[Path, tuple[dict[str, Any], int]] = {}
        self._where = self._index(what)  # tensor name -> file
        self._meta: dict[str, TensorMeta] = {}
        for file in sorted(set(self._where.values())):
            handle = self._open(file)
            for name in handle.keys():
                if self._where.get(name) == file:
                    sl = handle.get_slice(name)
                    self._meta[name] = TensorMeta(tuple(sl.get_shape()), _st_dtype(sl.get_dtype(), file))
        missing = sorted(set(self._where) - set(self._meta))
        if missing:
            raise TwinError(f"{what} {path}: the index names tensors absent from their shard: {missing[:3]}")

    def _index(self, what: str) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise TwinError(f"{index} is not a valid safetensors index: {e}") from None
            where = {name: self.path / file for name, file in weight_map.items()}
            for file in set(where.values()):
                if not file.is_file():
                    raise TwinError(f"{what} {self.path}: shard {file.name} named in the index is missing")
            return where
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            refuse_pickles(self.path, what)
            raise TwinError(f"{what} {self.path} has no *.safetensors weights")
        where: dict[str, Path] = {}
        for file in files:
            for name in self._open(file).keys():
                if name in where:
                    raise TwinError(f"{what} {self.path}: tensor {name} is in both {where[name].name} and {file.name}")
                where[name] = file
        return where

    def _open(self, file: Path) -> Any:
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise TwinError(f"{file} is not a readable safetensors file: {e}") from None
        return self._handles[file]

    def names(self) -> list[str]:
        return sorted(self._meta)

    def meta(self, name: str) -> TensorMeta:
        return self._meta[name]

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor with plain file reads: no memory map stays resident, so reading N experts tensor by
        tensor holds one tensor per expert, not N mapped files."""
        file = self._where[name]
        if file not in self._headers:
            self._headers[file] = read_header(file)
        header, start = self._headers[file]
        info = header[name]
        begin, end = info["data_offsets"]
        dtype, shape = _st_dtype(info["dtype"], file), info["shape"]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        buf = bytearray(end - begin)
        with open(file, "rb") as f:
            f.seek(start + begin)
            if f.readinto(buf) != len(buf):
                raise TwinError(f"{file} is truncated: tensor {name} extends past the end of the file")
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def files(self) -> list[Path]:
        return sorted(set(self._where.values()))

    def fingerprint(self) -> str:
        return fingerprint_files([*self.files(), self.path / "config.json"])


class GGUFFile:
    """A GGUF model file, dequantized by transformers into float32 tensors held in memory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.label = str(path)
        if not self.path.is_file():
            raise TwinError(f"base {path} does not exist")
        from transformers import AutoConfig, AutoModelForCausalLM

        try:
            config = AutoConfig.from_pretrained(self.path.parent, gguf_file=self.path.name)
            model = AutoModelForCausalLM.from_pretrained(
                self.path.parent, gguf_file=self.path.name, dtype=torch.float32
            )
        except Exception as e:  # transformers' GGUF reader raises plain errors on a bad file
            raise TwinError(f"base {path} could not be read as GGUF: {e}".splitlines()[0]) from None
        if not config.architectures:  # GGUF metadata has no class name; vLLM and AutoModel need one
            config.architectures = [type(model).__name__]
        config_dict = config.to_dict()
        config_dict.pop("quantization_config", None)
        self.config: dict[str, Any] = config_dict
        self.hf_config = config
        self._tensors: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, t in model.state_dict().items():
            if t.data_ptr() in seen:  # a tied weight (lm_head = embed_tokens): stored once, as HF saves it
                continue
            seen.add(t.data_ptr())
            self._tensors[name] = t.detach()

    def names(self) -> list[str]:
        return sorted(self._tensors)

    def meta(self, name: str) -> TensorMeta:
        t = self._tensors[name]
        return TensorMeta(tuple(t.shape), t.dtype)

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def fingerprint(self) -> str:
        return fingerprint_files([self.path])


def _st_dtype(code: str, file: Path) -> torch.dtype:
    try:
        return SAFETENSORS_CODES[code]
    except KeyError:
        raise TwinError(f"{file}: unsupported tensor dtype {code}") from None


def open_base(path: Path) -> SafetensorsDir | GGUFFile:
    """The base model: an HF safetensors dir, or a GGUF file (recognised by its magic bytes)."""
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise TwinError(f"base {path} is a file but not GGUF (expected an HF model dir or a .gguf file)")
        return GGUFFile(path)
    return SafetensorsDir(path, what="base")
