"""Opening, verifying and atomically writing twinrt/1 artifacts.

Every write builds a complete directory beside its target and swaps it in with one rename (an atomic
exchange of the two directories where the OS has one: Linux's renameat2), so a reader or a crash sees the old
artifact or the new one, never a mix. Beside twin.json, twin.json.sha256 holds the sha256 of its bytes.
Every path an Artifact hands out resolves inside its directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import uuid
from collections.abc import Collection, Iterator
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import safe_open

from twinrt import adapter
from twinrt.artifact.manifest import (
    DIGEST,
    FORMAT,
    MANIFEST,
    STATIC_DIR,
    STATIC_PREFIX,
    FactorInfo,
    Manifest,
    check_relpath,
)
from twinrt.errors import TwinError
from twinrt.sources.checkpoint import sha256_file
from twinrt.validation import describe

log = logging.getLogger(__name__)
_WRITER_TEMP = re.compile(r"\.[^/]+\.(tmp|old|build)-")  # .NAME.tmp-PID-*, .router.old-*, .router.build-*


def checksum_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` except the manifest and its digest, keyed by POSIX relative path."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in (MANIFEST, DIGEST):
            out[rel] = sha256_file(p)
    return out


def digest_line(manifest_bytes: bytes) -> str:
    """The content of twin.json.sha256, in `sha256sum` format (so `sha256sum -c twin.json.sha256` checks it)."""
    return f"{hashlib.sha256(manifest_bytes).hexdigest()}  {MANIFEST}\n"


def read_digest(root: Path) -> str | None:
    """The sha256 recorded in ROOT/twin.json.sha256; None if there is no digest file (an older artifact)."""
    f = root / DIGEST
    if not f.is_file():
        return None
    digest, _, name = f.read_text(encoding="ascii", errors="replace").strip().partition("  ")
    if name != MANIFEST or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise TwinError(f"artifact {root}: {DIGEST} is malformed (expected '<sha256>  {MANIFEST}')")
    return digest


def check_replaceable(target: Path) -> None:
    """Refuse to replace `target` unless it is absent, an empty directory, or a twinrt artifact.

    Only the format is checked (a damaged artifact may be replaced); `target` is never touched.
    """
    target = Path(target)
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink() or not target.is_dir():
        raise TwinError(f"output {target} is not a directory, so not a twinrt artifact; refusing to replace it")
    if not any(target.iterdir()):
        return
    try:
        fmt = json.loads((target / MANIFEST).read_bytes()).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = None
    if fmt != FORMAT:
        raise TwinError(f"output {target} is not a twinrt artifact (no {MANIFEST} of format {FORMAT}); --force "
                        "replaces only an artifact or an empty directory, so nothing was touched")


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


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Swap the paths `a` and `b` in one atomic step (Linux renameat2 RENAME_EXCHANGE).

    False, with nothing changed, where the OS or filesystem has no such call.
    """
    if sys.platform != "linux":
        return False
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(new: Path, target: Path) -> None:
    """Move the directory `new` to `target`, replacing what is there; afterwards `new` no longer exists.

    With an atomic exchange a crash leaves either tree at `target`; without one (not Linux) the old tree is
    renamed aside first, and put back if the second rename fails.
    """
    if not target.exists() and not target.is_symlink():
        new.rename(target)
        return
    if exchange(new, target):  # `new` now holds the old tree
        shutil.rmtree(new, ignore_errors=True)
        return
    old = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    target.rename(old)
    try:
        new.rename(target)
    except BaseException:
        old.rename(target)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside `target`; on success it replaces `target`, on any error it is removed.

    A process killed midway leaves only a hidden `.NAME.tmp-PID-*` dir (cleaned by the next writer), never
    a half-written `target`. `force` lets it replace whatever is at `target` (callers decide what may be).
    """
    target = Path(target).absolute()
    if target.exists() and not force:
        raise TwinError(f"output {target} already exists (pass --force to replace it)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(target)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as e:
        raise TwinError(f"cannot create {target}: {e.strerror or e}"
                        + (f" ({e.filename})" if e.filename else "")) from None
    try:
        yield tmp
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_file(path: Path, data: bytes) -> None:
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_manifest(root: Path, manifest: Manifest) -> None:
    """Write ROOT/twin.json and its digest ROOT/twin.json.sha256 (each by temp file + rename).

    `root` is a directory being assembled (atomic_dir's temp dir), so the pair appears in the artifact together.
    """
    data = json.dumps(manifest.model_dump(mode="json"), indent=1).encode()
    _write_file(root / MANIFEST, data)
    _write_file(root / DIGEST, digest_line(data).encode())


def _link_tree(src: Path, dst: Path) -> None:
    """Recreate the tree `src` at `dst` with hard links to its files (copies where links are refused)."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        dst.mkdir()
        for child in sorted(src.iterdir()):
            _link_tree(child, dst / child.name)
    else:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


class Artifact:
    """A verified twinrt/1 artifact on disk."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.root = Path(path).resolve()  # every path handed out must resolve inside this
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
        data = mfile.read_bytes()
        try:
            raw = json.loads(data)
        except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
            raise TwinError(f"{mfile} is not valid JSON: {e}") from None
        fmt = raw.get("format") if isinstance(raw, dict) else None
        if fmt != FORMAT:
            raise TwinError(f"{path}: artifact format {fmt!r} is not supported (this twinrt reads {FORMAT})")
        if verify:
            _check_manifest_digest(path, data)
        try:
            manifest = Manifest.model_validate(raw)
        except ValidationError as e:
            if e.errors()[0]["loc"]:  # a field is wrong
                raise TwinError(f"{mfile} is malformed at {describe(e, first=True)}") from None
            # the manifest as a whole: its parts disagree (describe has no location to name)
            raise TwinError(f"{mfile} is inconsistent: {describe(e, first=True).removeprefix('value: ')}") from None
        art = cls(path, manifest)
        if verify:
            art.verify()
        return art

    def inside(self, rel: str) -> Path:
        """ARTIFACT/rel, refused (TwinError) unless it resolves inside the artifact (no '..', no symlink out)."""
        try:
            check_relpath(rel)
        except ValueError as e:
            raise TwinError(f"artifact {self.path}: {e}") from None
        p = self.path / rel
        real = p.resolve()
        if real != self.root and self.root not in real.parents:
            raise TwinError(f"artifact {self.path}: {rel} resolves to {real}, outside the artifact; refused")
        return p

    def verify(self) -> None:
        """Refuse a missing or altered file, naming it."""
        for rel, digest in self.manifest.files.items():
            f = self.inside(rel)
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
        return self.inside("core")

    @property
    def router_dir(self) -> Path:
        return self.inside("router")

    @property
    def statics(self) -> list[str]:
        """The static-merge arms' names, "static:<label>", in the order they were added."""
        return [STATIC_PREFIX + label for label in self.manifest.static_labels]

    def expert_dir(self, name: str) -> Path:
        """experts/<name>/, or static/<label>/ for a static merge's arm name "static:<label>"."""
        if name.startswith(STATIC_PREFIX):
            self._check_static(name)
            return self.inside(f"{STATIC_DIR}/{name.removeprefix(STATIC_PREFIX)}")
        self._check_expert(name)
        return self.inside(f"experts/{name}")

    def _check_expert(self, name: str) -> None:
        if name not in self.experts:
            raise TwinError(f"unknown expert {name!r}; this artifact has: {', '.join(self.experts)}")

    def _check_static(self, name: str) -> None:
        if name not in self.statics:
            raise TwinError(f"unknown static merge {name!r}; this artifact has: {', '.join(self.statics) or 'none'}")

    def _factored(self, name: str) -> list[str]:
        if name.startswith(STATIC_PREFIX):
            tensors = self.manifest.static(name.removeprefix(STATIC_PREFIX)).tensors
            return [t for t, i in tensors.items() if isinstance(i, FactorInfo) and i.rank > 0]
        return list(self.manifest.factored(name))

    def load_factors(self, name: str, dtype: torch.dtype | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """An expert's factors: weight name -> (A [r, in], B [out, r]), with `B A = expert − core` (a static
        merge's, "static:<label>", too: `B A = static − core`)."""
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        with safe_open(str(self.expert_dir(name) / adapter.WEIGHTS_FILE), framework="pt") as f:
            for weight in self._factored(name):
                a_key, b_key = adapter.lora_keys(weight.removesuffix(".weight"))
                a, b = f.get_tensor(a_key), f.get_tensor(b_key)
                out[weight] = (a, b) if dtype is None else (a.to(dtype), b.to(dtype))
        return out

    def load_dense(self, name: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """An expert's (or static merge's) exact dense deltas from the core for tensors without factors; zero
        ones are absent."""
        f = self.expert_dir(name) / "dense.safetensors"
        if not f.is_file():
            return {}
        with safe_open(str(f), framework="pt") as h:
            return {k: h.get_tensor(k) if dtype is None else h.get_tensor(k).to(dtype) for k in h.keys()}

    @contextlib.contextmanager
    def staged(self, leave_out: Collection[str] = ()) -> Iterator[Path]:
        """The next state of this artifact, assembled beside it and swapped in atomically on a clean exit.

        The yielded dir starts as this artifact minus `leave_out` (relative paths: "router", "experts/math")
        and minus twin.json and its digest: every other file hard-linked (so it stays byte for byte what it
        was). The caller adds what is new and writes the manifest (`write_manifest`); on exit one atomic
        exchange swaps it in (see `replace_dir`). A crash or error at any point leaves the old artifact, which
        still verifies; the temp dir a crash leaves is removed by the next writer.
        """
        skip = {check_relpath(p) for p in leave_out}
        with atomic_dir(self.root, force=True) as stage:
            _link_except(self.root, stage, "", skip)
            yield stage

    def install_part(self, part: str, build: Path) -> None:
        """Replace the subdirectory `part` (e.g. "router") with the dir `build`, and re-checksum, atomically.

        The new artifact is assembled beside this one (`staged`), `build` moved in as `part`, a new twin.json
        and digest written, then swapped in. `build` must be a directory on the same filesystem; it is moved,
        not copied.
        """
        if "/" in part or part in (MANIFEST, DIGEST):
            raise ValueError(f"install_part: {part!r} is not an artifact part")
        check_relpath(part)
        build = Path(build)
        leave_out = [part] + [e.name for e in self.root.iterdir() if e.resolve() == build.resolve()]
        with self.staged(leave_out) as stage:
            build.rename(stage / part)
            files = {k: v for k, v in self.manifest.files.items() if not k.startswith(f"{part}/")}
            files.update({f"{part}/{k}": v for k, v in checksum_tree(stage / part).items()})
            update: dict = {"files": dict(sorted(files.items()))}
            if part in type(self.manifest.sizes).model_fields:
                size = sum(p.stat().st_size for p in (stage / part).rglob("*") if p.is_file())
                update["sizes"] = self.manifest.sizes.model_copy(update={part: size})
            manifest = Manifest.model_validate({**self.manifest.model_dump(), **update})
            write_manifest(stage, manifest)
        self.manifest = manifest


def _link_except(src: Path, dst: Path, rel: str, skip: set[str]) -> None:
    """Hard-link the tree `src` (at relative path `rel` of the artifact) into the existing dir `dst`, without
    the paths in `skip`, the manifest and its digest, and writers' temp dirs."""
    for entry in sorted(src.iterdir()):
        path = f"{rel}{entry.name}"
        if path in skip or (not rel and (entry.name in (MANIFEST, DIGEST) or _WRITER_TEMP.match(entry.name))):
            continue
        if entry.is_dir() and not entry.is_symlink() and any(s.startswith(path + "/") for s in skip):
            (dst / entry.name).mkdir()
            _link_except(entry, dst / entry.name, path + "/", skip)
        else:
            _link_tree(entry, dst / entry.name)


def _check_manifest_digest(path: Path, data: bytes) -> None:
    """Refuse a twin.json whose bytes differ from twin.json.sha256; accept one without it (written before the
    digest existed: its files are still checked against it), with a warning."""
    want = read_digest(path)
    if want is None:
        log.warning("artifact %s has no %s (written by an older twinrt): the manifest itself is not checked, "
                    "its files are", path, DIGEST)
        return
    if hashlib.sha256(data).hexdigest() != want:
        raise TwinError(f"artifact {path}: {MANIFEST} does not match its sha256 in {DIGEST} (edited or "
                        "corrupted); re-run the split")
