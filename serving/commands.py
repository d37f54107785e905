"""twinrt's subcommands from the router and serving packages, in `twinrt --help` order.

twinrt's own parser (twinrt/cli.py) must not import these packages: it finds this function through the
`twinrt.commands` entry point group (pyproject.toml), and this is the one place that composes them.
"""

from __future__ import annotations

from router.cli import register as register_router
from router.twin_eval import register_eval
from serving.abreport import register as register_ab
from serving.cli import register as register_serve


def register(subparsers) -> None:
    """Add `router train|eval`, `serve`, `ab report` and `eval` to twinrt's subparsers."""
    register_router(subparsers)
    register_serve(subparsers)
    register_ab(subparsers)
    register_eval(subparsers)
