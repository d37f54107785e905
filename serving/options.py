"""`twinrt serve`'s options, each defined once (type, default, checks, help), and its flags derived from them.

    opts = ServeOptions(artifact="ARTIFACT", ab="twin=50,core=50")   # validated once, then immutable
    add_arguments(parser)                                             # `twinrt serve`'s flags, from the fields
    opts = from_args(parser.parse_args(argv))                         # the flags' values -> ServeOptions

A field's flag is `--its-name` (`--no-its-name` for a bool that defaults to True, which the flag turns off),
its help the field's description, its type, default and choices the field's; `option()` adds what a flag
needs beyond that. VLLMOptions holds the options of `--backend vllm` (their own group in `--help`);
ServeOptions has those and every other one.
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import Field, ValidationError, field_validator
from pydantic.fields import FieldInfo

from serving.arms import DEFAULT_AB_NAME
from twinrt.dtypes import DtypeName
from twinrt.errors import TwinError
from twinrt.validation import Frozen, describe

MAX_BODY_BYTES = 1 << 20  # a request body's default limit (also serving.app.Server's)
VLLM_GROUP = ("vllm backend", "passed to vLLM's engine; a mix is served as one adapter of its top-k experts with "
              "weights rounded to --mix-step")


def option(default: Any, help: str, *, flag: str | None = None, metavar: str | None = None,
           choices: Sequence[str] | None = None, zero_is_none: bool = False, **checks: Any) -> Any:
    """A field together with its flag. `help`: the field's description and the flag's help (argparse's
    `%(default)s` may appear in it); `flag`: a name other than the derived one; `choices`: the values a str
    flag takes; `zero_is_none`: the flag's 0 sets the field to None; `checks`: pydantic's (ge=1, gt=0, ...)."""
    cli = {"flag": flag, "metavar": metavar, "choices": list(choices) if choices else None,
           "zero_is_none": zero_is_none or None}
    return Field(default, description=help, json_schema_extra={k: v for k, v in cli.items() if v is not None},
                 **checks)


class VLLMOptions(Frozen):
    """The options of `--backend vllm`, for vLLM's engine and the mix adapters (serving/backends/vllm_backend.py)."""

    tensor_parallel_size: int = option(1, "GPUs to shard the model over", ge=1)
    gpu_memory_utilization: float | None = option(
        None, "fraction of GPU memory for vLLM (on CPU: of RAM; default there: --kv-cache-gib 1)", gt=0, le=1)
    max_loras: int | None = option(None, "different adapters in one batch (default: experts + 1 or --max-batch, "
                                   "whichever is fewer: every row of a top-1 batch gets its expert's own adapter)",
                                   ge=1)
    max_cpu_loras: int | None = option(None, "adapters vLLM keeps loaded (default: --adapter-cache + experts + 1)",
                                       ge=1)
    max_lora_rank: int | None = option(None, "vLLM's max LoRA rank (default: the smallest that holds a top-k mix)")
    max_model_len: int | None = option(None, "context length (default: the model's)", ge=2)
    kv_cache_gib: float | None = option(None, "KV cache size in GiB", gt=0)
    mix_top_k: int = option(2, "experts kept in a served mix (default %(default)s)", ge=1)
    mix_step: float = option(0.05, "weight grid of a served mix (default %(default)s)", gt=0, le=1)
    adapter_cache: int = option(16, "mix adapters kept built (LRU)", ge=1)
    vllm_args: tuple[str, ...] = option(
        (), "any other vLLM engine argument, e.g. --vllm-arg enforce_eager=true (repeatable)", flag="--vllm-arg",
        metavar="KEY=VALUE")


class ServeOptions(VLLMOptions):
    """Every `twinrt serve` option: these, and VLLMOptions' for `--backend vllm`."""

    artifact: Path = option(..., "twin artifact directory")
    host: str = option("127.0.0.1", "address to bind (default %(default)s: this machine only)")
    port: int = option(8000, "port (0 = any free port)", ge=0, le=65535)
    backend: str = option("local", "generation backend: local (twinrt's engine) or vllm (experts and mixes as vLLM "
                          "LoRA adapters)", choices=("local", "vllm"))
    api_key: str | None = option(None, "require 'Authorization: Bearer KEY' on /v1/* (visible in the process list: "
                                 "prefer --api-key-file or $TWINRT_API_KEY; none of the three = open)")
    api_key_file: Path | None = option(None, "read the API key from the first line of this file")
    ab: str | None = option(None, "an A/B alias splitting traffic between arms by weight, e.g. twin=50,core=50 "
                            "(sticky per `user`)", metavar="ARM=W,...")
    ab_name: str = option(DEFAULT_AB_NAME, "the model name of the A/B alias (default: %(default)s)")
    ab_seed: int | None = option(None, "seed of the A/B picks for requests without `user`")
    max_batch: int = option(32, "most rows decoded together", ge=1)
    max_queue: int = option(256, "most requests waiting for a row; more get 429", ge=0)
    dtype: DtypeName = option("float32", "dtype the model is loaded and run in")
    device: str = option("cpu", "cpu, cuda, cuda:1, ...")
    log: Path | None = option(None, "routing log (JSONL); default ARTIFACT/logs/routing.jsonl")
    no_log: bool = option(False, "do not write the routing log (nor take feedback)")
    feedback: Path | None = option(None, "feedback store of POST /v1/feedback (SQLite); default feedback.sqlite beside "
                                   "the routing log")
    router: bool = option(True, "ignore ARTIFACT/router/: `twin` then uses the uniform mix")
    allow_expert_updates: bool = option(False, "take POST /v1/experts, DELETE /v1/experts/NAME and POST "
                                        "/v1/experts/reload (add or remove experts while serving; behind the API key)")
    materialize: bool = option(True, "never build merged weights W' (always the factored path)")
    max_body_bytes: int = option(MAX_BODY_BYTES, "larger request bodies get 413", ge=1024)
    request_timeout: float | None = option(
        600.0, "server-side deadline of a request in seconds, from arrival (0 = none); past it: 504", gt=0,
        zero_is_none=True)
    drain_timeout: float = option(
        30.0, "on SIGTERM: seconds for running and queued requests to finish before they are ended", ge=0)
    max_step_tokens: int | None = option(
        None, "local backend: tokens one engine step may process (long prompts are prefilled in chunks between "
        "decode steps; default: the engine's)", ge=1)
    long_prefill_share: float | None = option(
        None, "local backend: while other requests run, a long prompt's chunks take at most this multiple of the "
        "other work's time (default: the engine's; raise it to favour long prompts)", gt=0)

    @field_validator("api_key")
    @classmethod
    def _key_not_empty(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("an empty API key would serve without authentication; give a key, or leave it out")
        return v


def add_arguments(p: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
    """ServeOptions' flags (all, or those of the fields `names`) on `p`, in field order: the general ones, then
    VLLMOptions' in their own group."""
    fields = {n: f for n, f in ServeOptions.model_fields.items() if names is None or n in names}
    general = [n for n in fields if n not in VLLMOptions.model_fields]
    vllm = [n for n in fields if n in VLLMOptions.model_fields]
    for name in general:
        _add_flag(p, name, fields[name])
    if vllm:
        group = p.add_argument_group(*VLLM_GROUP)
        for name in vllm:
            _add_flag(group, name, fields[name])


def from_args(args: argparse.Namespace) -> ServeOptions:
    """ServeOptions from the parsed flags (of `add_arguments`; fields `args` lacks keep their defaults). A bad
    value is a TwinError naming its flag."""
    values = {}
    for name, value in vars(args).items():
        f = ServeOptions.model_fields.get(name)
        if f is None:
            continue  # the parser's own entries (the subcommand's function, ...)
        values[name] = None if _cli(f).get("zero_is_none") and value == 0 else value
    try:
        return ServeOptions(**values)
    except ValidationError as e:
        raise TwinError(describe(e, flags=True, first=True)) from None


def _cli(f: FieldInfo) -> dict[str, Any]:
    extra = f.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def _kind(annotation: Any) -> Any:
    """What a flag parses: `int | None` -> int, `tuple[str, ...]` -> tuple, a Literal -> Literal."""
    if get_origin(annotation) in (Union, types.UnionType):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    return get_origin(annotation) or annotation


def _add_flag(p: Any, name: str, f: FieldInfo) -> None:
    cli = _cli(f)
    kw: dict[str, Any] = {"help": f.description}
    if "metavar" in cli:
        kw["metavar"] = cli["metavar"]
    if f.is_required():
        p.add_argument(name, **kw)
        return
    kind = _kind(f.annotation)
    if kind is bool:
        kw["action"] = "store_false" if f.default else "store_true"
    elif kind is tuple:
        kw.update(action="append", default=[])
    else:
        kw["default"] = f.default
        if kind in (int, float):
            kw["type"] = kind
        choices = cli.get("choices") or (list(get_args(f.annotation)) if kind is Literal else None)
        if choices:
            kw["choices"] = choices
    flag = cli.get("flag") or "--" + ("no-" if f.default is True else "") + name.replace("_", "-")
    p.add_argument(flag, dest=name, **kw)
