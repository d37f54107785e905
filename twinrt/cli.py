"""The `twinrt` command line (Contract 2). User errors print one line and exit with code 2.

`split`, `inspect`, `add` and `remove` are twinrt's own; the other subcommands come from the packages above
twinrt (router, serving), which twinrt never imports: each entry point of the `twinrt.commands` group
(pyproject.toml) names a `register(subparsers)` that adds some (serving.commands adds router, serve, ab, eval).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from rich.console import Console

from twinrt.errors import TwinError

EXIT_USAGE = 2
COMMANDS_GROUP = "twinrt.commands"
console = Console(width=None if sys.stdout.isatty() else 120)  # pipes and CI logs get full tables


def _tensor_progress(label: str, quiet: bool) -> tuple[Any, Callable[[int], Callable[[str], None]]]:
    """(a transient progress bar to enter, `progress(total)` -> a callback per tensor done) for commands that
    go through a model tensor by tensor; off when quiet or not on a terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.description}"), console=console, transient=True,
                   disable=quiet or not console.is_terminal)

    def progress(total: int) -> Callable[[str], None]:
        task = bar.add_task("", total=total)
        return lambda name: bar.update(task, advance=1, description=name)

    return bar, progress


def _cmd_split(args: argparse.Namespace) -> int:
    from twinrt.artifact.report import summary_table
    from twinrt.config import check_device, load_config
    from twinrt.split.run import split

    check_device(args.device)
    cfg = load_config(args.config)
    bar, progress = _tensor_progress("split", args.quiet)
    t0 = time.perf_counter()
    with bar:
        manifest = split(cfg, Path(args.output), force=args.force, device=args.device, progress=progress,
                         keep={"config file": Path(args.config)})
    if not args.quiet:
        console.print(summary_table(manifest))
        console.print(f"wrote {args.output} in {time.perf_counter() - t0:.1f} s")
    return 0


def _cmd_add(args: argparse.Namespace) -> int:
    from twinrt.config import check_device
    from twinrt.split.add import add_expert, parse_assignment

    check_device(args.device)
    name, path = parse_assignment(args.expert)
    t0 = time.perf_counter()
    refitter = getattr(args, "router_refit", None)  # the router package's, when it is installed
    manifest = add_expert(args.artifact, name, path, base=args.base, device=args.device,
                          drop_router=args.drop_router, router=refitter(args) if refitter else None)
    if not args.quiet:
        from twinrt.artifact.report import summary_table

        console.print(summary_table(manifest))
        console.print(f"added {name!r} to {args.artifact} in {time.perf_counter() - t0:.1f} s; experts (mix "
                      f"order): {', '.join(manifest.expert_names)}")
    if manifest.history[-1].note:
        print(manifest.history[-1].note)
    return 0


def _cmd_remove(args: argparse.Namespace) -> int:
    from twinrt.artifact import Artifact
    from twinrt.artifact.update import remove_expert

    refitter = getattr(args, "router_refit", None)  # the router package's, when it is installed
    manifest, notes = remove_expert(Artifact.open(args.artifact), args.name, drop_router=args.drop_router,
                                    router=refitter(args) if refitter else None)
    for line in notes:
        print(line)
    if not args.quiet:
        console.print(f"removed {args.name!r} from {args.artifact}; experts (mix order): "
                      f"{', '.join(manifest.expert_names)}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from twinrt.artifact import Artifact
    from twinrt.artifact.report import static_table, summary_table

    art = Artifact.open(args.artifact, verify=not args.no_verify)
    m = art.manifest
    console.print(f"[bold]{args.artifact}[/bold]  format {m.format}, "
                  f"written by twinrt {m.twinrt_version} at {m.created}")
    console.print(f"base: {m.base.source} ({m.base.kind}, {m.base.architecture}, {m.base.fingerprint[:19]}…)")
    console.print(f"experts (mix order{f', {len(m.expert_names)}' if len(m.expert_names) > 16 else ''}): "
                  f"{', '.join(m.expert_names)}")
    later = [e for e in m.expert_names if not m.in_core(e)]
    gone = [e for e in m.shared.experts if e not in m.expert_names]
    if later or gone:
        console.print(f"core merged from: {', '.join(m.shared.experts)}"
                      + (f"; added later: {', '.join(later)}" if later else "")
                      + (f"; removed (still in the core): {', '.join(gone)}" if gone else ""))
    if m.shared.excluded:
        console.print(f"not merged (core = base): {len(m.shared.excluded)} tensors, e.g. {m.shared.excluded[0]}")
    console.print(summary_table(m, per_expert=True if args.experts else None))
    statics = static_table(m)
    if statics is not None:
        console.print(statics)
    stats_file = art.path / "statistics.json"  # written by a split whose core method needs calibration data
    if stats_file.is_file():
        import json

        from twinrt.artifact.report import human_bytes

        rec = json.loads(stats_file.read_text())
        total = rec.get("total", {})
        peak = total.get("peak_rss_bytes")
        console.print(f"calibration statistics ({', '.join(rec.get('statistics', []))}, for {rec.get('method')}): "
                      f"{len(rec.get('experts', []))} experts, "
                      f"{sum(e.get('tokens', 0) for e in rec.get('experts', []))} tokens, "
                      f"{total.get('seconds', 0):.1f} s, {human_bytes(total.get('bytes', 0))} on disk while splitting"
                      + (f", peak RSS {human_bytes(peak)}" if peak else ""))
    console.print(f"router: {'trained' if art.router_dir.is_dir() else 'none'}; "
                  + ("checksums verified" if not args.no_verify else "checksums not verified"))
    return 0


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    """--set K=V ... -> {K: V}, each value a YAML scalar (0.2 is a number, true a bool)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise TwinError(f"--set expects KEY=VALUE (e.g. density=0.2), got {item!r}")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise TwinError(f"--set {key}: {value!r} is not a value") from None
    return out


def _cmd_static(args: argparse.Namespace) -> int:
    from twinrt.artifact.report import human_bytes
    from twinrt.config import check_device
    from twinrt.split.static import add_static, remove_static

    if args.static_command == "remove":
        remove_static(args.artifact, args.label)
        if not args.quiet:
            console.print(f"removed static:{args.label} from {args.artifact}")
        return 0
    check_device(args.device)
    bar, progress = _tensor_progress(f"static:{args.label}", args.quiet)
    t0 = time.perf_counter()
    with bar:
        m = add_static(args.artifact, args.label, args.method, _parse_set(args.set), base=args.base,
                       device=args.device, progress=progress)
    if not args.quiet:
        st = m.static(args.label)
        exact = sum(1 for i in st.tensors.values() if getattr(i, "path", None) == "exact")
        console.print(f"added static:{args.label} ({st.method} {st.params}) to {args.artifact} in "
                      f"{time.perf_counter() - t0:.1f} s: {human_bytes(st.size.factors + st.size.dense)} "
                      f"({exact} tensors as exact factors, {human_bytes(st.size.dense)} dense)")
    return 0


def _drop_router_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--drop-router", action="store_true",
                   help="remove the artifact's router, which was fitted to the old expert set")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="twinrt", description="Inference-time dynamic model merging (Twin-Merging).")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("split", help="split a base model and N experts into a twin artifact")
    s.add_argument("config", help="split config YAML")
    s.add_argument("-o", "--output", required=True, help="artifact directory to write")
    s.add_argument("--force", action="store_true",
                   help="replace an existing output that is a twinrt artifact (or an empty directory)")
    s.add_argument("--device", default="cpu", help="device for the merge and SVD math (cpu, cuda, ...)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    s.set_defaults(fn=_cmd_split, sigterm_cleanup=True)

    i = sub.add_parser("inspect", help="print an artifact's manifest summary")
    i.add_argument("artifact")
    i.add_argument("--no-verify", action="store_true", help="skip the sha256 check of every file")
    i.add_argument("--experts", action="store_true",
                   help="one table row per expert also above 16 experts (default: one row per source kind)")
    i.set_defaults(fn=_cmd_inspect)

    a = sub.add_parser("add", help="factor one more expert against an artifact's core (the core and the other "
                              "experts stay as they are)")
    a.add_argument("artifact")
    a.add_argument("expert", metavar="NAME=PATH", help="the new expert: a full fine-tuned HF dir or a PEFT LoRA "
                   "adapter over the artifact's base")
    a.add_argument("--base", type=Path, help="the artifact's base model, if not at the path its manifest records "
                   "(its fingerprint must match)")
    _drop_router_flag(a)
    a.add_argument("--device", default="cpu", help="device for the SVD math (cpu, cuda, ...)")
    a.add_argument("-q", "--quiet", action="store_true", help="no summary")
    a.set_defaults(fn=_cmd_add, sigterm_cleanup=True)

    r = sub.add_parser("remove", help="remove an expert from an artifact (the core stays as it is)")
    r.add_argument("artifact")
    r.add_argument("name")
    _drop_router_flag(r)
    r.add_argument("-q", "--quiet", action="store_true", help="only what the user must know")
    r.set_defaults(fn=_cmd_remove, sigterm_cleanup=True)

    st = sub.add_parser("static", help="store a static merge of the experts beside the twin, served as the arm "
                        "static:LABEL (for A/B tests against the merges you would otherwise ship)")
    st_sub = st.add_subparsers(dest="static_command", required=True)
    sa = st_sub.add_parser("add", help="merge the artifact's experts (from their original sources) by a method")
    sa.add_argument("artifact")
    sa.add_argument("label", help="the arm is static:LABEL")
    sa.add_argument("--method", required=True, help="a data-free merge method (ties, dare_ties, task_arithmetic, "
                    "average, ...)")
    sa.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a method parameter, e.g. --set density=0.2 (repeatable; defaults: the method's)")
    sa.add_argument("--base", type=Path, help="the artifact's base model, if not at the recorded path")
    sa.add_argument("--device", default="cpu", help="device for the merge math")
    sa.add_argument("-q", "--quiet", action="store_true")
    sa.set_defaults(fn=_cmd_static, sigterm_cleanup=True)
    sr = st_sub.add_parser("remove", help="remove a static merge")
    sr.add_argument("artifact")
    sr.add_argument("label")
    sr.add_argument("-q", "--quiet", action="store_true")
    sr.set_defaults(fn=_cmd_static, sigterm_cleanup=True)

    for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda ep: ep.name):
        ep.load()(sub)
    return p


def error_line(e: BaseException) -> str:
    """A user error as the one line Contract 2 prints; characters stderr cannot encode are escaped."""
    line = f"twinrt: error: {e}".replace("\r", " ").replace("\n", " ")
    enc = getattr(sys.stderr, "encoding", None) or "utf-8"
    return line.encode(enc, "backslashreplace").decode(enc, "replace")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every cleanup (the temp dir of a split) runs."""


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While inside, SIGTERM raises Terminated (once; a second SIGTERM during the cleanup is ignored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # commands that write set `sigterm_cleanup`; `serve` keeps its own SIGTERM handling (it drains)
    with sigterm_raises() if getattr(args, "sigterm_cleanup", False) else contextlib.nullcontext():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if not args.verbose:
        os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF reader has its own tqdm bar
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except TwinError as e:
        print(error_line(e), file=sys.stderr)
        return EXIT_USAGE
    except Terminated:
        print("twinrt: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("twinrt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
