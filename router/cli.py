"""`twinrt router train|eval`: the router's command line, registered into twinrt's parser.

    twinrt router train ARTIFACT --data FILE.jsonl [--kind prototype|trained|hidden] [--holdout 0.2]
                        [--seed 0] [--label-key expert] [--temperature 1] [--top-k K] [--min-weight W]
                        [--fallback-threshold P] [--fallback uniform|core] [--hidden H] [--epochs E] ...
    twinrt router eval ARTIFACT --data FILE.jsonl [--data FILE2.jsonl ...] [--label-key expert] [--json OUT]
    twinrt router eval ARTIFACT --tasks DIR [--splits test,test_ood]       # a task suite, label = "task"

`train` writes ARTIFACT/router/ and prints held-out accuracy, the confusion matrix and ECE; `eval` prints
the same for the saved router on each data set, then (for two or more) one table with the data sets side by
side: top-1, ECE, NLL and each expert's accuracy. With `--tasks`, a data set is a split of the suite:
DIR/<expert>/<split>.jsonl for every expert of the artifact ("test": in-distribution held out, "test_ood":
out-of-template). User errors raise TwinError (printed as one line, exit 2).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from twinrt.errors import TwinError
from twinrt.validation import describe

console = Console(width=None if sys.stdout.isatty() else 120)


def confusion_table(confusion: list[list[int]], experts: list[str], title: str) -> Table:
    """Rows: true expert; columns: predicted expert; diagonal in bold."""
    t = Table(title=title)
    t.add_column("true \\ predicted")
    for e in experts:
        t.add_column(e, justify="right")
    t.add_column("recall", justify="right")
    for i, (name, row) in enumerate(zip(experts, confusion)):
        cells = [f"[bold]{v}[/bold]" if i == j else str(v) for j, v in enumerate(row)]
        total = sum(row)
        t.add_row(name, *cells, f"{row[i] / total:.1%}" if total else "-")
    return t


def print_evaluation(ev, experts: list[str], what: str) -> None:
    console.print(f"{what}: top-1 accuracy [bold]{ev.accuracy:.1%}[/bold] on {ev.n} examples, "
                  f"ECE {ev.ece:.3f}, NLL {ev.nll:.3f}")
    console.print(confusion_table(ev.confusion, experts, f"confusion ({what})"))


def _validated(model_cls, **kw):
    try:
        return model_cls(**kw)
    except ValidationError as e:
        raise TwinError(describe(e, flags=True, first=True)) from None


def _options(args: argparse.Namespace):
    from router.options import RoutingOptions

    return _validated(RoutingOptions, temperature=args.temperature, top_k=args.top_k,
                      min_weight=args.min_weight, fallback_threshold=args.fallback_threshold,
                      fallback=args.fallback)


def _read(path: str, label_key: str):
    from router.data import read_examples

    try:
        return read_examples(path, label_key)
    except UnicodeDecodeError as e:
        raise TwinError(f"data file {path} is not UTF-8 text ({e.reason} at byte {e.start} of a line)") from None


def cmd_train(args: argparse.Namespace) -> int:
    from router.store import save_router
    from router.train import TrainConfig, train_router
    from twinrt.artifact import Artifact
    from twinrt.config import check_device

    check_device(args.device)
    cfg = _validated(TrainConfig, kind=args.kind, holdout=args.holdout, seed=args.seed, hidden=args.hidden,
                     epochs=args.epochs, lr=args.lr, encoder=args.encoder, max_length=args.max_length,
                     options=_options(args), device=args.device)
    art = Artifact.open(args.artifact)
    examples = _read(args.data, args.label_key)
    t0 = time.perf_counter()
    out = train_router(art, examples, cfg, source=str(args.data))
    saved = save_router(out.router, art, out.training_record(cfg, Path(args.data).name, args.label_key),
                        features=None if args.no_features else (out.features, out.labels))
    console.print(f"[bold]{saved.kind}[/bold] router: fitted on {out.train_size} examples "
                  f"({out.holdout_size} held out) in {time.perf_counter() - t0:.1f} s; "
                  f"calibration temperature {saved.temperature:.3g}")
    if out.evaluation is None:
        console.print("no hold-out split (--holdout 0): accuracy and calibration not measured")
    else:
        print_evaluation(out.evaluation, art.experts, "held out")
        if not math.isnan(out.nll_uncalibrated):
            console.print(f"held-out NLL at temperature 1: {out.nll_uncalibrated:.3f}. The temperature is fitted "
                          "on this split with a 1/(M+1) pseudo-error, so metrics here are optimistic; "
                          "use `router eval` on other data")
    console.print(f"wrote {art.router_dir}")
    return 0


def side_by_side(evals: dict, experts: list[str]) -> Table:
    """One column per data set: top-1, ECE, NLL, examples, then each expert's accuracy."""
    t = Table(title="router quality by data set")
    t.add_column("")
    for name in evals:
        t.add_column(name, justify="right")
    t.add_row("top-1", *[f"{ev.accuracy:.1%}" for ev in evals.values()])
    t.add_row("ECE", *[f"{ev.ece:.3f}" for ev in evals.values()])
    t.add_row("NLL", *[f"{ev.nll:.3f}" for ev in evals.values()])
    t.add_row("examples", *[str(ev.n) for ev in evals.values()])
    for i, e in enumerate(experts):
        t.add_row(e, *["-" if math.isnan(ev.per_expert[i]) else f"{ev.per_expert[i]:.1%}" for ev in evals.values()])
    return t


def suite_split(tasks: Path, split: str, experts: list[str]) -> list:
    """Every expert's DIR/<expert>/<split>.jsonl, labelled by its "task" field."""
    out = []
    for e in experts:
        f = tasks / e / f"{split}.jsonl"
        if not f.is_file():
            raise TwinError(f"task suite {tasks}: {f} is missing (split {split!r} of expert {e!r})")
        out += _read(str(f), "task")
    return out


def eval_sets(args: argparse.Namespace, experts: list[str]) -> dict[str, tuple[str, list]]:
    """{name: (where it came from, examples)} of the data sets `eval` was given, in order."""
    sets: dict[str, tuple[str, list]] = {}
    for f in args.data or []:
        sets[Path(f).name if Path(f).name not in sets else f] = (str(f), _read(f, args.label_key))
    if args.tasks:
        for split in [s.strip() for s in args.splits.split(",") if s.strip()]:
            sets[split] = (f"{args.tasks} split {split}", suite_split(Path(args.tasks), split, experts))
    if not sets:
        raise TwinError("router eval needs --data FILE or --tasks DIR")
    return sets


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from router.store import load_router
    from router.train import evaluate_router
    from twinrt.artifact import Artifact
    from twinrt.config import check_device

    check_device(args.device)
    art = Artifact.open(args.artifact)
    router = load_router(art, device=args.device)
    sets = eval_sets(args, router.experts)
    console.print(f"{router.kind} router of {args.artifact} (calibration temperature {router.temperature:.3g})")
    evals = {}
    for name, (source, examples) in sets.items():
        evals[name] = evaluate_router(router, examples, source)
        print_evaluation(evals[name], router.experts, name)
    if len(evals) > 1:
        console.print(side_by_side(evals, router.experts))
    if args.json:
        report = {"router": router.kind, "temperature": router.temperature, "experts": router.experts,
                  "sets": {k: ev.summary() | {"per_expert": dict(zip(router.experts, ev.per_expert))}
                           for k, ev in evals.items()}}
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


def _add_common(p: argparse.ArgumentParser, data_required: bool = True) -> None:
    p.add_argument("artifact", help="twin artifact directory")
    if data_required:
        p.add_argument("--data", required=True, help='JSONL: {"text"|"messages": ..., "expert": ...} per line')
    else:
        p.add_argument("--data", action="append", help='JSONL: {"text"|"messages": ..., "expert": ...} per line '
                       "(repeatable: the data sets are reported side by side)")
    p.add_argument("--label-key", default="expert",
                   help='field holding the expert name (e.g. "task" for an eval task suite)')
    p.add_argument("--device", default="cpu", help="device of the encoder (cpu, cuda, ...)")


def register(subparsers) -> argparse.ArgumentParser:
    """Add `router train` and `router eval` to twinrt's subparsers; each sets `fn(args) -> exit code`."""
    r = subparsers.add_parser("router", help="train or evaluate the router that picks each input's mix")
    sub = r.add_subparsers(dest="router_command", required=True)

    t = sub.add_parser("train", help="train a router on labelled examples and install it in ARTIFACT/router/")
    _add_common(t)
    t.add_argument("--kind", choices=["prototype", "trained", "hidden"], default="trained",
                   help="prototype: MiniLM + centroids (no training); trained: MiniLM + trained head; "
                        "hidden: the shared core's mean hidden state + MLP (Twin-Merging)")
    t.add_argument("--holdout", type=float, default=0.2, help="share held out per expert for calibration "
                   "and metrics (0 to 0.5; 0 = none)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--hidden", type=int, default=None, help="MLP width (0 = linear; default 0, hidden: 64)")
    t.add_argument("--epochs", type=int, default=300, help="full-batch training steps")
    t.add_argument("--lr", type=float, default=1e-2)
    t.add_argument("--encoder", default=None, help="sentence-transformers dir (copied into the artifact); "
                   "default all-MiniLM-L6-v2")
    t.add_argument("--max-length", type=int, default=None, help="encoder token limit (longer inputs are truncated)")
    t.add_argument("--temperature", type=float, default=1.0, help="routing temperature (on calibrated logits)")
    t.add_argument("--top-k", type=int, default=None, help="keep the k largest weights")
    t.add_argument("--min-weight", type=float, default=0.0, help="drop weights below this")
    t.add_argument("--fallback-threshold", type=float, default=0.0,
                   help="max probability below this uses the fallback")
    t.add_argument("--fallback", choices=["uniform", "core"], default="uniform",
                   help="uniform: all experts equal; core: the shared core alone")
    t.add_argument("--no-features", action="store_true", help="do not keep the examples' encoded features in "
                   "router/ (then `twinrt add`/`remove` cannot refit a trained or hidden router)")
    t.set_defaults(fn=cmd_train, sigterm_cleanup=True)  # SIGTERM unwinds, so the router's build dir is removed

    e = sub.add_parser("eval", help="accuracy, confusion matrix and ECE of the saved router on data files")
    _add_common(e, data_required=False)
    e.add_argument("--tasks", metavar="DIR", help="a task suite: evaluate on DIR/<expert>/<split>.jsonl")
    e.add_argument("--splits", default="test,test_ood",
                   help="comma-separated splits of --tasks (test: in-distribution, test_ood: out-of-template)")
    e.add_argument("--json", metavar="OUT", help="also write the metrics of every data set as JSON")
    e.set_defaults(fn=cmd_eval)
    _extend_updates(subparsers)
    return r


def _extend_updates(subparsers) -> None:
    """`twinrt add` and `twinrt remove` (twinrt's own commands) refit the artifact's router through this package:
    add takes the new expert's examples (--router-data), remove refits from the stored features alone."""
    from router.refit import cli_refitter

    add, remove = subparsers.choices.get("add"), subparsers.choices.get("remove")
    if add is not None:
        add.add_argument("--router-data", metavar="FILE.jsonl", help="labelled examples of the new expert (and "
                         "optionally others): the router is refitted for the new expert set")
        add.add_argument("--router-label-key", default="expert", help="field of --router-data holding the expert")
        add.set_defaults(router_refit=cli_refitter)
    if remove is not None:
        remove.set_defaults(router_refit=cli_refitter)
