"""`twinrt eval ARTIFACT --tasks DIR`: the A/B table of experts, static merges, the core and the twin.

    twinrt eval ARTIFACT --tasks DIR [--out DIR] [--limit N] [--val-limit N] [--batch-size 16]
                [--max-new-tokens 24] [--methods average,task_arithmetic,ties,dare_ties,consensus | none]
                [--grid quick|full] [--calibration-samples 64] [--twin-ranks 1,4,16] [--no-router] [--resume]
                [--task-expert TASK=EXPERT ...]
                [--base PATH] [--expert-path NAME=PATH ...] [--device cpu] [--dtype float32] [--no-verify] [-q]

Prints the table (raw and normalized score per task, mean score, mean normalized score, stored MiB,
tokens/s per arm), router accuracy and the merge parameters chosen on validation; `--out DIR` writes
eval.json, eval.md and eval.png, and while the run goes, DIR/eval.partial.json with every step finished so far:
`--resume` continues a stopped run from it (twinrt.eval.journal). User errors raise TwinError (one line, exit 2).

twinrt does not import the router package: whoever registers the command passes `load_routing`, which turns
the artifact's trained router into the twin:router arm's Routing (router.twin_eval does).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from twinrt.dtypes import DTYPES
from twinrt.errors import TwinError

if TYPE_CHECKING:
    from twinrt.artifact import Artifact
    from twinrt.eval.run import Routing
    from twinrt.runtime.model import TwinModel

RoutingLoader = Callable[["Artifact", "TwinModel", str], "Routing"]
"""load_routing(art, tm, device) -> the twin:router arm: ARTIFACT/router/ over the eval's model on `device`."""

console = Console(width=None if sys.stdout.isatty() else 200)  # logs get the whole table on one line per arm


def parse_pairs(values: Sequence[str] | None, flag: str) -> dict[str, str]:
    """["a=b", "c=d"] -> {"a": "b", "c": "d"}; a malformed or repeated key is an error naming `flag`."""
    out: dict[str, str] = {}
    for v in values or ():
        key, sep, value = v.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise TwinError(f"{flag} expects KEY=VALUE, got {v!r}")
        if key.strip() in out:
            raise TwinError(f"{flag} gives {key.strip()!r} twice")
        out[key.strip()] = value.strip()
    return out


def parse_ranks(text: str | None) -> tuple[int, ...]:
    """'1,4,16' -> (1, 4, 16); None -> (); anything but integers is an error naming --twin-ranks."""
    if text is None:
        return ()
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise TwinError(f"--twin-ranks expects comma-separated integers, got {text!r}") from None


def _options(args: argparse.Namespace):
    from twinrt.eval.grid import parse_methods
    from twinrt.eval.run import EvalOptions

    return EvalOptions(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, limit=args.limit,
                       val_limit=args.val_limit, methods=parse_methods(args.methods), grid=args.grid,
                       task_expert=parse_pairs(args.task_expert, "--task-expert"),
                       base=Path(args.base) if args.base else None,
                       expert_paths={k: Path(v) for k, v in parse_pairs(args.expert_path, "--expert-path").items()},
                       check_fingerprints=not args.no_verify, calibration_samples=args.calibration_samples,
                       twin_ranks=parse_ranks(args.twin_ranks), split=args.split)


def _progress(bar) -> Callable[[str, int], Callable[[int], None]]:
    def start(label: str, total: int) -> Callable[[int], None]:
        task = bar.add_task(label, total=total)
        t0 = time.perf_counter()

        def advance(k: int) -> None:
            bar.update(task, advance=k)
            if bar.tasks[bar.task_ids.index(task)].finished:
                bar.remove_task(task)
                bar.console.print(f"[dim]{label}: {total} examples in {time.perf_counter() - t0:.1f} s[/dim]")

        return advance

    return start


def _cmd_eval(args: argparse.Namespace, load_routing: RoutingLoader) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from twinrt.artifact import Artifact
    from twinrt.config import check_device
    from twinrt.eval.journal import JOURNAL_NAME, Journal
    from twinrt.eval.report import notes, rich_table, write_outputs
    from twinrt.eval.run import run_eval
    from twinrt.eval.tasks import open_suite, task_experts
    from twinrt.runtime.model import TwinModel

    check_device(args.device)
    opts = _options(args)  # every user input is checked before a model is loaded
    if args.resume and not args.out:
        raise TwinError("--resume continues the run recorded in --out DIR; give the same --out as the stopped run")
    suite = open_suite(args.tasks)
    suite.load("test", opts.limit)
    art = Artifact.open(args.artifact, verify=not args.no_verify)
    task_experts(suite.names, art.experts, opts.task_expert)
    if not args.no_router and not art.router_dir.is_dir():
        raise TwinError(f"artifact {args.artifact} has no trained router: train one with `twinrt router train "
                        f"{args.artifact} --data FILE.jsonl`, or pass --no-router to leave out the twin:router arm")
    t0 = time.perf_counter()
    tm = TwinModel.from_artifact(args.artifact, device=args.device, dtype=args.dtype, verify=False)
    routing = None if args.no_router else load_routing(art, tm, args.device)
    bar = Progress(TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.description}"), console=console, transient=True,
                   disable=args.quiet or not console.is_terminal)
    journal = None
    if args.out:
        journal = Journal(Path(args.out) / JOURNAL_NAME, resume=args.resume)
        if journal.path.is_file() and not args.resume:
            console.print(f"{journal.path}: an unfinished earlier run is recorded there; starting over (pass "
                          "--resume to continue it instead)", highlight=False)
        elif args.resume and not journal.path.is_file():
            console.print(f"--resume: no unfinished run is recorded at {journal.path}; every step is run",
                          highlight=False)
    with bar:
        result = run_eval(tm, suite, opts, routing=routing, progress=None if args.quiet else _progress(bar),
                          journal=journal)
    if journal is not None and journal.resumed:
        console.print(f"resumed {len(journal.resumed)} finished steps from {journal.path}: "
                      f"{', '.join(journal.resumed)}", highlight=False)
    console.print(rich_table(result))
    for line in notes(result):
        console.print(line, highlight=False)
    if args.out:
        paths = write_outputs(result, Path(args.out))
        journal.remove()
        console.print(f"wrote {', '.join(str(p) for p in paths)}")
    console.print(f"eval took {time.perf_counter() - t0:.1f} s")
    return 0


def register(subparsers, load_routing: RoutingLoader) -> argparse.ArgumentParser:
    """Add `eval` to twinrt's subcommands; `load_routing` gives the twin:router arm (see RoutingLoader)."""
    e = subparsers.add_parser("eval", help="A/B table: the experts, static merges, the core and the twin on a "
                                           "task suite")
    e.add_argument("artifact", help="twin artifact directory")
    e.add_argument("--tasks", required=True, metavar="DIR", help="task suite: DIR/suite.json + DIR/<task>/test.jsonl")
    e.add_argument("--out", metavar="DIR", help="write eval.json, eval.md and eval.png here")
    e.add_argument("--split", default="test", help="the split every arm is scored on: test (default), or another "
                   "held-out one such as test_ood (the out-of-template phrasings)")
    e.add_argument("--limit", type=int, metavar="N", help="first N test examples per task (default: all)")
    e.add_argument("--val-limit", type=int, metavar="N",
                   help="first N validation examples per task for the merge grids (default: --limit)")
    e.add_argument("--batch-size", type=int, default=16, help="rows decoded together (default 16)")
    e.add_argument("--max-new-tokens", type=int, default=24, help="greedy tokens per reply (default 24)")
    e.add_argument("--methods", default="average,task_arithmetic,ties,dare_ties,consensus",
                   help="static merge arms, comma-separated, or 'none' (default: %(default)s; also pcb, dare_linear "
                        "and the data-based fisher, regmean, mats)")
    e.add_argument("--grid", choices=("quick", "full"), default="quick",
                   help="merge parameter grid searched on validation (see twinrt.eval.grid)")
    e.add_argument("--calibration-samples", type=int, default=64, metavar="N",
                   help="train examples per expert (of its own tasks) for the statistics of the data-based merges "
                        "fisher, regmean and mats (default 64)")
    e.add_argument("--twin-ranks", metavar="R,R,...",
                   help="for the twin on each core (the artifact's and every merge arm's), try these exclusive ranks "
                        "in ascending order until it reaches 0.99 of the experts' score (each rank costs a run "
                        "over the test split)")
    e.add_argument("--no-router", action="store_true", help="leave out the twin:router arm")
    e.add_argument("--resume", action="store_true",
                   help="continue the stopped run recorded in --out DIR (DIR/eval.partial.json): only the steps it "
                        "lacks are run; refused if the artifact, the examples or an option that changes scores "
                        "(--limit, --methods, --batch-size, --dtype, ...) differ")
    e.add_argument("--task-expert", action="append", metavar="TASK=EXPERT",
                   help="the own expert of a task whose name differs from the task's (repeatable)")
    e.add_argument("--base", metavar="PATH", help="where the artifact's base model is, if it moved")
    e.add_argument("--expert-path", action="append", metavar="NAME=PATH",
                   help="where an original expert is, if it moved (repeatable)")
    e.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    e.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="dtype the models are loaded and run in")
    e.add_argument("--no-verify", action="store_true",
                   help="skip the artifact's checksums and the base/expert fingerprint check")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    # SIGTERM unwinds like Ctrl-C: the statistics and merge temp dirs (GiBs for a real model) are removed,
    # and the journal keeps every finished step for --resume
    e.set_defaults(fn=functools.partial(_cmd_eval, load_routing=load_routing), sigterm_cleanup=True)
    return e

