"""`twinrt add`: factor one more expert against an artifact's existing core, as the split would have.

The core is not touched, so the other experts' files stay byte for byte what they were. For every tensor the
new expert's exclusive part is computed by the split's own functions (twinrt.split.run): τ = θ − θ_base from
the base (which must be the artifact's: its fingerprint is checked), d = τ − (θ_core − θ_base) with θ_core read
from core/, then the same rank/energy rule, SVD path and per-expert seed. So the new expert's files are exactly
those a full split with the same core would give it.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from twinrt.artifact.manifest import ExpertInfo, Manifest
from twinrt.artifact.store import Artifact
from twinrt.artifact.update import adding, check_new_name, check_router
from twinrt.artifact.writer import ArtifactWriter
from twinrt.dtypes import DTYPES
from twinrt.errors import TwinError
from twinrt.sources.checkpoint import GGUFFile, SafetensorsDir, open_base
from twinrt.sources.experts import check_compatible, open_expert
from twinrt.split.run import check_finite, check_integer_tensor, exclusive_deltas, task_vectors, write_exclusive

Progress = Callable[[str], None]


def parse_assignment(text: str) -> tuple[str, Path]:
    """NAME=PATH -> (name, path); TwinError on anything else."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise TwinError(f"expected NAME=PATH (e.g. legal=experts/legal/), got {text!r}")
    return name, Path(path)


def open_artifact_base(art: Artifact, base: Path | None) -> SafetensorsDir | GGUFFile:
    """The artifact's base model: `base`, or the source its manifest records; refused unless its fingerprint is
    the one the core was made from."""
    m = art.manifest
    path = Path(base) if base is not None else Path(m.base.source)
    if base is None and not path.exists():
        raise TwinError(f"the artifact's base {path} (recorded in its manifest) does not exist here; pass "
                        "--base PATH")
    opened = open_base(path)
    if opened.fingerprint() != m.base.fingerprint:
        raise TwinError(f"base {path} is not the base this artifact was split from (fingerprint "
                        f"{opened.fingerprint()[:19]}…, the manifest has {m.base.fingerprint[:19]}…)")
    return opened


def add_expert(artifact: Path | str, name: str, path: Path, *, base: Path | None = None, device: str = "cpu",
               drop_router: bool = False, router: Callable[[Artifact, list[str]], Path] | None = None,
               progress: Callable[[int], Progress] | None = None) -> Manifest:
    """Add expert `name` (a full fine-tuned HF dir or a PEFT LoRA adapter over the artifact's base, at `path`)
    to the artifact, atomically; -> the new manifest.

    `router(artifact, experts)`, if given, builds the router refitted for the new expert set `experts` (mix
    order) and returns its directory (on the artifact's filesystem: it is moved in); otherwise an existing
    router is refused unless `drop_router`.
    """
    art = Artifact.open(artifact)
    m = art.manifest
    check_new_name(art, name)
    check_router(art, drop_router, refit=router is not None)
    src = open_artifact_base(art, base)
    expert = open_expert(path, name, src)
    check_compatible(src, src.config, expert)
    core = SafetensorsDir(art.core_dir, what="core")
    names = src.names()
    floats = [n for n in names if src.meta(n).dtype.is_floating_point]
    if set(floats) != set(m.tensors):
        raise TwinError(f"base {src.label} has other float tensors than the artifact's manifest records")
    store = DTYPES[m.exclusive.dtype]
    info = ExpertInfo(name=name, source=str(path), kind=expert.kind, fingerprint=expert.fingerprint())
    tick = progress(len(names)) if progress else None
    with adding(art, info, drop_router=drop_router, refit=router is not None) as (stage, commit), \
            _built(router(art, [*art.experts, name]) if router is not None else None) as refit:
        writer = ArtifactWriter(stage, [name], store, core=False)
        for tname in names:  # the split's order, so the files are written tensor for tensor as it writes them
            base_t = src.get(tname)
            check_finite(base_t, tname, f"base {src.label}")
            if not base_t.is_floating_point():
                check_integer_tensor([expert], tname, base_t)
            else:
                base32 = base_t.to(device=device, dtype=torch.float32)
                tau = task_vectors([expert], tname, base_t, base32, device)  # [1, ...]
                core_t = core.get(tname).to(device)
                write_exclusive(writer, tname, base_t.shape, [name], exclusive_deltas(tau, core_t, base32),
                                factored=m.tensors[tname].role == "factored", spec=m.exclusive)
                del tau, core_t, base32
            if tick:
                tick(tname)
        sizes = writer.finish_experts()
        commit(writer.tensors, sizes[name], router=refit)
    return art.manifest


@contextmanager
def _built(path: Path | None) -> Iterator[Path | None]:
    """The refitted router's build dir (built before the expert's math, so bad router data fails early); removed
    if the add fails before it is moved in."""
    try:
        yield path
    finally:
        if path is not None and Path(path).exists():
            shutil.rmtree(path, ignore_errors=True)
