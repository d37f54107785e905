"""Changing an artifact's expert set in place, atomically: the manifest side of `twinrt add` / `twinrt remove`.

The core never changes, so an expert's exclusive files (experts/<name>/) are independent of the others':
adding one writes its directory and merges its entries into twin.json, removing one drops both. Every change is
staged beside the artifact (`Artifact.staged`: the untouched files hard-linked) and swapped in with one atomic
exchange, so a reader or a crash sees the old artifact or the new one, each verifying.

A router under router/ was fitted to the old expert set (Contract 4: it maps to [B, N] in mix order), so it no
longer matches the new one: the change is refused unless the caller drops it (`drop_router`) or installs a
router refitted for the new set (`router=` a built dir, e.g. the prototype router with a class added).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from twinrt import __version__
from twinrt.artifact.manifest import (
    DenseInfo,
    ExpertInfo,
    ExpertSize,
    FactorInfo,
    HistoryEvent,
    Manifest,
    TensorInfo,
    check_expert_name,
)
from twinrt.artifact.store import Artifact, checksum_tree, write_manifest
from twinrt.artifact.writer import now
from twinrt.errors import TwinError

ROUTER = "router"


def check_new_name(art: Artifact, name: str) -> str:
    """`name` if it can name a new expert of `art`; TwinError saying why not."""
    try:
        check_expert_name(name)
    except ValueError as e:
        raise TwinError(str(e)) from None
    if name in art.experts:
        raise TwinError(f"expert {name!r} is already in {art.path} (experts: {', '.join(art.experts)}); "
                        f"`twinrt remove {art.path} {name}` first to replace it")
    return name


def check_router(art: Artifact, drop_router: bool, refit: bool = False) -> bool:
    """Whether the change drops the artifact's router; TwinError if it has one and neither `drop_router` nor a
    refitted router (`refit`) was given."""
    if not art.router_dir.is_dir() or refit:
        return False
    if not drop_router:
        raise TwinError(f"{art.path} has a router fitted to experts {', '.join(art.experts)}, which would not "
                        "match the new set: pass --drop-router (and train one again), or --router-data FILE "
                        "(the new expert's labelled examples) to refit it")
    return True


def _router_files(files: Mapping[str, str], stage: Path, router: bool) -> dict[str, str]:
    kept = {k: v for k, v in files.items() if not k.startswith(f"{ROUTER}/")}
    if router:
        kept.update({f"{ROUTER}/{k}": v for k, v in checksum_tree(stage / ROUTER).items()})
    return kept


def _dir_size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file()) if d.is_dir() else 0


@contextmanager
def adding(art: Artifact, info: ExpertInfo, *, drop_router: bool = False, refit: bool = False,
           ) -> Iterator[tuple[Path, Callable[..., None]]]:
    """Stage `art` with a new expert `info` appended to the mix order.

    Yields (stage dir, commit): the caller writes stage/experts/<name>/ (an ArtifactWriter with core=False)
    and calls `commit(tensors, size, router=None)` with that writer's tensor entries, the expert's size and,
    with `refit`, a dir holding the router refitted for the new expert set (moved in as router/); on exit
    the new state is swapped in and `art.manifest` updated.
    """
    check_new_name(art, info.name)
    dropped = check_router(art, drop_router, refit=refit)
    leave_out = [ROUTER] if dropped or refit else []
    done: list[Manifest] = []
    with art.staged(leave_out) as stage:
        def commit(tensors: dict[str, TensorInfo], size: ExpertSize, router: Path | None = None) -> None:
            m = art.manifest
            if set(tensors) != set(m.tensors):
                raise TwinError(f"expert {info.name!r}: its tensors differ from the artifact's")
            if router is not None:
                Path(router).rename(stage / ROUTER)
            merged = {t: m.tensors[t].model_copy(update={"experts": {**m.tensors[t].experts,
                                                                     info.name: tensors[t].experts[info.name]}})
                      for t in m.tensors}
            files = dict(m.files)
            files.update({f"experts/{info.name}/{k}": v
                          for k, v in checksum_tree(stage / "experts" / info.name).items()})
            files = _router_files(files, stage, (stage / ROUTER).is_dir())
            what = ("router dropped" if dropped else "router refitted" if router is not None else None)
            manifest = Manifest.model_validate({
                **m.model_dump(),
                "experts": [*m.experts, info], "tensors": merged, "files": dict(sorted(files.items())),
                "sizes": m.sizes.model_copy(update={"experts": {**m.sizes.experts, info.name: size},
                                                    "router": _dir_size(stage / ROUTER)}),
                "history": [*m.history, HistoryEvent(op="add", at=now(), experts=[info.name],
                                                     twinrt_version=__version__, note=what)],
            })
            write_manifest(stage, manifest)
            done.append(manifest)

        yield stage, commit
        if not done:
            raise RuntimeError("adding(): the caller never committed the new expert")
    art.manifest = done[0]


def remove_expert(art: Artifact, name: str, *, drop_router: bool = False,
                  router: Callable[[Artifact, list[str]], Path] | None = None) -> tuple[Manifest, list[str]]:
    """Remove expert `name` from `art` (its directory and every manifest entry; the mix order of the rest is
    kept), atomically. The core stays as it is, also when `name` is one it was merged from. `router(artifact,
    experts)`, if given, builds the router refitted for the remaining experts (a dir on the artifact's
    filesystem, moved in as router/).

    -> (the new manifest, one line per thing the user should know: the core keeps that expert, the router
    was dropped)."""
    m = art.manifest
    if name not in art.experts:
        raise TwinError(f"unknown expert {name!r}; {art.path} has: {', '.join(art.experts)}")
    if len(art.experts) == 1:
        raise TwinError(f"{name!r} is the only expert of {art.path}; an artifact keeps at least one")
    dropped = check_router(art, drop_router, refit=router is not None)
    notes = []
    if m.in_core(name):
        notes.append(f"expert {name!r} is one the core was merged from: the core keeps its contribution "
                     "unchanged, only its exclusive files go")
    if dropped:
        notes.append(f"the router was fitted to {', '.join(art.experts)}: dropped (train one again)")
    prefix = f"experts/{name}/"
    with art.staged([f"experts/{name}"] + ([ROUTER] if dropped or router is not None else [])) as stage:
        if router is not None:
            Path(router(art, [e for e in art.experts if e != name])).rename(stage / ROUTER)
            notes.append(f"the router was refitted for {', '.join(e for e in art.experts if e != name)}")
        tensors = {t: info.model_copy(update={"experts": _without(info.experts, name)})
                   for t, info in m.tensors.items()}
        files = _router_files({k: v for k, v in m.files.items() if not k.startswith(prefix)}, stage,
                              (stage / ROUTER).is_dir())
        manifest = Manifest.model_validate({
            **m.model_dump(),
            "experts": [e for e in m.experts if e.name != name], "tensors": tensors, "files": files,
            "sizes": m.sizes.model_copy(update={"experts": _without(m.sizes.experts, name),
                                                "router": _dir_size(stage / ROUTER)}),
            "history": [*m.history, HistoryEvent(op="remove", at=now(), experts=[name], twinrt_version=__version__,
                                                 note="; ".join(notes) or None)],
        })
        write_manifest(stage, manifest)
    art.manifest = manifest
    return manifest, notes


def _without(d: Mapping[str, FactorInfo | DenseInfo | ExpertSize], name: str) -> dict:
    return {k: v for k, v in d.items() if k != name}
