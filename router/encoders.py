"""Feature extractors of routers: a sentence-transformers encoder, or the twin's shared core.

Both map a list of non-empty texts to a float32 tensor [B, D] and truncate inputs longer than their
`max_length` tokens (keeping the start), so long inputs never fail. Neither touches the network.

`CoreEncoder` is the Twin-Merging paper's router feature: the attention-mask-aware mean over tokens of the
last hidden state of the shared core (after its final norm, i.e. `hidden_states[-1]` of the CausalLM):

    h = core.base_model(input_ids, attention_mask).last_hidden_state     # [B, T, D]
    f = Σ_t mask[b, t] · h[b, t] / Σ_t mask[b, t]                         # [B, D]

It reads the routing text as plain text (no chat template), so a prompt routes the same whether it came as
a completion or as a chat's user turns. It accepts an already-loaded model and tokenizer (the serving layer
reuses the runtime's core); that model must compute the shared core alone (no expert mix).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from twinrt.errors import TwinError
from twinrt.sources.checkpoint import refuse_pickles

DEFAULT_CORE_MAX_LENGTH = 512
BATCH = 32


def module_dirs(path: Path) -> list[Path]:
    """The directories of a sentence-transformers model that may hold weights: its root and every module's."""
    dirs = [path]
    modules = path / "modules.json"
    if modules.is_file():
        try:
            entries = json.loads(modules.read_text())
        except (OSError, ValueError) as e:
            raise TwinError(f"{modules} is not valid JSON: {e}") from None
        for m in entries if isinstance(entries, list) else []:
            rel = m.get("path") if isinstance(m, dict) else None
            if isinstance(rel, str) and rel and (path / rel).is_dir():
                dirs.append(path / rel)
    return dirs


def require_safetensors(path: Path) -> None:
    """Refuse an encoder directory whose weights are not safetensors: no *.safetensors at all, or a module
    directory with only pickle-based weights (pytorch_model.bin, ...). Unpickling runs arbitrary code."""
    for d in module_dirs(path):
        if not any(d.glob("*.safetensors")):
            refuse_pickles(d, "router encoder")
    if not any(path.rglob("*.safetensors")):
        raise TwinError(f"router encoder {path} has no *.safetensors weights (twinrt loads safetensors only)")


class SentenceEncoder:
    """A sentence-transformers model, embeddings L2-normalised. Default: all-MiniLM-L6-v2 (D = 384).

    Its weights are read from safetensors only (see `require_safetensors`).
    """

    def __init__(self, path: str | Path, device: str = "cpu", batch_size: int = BATCH,
                 max_length: int | None = None) -> None:
        from sentence_transformers import SentenceTransformer

        path = Path(path)
        if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            raise TwinError(f"{path} is not a sentence-transformers model directory")
        require_safetensors(path)
        self.path = path
        self.model = SentenceTransformer(str(path), device=device, local_files_only=True,
                                         model_kwargs={"use_safetensors": True})
        self.model.eval()
        self.batch_size = batch_size
        self.dim = int(self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension")
                       else self.model.get_sentence_embedding_dimension())
        if max_length is not None:
            self.model.max_seq_length = max_length
        self.max_length = int(self.model.max_seq_length)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """texts: B strings -> [B, D] unit vectors (inputs over `max_length` tokens are truncated)."""
        if not texts:
            return torch.zeros(0, self.dim)
        emb = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return emb.float().cpu()


def mean_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of h over the positions where mask is 1. h: [B, T, D], mask: [B, T] -> [B, D]."""
    m = mask.to(h.dtype).unsqueeze(-1)                          # [B, T, 1]
    return (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def pad_right(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into (input_ids [B, T], attention_mask [B, T])."""
    t = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), t), dtype=torch.long)
    for b, x in enumerate(ids):
        input_ids[b, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[b, : len(x)] = 1
    return input_ids, mask


class CoreEncoder:
    """Mean-pooled last hidden state of the shared core (see the module docstring). D = hidden_size."""

    def __init__(self, model: torch.nn.Module, tokenizer, max_length: int = DEFAULT_CORE_MAX_LENGTH,
                 batch_size: int = BATCH) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.dim = int(model.config.hidden_size)
        limit = getattr(model.config, "max_position_embeddings", None) or max_length
        self.max_length = int(min(max_length, limit))
        self.batch_size = batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @classmethod
    def from_dir(cls, core_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 max_length: int = DEFAULT_CORE_MAX_LENGTH) -> CoreEncoder:
        """Load a plain HF checkpoint (the artifact's core/) with AutoModelForCausalLM, offline."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        core_dir = Path(core_dir)
        if not (core_dir / "config.json").is_file():
            raise TwinError(f"{core_dir} is not a Hugging Face model directory (config.json is missing)")
        tok = AutoTokenizer.from_pretrained(core_dir, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(core_dir, dtype=dtype, local_files_only=True)
        return cls(model.to(device).eval(), tok, max_length=max_length)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """texts: B strings -> [B, D] float32 (inputs over `max_length` tokens keep their first tokens)."""
        if not texts:
            return torch.zeros(0, self.dim)
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))   # similar lengths share a batch
        device = next(self.model.parameters()).device
        body = self.model.base_model
        out = torch.empty(len(ids), self.dim)
        for s in range(0, len(order), self.batch_size):
            chunk = order[s : s + self.batch_size]
            input_ids, mask = pad_right([ids[i] or [self.pad_id] for i in chunk], self.pad_id)
            h = body(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                     use_cache=False).last_hidden_state               # [b, T, D]
            out[chunk] = mean_pool(h.float(), mask.to(device)).cpu()
        return out
