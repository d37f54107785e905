"""`twinrt serve`: the OpenAI-compatible server's command line, registered into twinrt's parser.

    twinrt serve ARTIFACT [--host 127.0.0.1] [--port 8000] [--backend local|vllm] [--api-key-file F | --api-key KEY]
                 [--request-timeout 600] [--drain-timeout 30] [--max-step-tokens N] [--long-prefill-share F]
                 [--ab twin=50,core=50] [--ab-name ab] [--max-batch 32] [--max-queue 256]
                 [--dtype float32] [--device cpu] [--log PATH | --no-log] [--no-router] [--no-materialize]
                 [--tensor-parallel-size N] [--max-loras N] [--max-lora-rank R] [--gpu-memory-utilization F]
                 [--mix-top-k K] [--mix-step S] [--adapter-cache N] [--vllm-arg KEY=VALUE ...]   (vllm backend)

Also runnable without twinrt's CLI: `python -m serving.cli serve ARTIFACT ...`. User errors raise TwinError
(printed as one line, exit 2).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pydantic import ValidationError

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


def options_from_args(args: argparse.Namespace):
    from serving.server import ServeOptions

    try:
        return ServeOptions(artifact=args.artifact, host=args.host, port=args.port, backend=args.backend,
                            api_key=args.api_key, api_key_file=args.api_key_file, ab=args.ab, ab_name=args.ab_name,
                            ab_seed=args.ab_seed,
                            max_batch=args.max_batch, max_queue=args.max_queue, dtype=args.dtype, device=args.device,
                            log=args.log, no_log=args.no_log, router=args.router, materialize=args.materialize,
                            max_body_bytes=args.max_body_bytes,
                            request_timeout=args.request_timeout or None, drain_timeout=args.drain_timeout,
                            max_step_tokens=args.max_step_tokens, long_prefill_share=args.long_prefill_share,
                            tensor_parallel_size=args.tensor_parallel_size,
                            gpu_memory_utilization=args.gpu_memory_utilization, max_loras=args.max_loras,
                            max_cpu_loras=args.max_cpu_loras, max_lora_rank=args.max_lora_rank,
                            max_model_len=args.max_model_len, kv_cache_gib=args.kv_cache_gib,
                            mix_top_k=args.mix_top_k, mix_step=args.mix_step, adapter_cache=args.adapter_cache,
                            vllm_args=tuple(args.vllm_arg))
    except ValidationError as e:
        first = e.errors()[0]
        raise TwinError(f"--{str(first['loc'][-1]).replace('_', '-')}: {first['msg']}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    from serving.server import run

    opts = options_from_args(args)
    return run(opts, on_ready=lambda server, port: print(banner(server, opts.host, port), flush=True))


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact", help="twin artifact directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0 = any free port)")
    p.add_argument("--backend", choices=["local", "vllm"], default="local",
                   help="generation backend: local (twinrt's engine) or vllm (experts and mixes as vLLM LoRA adapters)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* (visible in the "
                   "process list: prefer --api-key-file or $TWINRT_API_KEY; none of the three = open)")
    p.add_argument("--api-key-file", default=None, help="read the API key from the first line of this file")
    p.add_argument("--ab", default=None, metavar="ARM=W,...", help="an A/B alias splitting traffic between arms "
                   "by weight, e.g. twin=50,core=50 (sticky per `user`)")
    p.add_argument("--ab-name", default="ab", help="the model name of the A/B alias (default: ab)")
    p.add_argument("--ab-seed", type=int, default=None, help="seed of the A/B picks for requests without `user`")
    p.add_argument("--max-batch", type=int, default=32, help="most rows decoded together")
    p.add_argument("--max-queue", type=int, default=256, help="most requests waiting for a row; more get 429")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--log", default=None, help="routing log (JSONL); default ARTIFACT/logs/routing.jsonl")
    p.add_argument("--no-log", action="store_true", help="do not write the routing log")
    p.add_argument("--no-router", dest="router", action="store_false",
                   help="ignore ARTIFACT/router/: `twin` then uses the uniform mix")
    p.add_argument("--no-materialize", dest="materialize", action="store_false",
                   help="never build merged weights W' (always the factored path)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="server-side deadline of a request in seconds, from arrival (0 = none); past it: 504")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM: seconds for running and queued requests to finish before they are ended")
    p.add_argument("--max-step-tokens", type=int, default=None,
                   help="local backend: tokens one engine step may process (long prompts are prefilled in chunks "
                        "between decode steps; default: the engine's)")
    p.add_argument("--long-prefill-share", type=float, default=None,
                   help="local backend: while other requests run, a long prompt's chunks take at most this multiple "
                        "of the other work's time (default: the engine's; raise it to favour long prompts)")
    v = p.add_argument_group("vllm backend", "passed to vLLM's engine; a mix is served as one adapter of its top-k "
                             "experts with weights rounded to --mix-step")
    v.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs to shard the model over")
    v.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="fraction of GPU memory for vLLM (on CPU: of RAM; default there: --kv-cache-gib 1)")
    v.add_argument("--max-loras", type=int, default=4, help="different adapters in one batch")
    v.add_argument("--max-cpu-loras", type=int, default=None, help="adapters vLLM keeps loaded "
                   "(default: --adapter-cache + experts + 1)")
    v.add_argument("--max-lora-rank", type=int, default=None,
                   help="vLLM's max LoRA rank (default: the smallest that holds a top-k mix)")
    v.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    v.add_argument("--kv-cache-gib", type=float, default=None, help="KV cache size in GiB")
    v.add_argument("--mix-top-k", type=int, default=2, help="experts kept in a served mix (default 2)")
    v.add_argument("--mix-step", type=float, default=0.05, help="weight grid of a served mix (default 0.05)")
    v.add_argument("--adapter-cache", type=int, default=16, help="mix adapters kept built (LRU)")
    v.add_argument("--vllm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other vLLM engine argument, e.g. --vllm-arg enforce_eager=true (repeatable)")


def register(subparsers) -> argparse.ArgumentParser:
    """Add `serve` to twinrt's subparsers; it sets `fn(args) -> exit code`."""
    s = subparsers.add_parser("serve", help="serve an artifact over an OpenAI-compatible HTTP API")
    add_serve_arguments(s)
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
