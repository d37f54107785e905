"""`twinrt serve`: the OpenAI-compatible server's command line, registered into twinrt's parser.

    twinrt serve ARTIFACT [--host 127.0.0.1] [--port 8000] [--backend local|vllm] [--api-key-file F] ...

Every flag is a ServeOptions field (serving/options.py), listed by `twinrt serve --help` and docs/SERVING.md.
Also runnable without twinrt's CLI: `python -m serving.cli serve ARTIFACT ...`. User errors raise TwinError
(printed as one line, exit 2).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from serving.options import add_arguments, from_args
from twinrt.errors import TwinError


def banner(server, host: str, port: int, prompt: str = "Hello!") -> str:
    """What the server prints once it listens: the arms and a curl example."""
    import json

    from serving.server import API_KEY_ENV

    auth = f' -H "Authorization: Bearer ${API_KEY_ENV}"' if server.api_key else ""
    models = ", ".join(server.arms.model_ids())
    log = server.log.path if server.log is not None else "off"
    body = json.dumps({"model": "twin", "messages": [{"role": "user", "content": prompt}], "max_tokens": 32,
                       "temperature": 0}).replace("'", "'\\''")
    return (f"twinrt serving {server.name} on http://{host}:{port}  (backend {server.backend.name}, "
            f"router {server.routing.kind}, log {log})\n"
            f"models: {models}\n"
            f"try:\n  curl -s http://{host}:{port}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
            f"    -d '{body}'")


def cmd_serve(args: argparse.Namespace) -> int:
    from serving.server import run

    opts = from_args(args)
    return run(opts, on_ready=lambda server, port: print(banner(server, opts.host, port), flush=True))


def register(subparsers) -> argparse.ArgumentParser:
    """Add `serve` to twinrt's subparsers; it sets `fn(args) -> exit code`."""
    s = subparsers.add_parser("serve", help="serve an artifact over an OpenAI-compatible HTTP API")
    add_arguments(s)
    s.set_defaults(fn=cmd_serve)
    return s


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m serving.cli serve ...` / `python -m serving.cli ab report ...` without twinrt's CLI."""
    import logging

    from serving.abreport import register as register_ab

    p = argparse.ArgumentParser(prog="python -m serving.cli")
    sub = p.add_subparsers(dest="command", required=True)
    register(sub)
    register_ab(sub)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except TwinError as e:
        print(f"twinrt: error: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
