"""Opening, verifying and atomically writing twinrt/1 artifacts."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import safe_open

from twinrt.artifact.manifest import FORMAT, MANIFEST, Manifest
from twinrt.errors import TwinError
from twinrt.sources.checkpoint import sha256_file

LORA_PREFIX = "base_model.model."


def checksum_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` except the manifest, keyed by POSIX relative path."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out[p.relative_to(root).as_posix()] = sha256_file(p)
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(target: Path) -> None:
    # temp dirs are named .<target>.tmp-<pid>-<token>; remove those whose writer process is gone
    for p in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            pid = int(p.name.rsplit(".tmp-", 1)[1].split("-")[0])
        except ValueError:
            continue
        if not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside `target`; on success it replaces `target`, on any error it is removed.

    A process killed midway leaves only a hidden `.NAME.tmp-PID-*` dir (cleaned by the next writer), never
    a half-written `target`.
    """
    target = Path(target).absolute()
    if target.exists() and not force:
        raise TwinError(f"output {target} already exists (pass --force to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(root: Path, manifest: Manifest) -> None:
    """Write twin.json atomically (temp file + rename)."""
    tmp = root / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest.model_dump(mode="json"), indent=1))
    os.replace(tmp, root / MANIFEST)


class Artifact:
    """A verified twinrt/1 artifact on disk."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = True) -> Artifact:
        """Read twin.json, check the format version and (if `verify`) every file's sha256."""
        path = Path(path)
        mfile = path / MANIFEST
        if not path.is_dir():
            raise TwinError(f"artifact {path} does not exist or is not a directory")
        if not mfile.is_file():
            raise TwinError(f"{path} is not a twinrt artifact: {MANIFEST} is missing")
        try:
            raw = json.loads(mfile.read_text())
        except json.JSONDecodeError as e:
            raise TwinError(f"{mfile} is not valid JSON: {e}") from None
        fmt = raw.get("format") if isinstance(raw, dict) else None
        if fmt != FORMAT:
            raise TwinError(f"{path}: artifact format {fmt!r} is not supported (this twinrt reads {FORMAT})")
        try:
            manifest = Manifest.model_validate(raw)
        except ValidationError as e:
            first = e.errors()[0]
            raise TwinError(f"{mfile} is malformed at {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        art = cls(path, manifest)
        if verify:
            art.verify()
        return art

    def verify(self) -> None:
        """Refuse a missing or altered file, naming it."""
        for rel, digest in self.manifest.files.items():
            f = self.path / rel
            if not f.is_file():
                raise TwinError(f"artifact {self.path}: file {rel} listed in {MANIFEST} is missing")
            if sha256_file(f) != digest:
                raise TwinError(f"artifact {self.path}: file {rel} does not match its sha256 in {MANIFEST} "
                                "(modified or truncated); re-run the split")

    @property
    def experts(self) -> list[str]:
        return self.manifest.expert_names

    @property
    def core_dir(self) -> Path:
        return self.path / "core"

    @property
    def router_dir(self) -> Path:
        return self.path / "router"

    def expert_dir(self, name: str) -> Path:
        self._check_expert(name)
        return self.path / "experts" / name

    def _check_expert(self, name: str) -> None:
        if name not in self.experts:
            raise TwinError(f"unknown expert {name!r}; this artifact has: {', '.join(self.experts)}")

    def load_factors(self, name: str, dtype: torch.dtype | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """An expert's factors: weight name -> (A [r, in], B [out, r]), with `B A = expert − core`."""
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        with safe_open(str(self.expert_dir(name) / "adapter_model.safetensors"), framework="pt") as f:
            for weight in self.manifest.factored(name):
                module = weight.removesuffix(".weight")
                a = f.get_tensor(f"{LORA_PREFIX}{module}.lora_A.weight")
                b = f.get_tensor(f"{LORA_PREFIX}{module}.lora_B.weight")
                out[weight] = (a, b) if dtype is None else (a.to(dtype), b.to(dtype))
        return out

    def load_dense(self, name: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """An expert's exact dense deltas (expert − core) for tensors without factors; zero ones are absent."""
        f = self.expert_dir(name) / "dense.safetensors"
        if not f.is_file():
            return {}
        with safe_open(str(f), framework="pt") as h:
            return {k: h.get_tensor(k) if dtype is None else h.get_tensor(k).to(dtype) for k in h.keys()}

    def install_part(self, part: str, build: Path) -> None:
        """Replace the subdirectory `part` (e.g. "router") with the dir `build`, and re-checksum atomically.

        `build` must be a directory on the same filesystem; it is moved, not copied.
        """
        target = self.path / part
        old = self.path / f".{part}.old-{os.getpid()}"
        if target.exists():
            target.rename(old)
        Path(build).rename(target)
        files = {k: v for k, v in self.manifest.files.items() if not k.startswith(f"{part}/")}
        files.update({f"{part}/{k}": v for k, v in checksum_tree(target).items()})
        size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
        sizes = self.manifest.sizes.model_copy(update={part: size}) if part in type(self.manifest.sizes).model_fields else self.manifest.sizes
        self.manifest = self.manifest.model_copy(update={"files": dict(sorted(files.items())), "sizes": sizes})
        write_manifest(self.path, self.manifest)
        shutil.rmtree(old, ignore_errors=True)
