"""A training-free router from the experts' own factors, in the spirit of PEFT's Arrow routing.

For every factored linear layer l and expert n, ΔW = B_n A_n ([d_out, r] @ [r, d_in]); its top right singular
vector v_n^l ([d_in], sign-free) is the input direction the expert's update responds to most. An input routes
by how strongly the core's inputs to those layers point along each expert's directions:

    x_t^l = input of layer l at token t of the core's forward pass (no expert mix)      # [T, d_in]
    a[l, t, n] = |<x_t^l / ‖x_t^l‖, v_n^l>|                                            # [L, T, N]
    p[l, t]    = softmax(a[l, t] / ARROW_TEMPERATURE)                                   # per token and layer
    logits     = log(mean over l, t of p[l, t])                                         # [N]

No routing data is needed: only the artifact's factors and its core. Arrow itself routes every token of
every layer; this reduces that to one mix per request, as the twin's routers do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

ARROW_TEMPERATURE = 0.05


def top_right_singular(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The unit top right singular vector of B @ A without forming it. b: [d_out, r], a: [r, d_in] -> [d_in]."""
    _, r_b = torch.linalg.qr(b.double())                   # B = Q R, so B A and R A share right singular vectors
    _, _, vh = torch.linalg.svd(r_b @ a.double(), full_matrices=False)
    return vh[0].float()


def prototypes(factors: Mapping[str, Sequence[Mapping[str, tuple[torch.Tensor, torch.Tensor]]]] | Sequence,
               ) -> dict[str, torch.Tensor]:
    """{layer: [N, d_in]} from per-expert {layer: (B, A)} dicts, given as a sequence in mix order."""
    experts = list(factors.values()) if isinstance(factors, Mapping) else list(factors)
    layers = sorted(set.intersection(*(set(f) for f in experts)))
    return {lay: torch.stack([top_right_singular(*f[lay]) for f in experts]) for lay in layers}


def arrow_scores(protos: Mapping[str, torch.Tensor], inputs: Mapping[str, torch.Tensor],
                 mask: torch.Tensor | None = None, temperature: float = ARROW_TEMPERATURE) -> torch.Tensor:
    """Logits [B, N] of the module docstring. inputs: {layer: [B, T, d_in]}; mask: [B, T] (1 = a real token)."""
    probs, weight = None, None
    for lay, v in protos.items():                          # v: [N, d_in]
        x = torch.nn.functional.normalize(inputs[lay].float(), dim=-1)          # [B, T, d_in]
        p = torch.softmax((x @ v.T).abs() / temperature, dim=-1)                 # [B, T, N]
        m = torch.ones(p.shape[:2]) if mask is None else mask.float()           # [B, T]
        s = (p * m[..., None]).sum(dim=1)                                       # [B, N]
        probs = s if probs is None else probs + s
        weight = m.sum(dim=1) if weight is None else weight + m.sum(dim=1)
    if probs is None:
        raise ValueError("no layer is factored by every expert")
    return torch.log(probs / weight.clamp(min=1)[:, None])


PEFT_PREFIX = "base_model.model."


def read_factors(adapter_file: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name in the core: (B [d_out, r], A [r, d_in])} of a PEFT adapter_model.safetensors."""
    from safetensors.torch import load_file

    state = load_file(adapter_file)
    out = {}
    for key, a in state.items():
        if key.endswith(".lora_A.weight"):
            name = key[: -len(".lora_A.weight")]
            out[name.removeprefix(PEFT_PREFIX)] = (state[name + ".lora_B.weight"], a)
    return out


def _recorder(seen: dict[str, torch.Tensor], name: str):
    def hook(_module, args) -> None:
        seen[name] = args[0].float().cpu()                  # [b, T, d_in]

    return hook


class ArrowEncoder:
    """texts -> Arrow logits [B, N] (the module docstring) over an already-loaded core; `dim` = N.

    Hooks record the inputs of the factored layers during one forward pass of the core per batch.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, protos: Mapping[str, torch.Tensor],
                 max_length: int = 512, batch_size: int = 16, temperature: float = ARROW_TEMPERATURE) -> None:
        self.model, self.tokenizer, self.protos = model, tokenizer, dict(protos)
        self.dim = next(iter(self.protos.values())).shape[0]
        self.max_length, self.batch_size, self.temperature = max_length, batch_size, temperature
        modules = dict(model.named_modules())
        missing = [n for n in self.protos if n not in modules]
        if missing:
            raise ValueError(f"the core has no module {missing[0]!r} that the experts factor")
        self.modules = {n: modules[n] for n in self.protos}

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        from router.encoders import pad_right

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        out = torch.empty(len(ids), self.dim)
        device = next(self.model.parameters()).device
        for s in range(0, len(ids), self.batch_size):
            input_ids, mask = pad_right([x or [pad] for x in ids[s : s + self.batch_size]], pad)
            seen: dict[str, torch.Tensor] = {}
            hooks = [m.register_forward_pre_hook(_recorder(seen, n)) for n, m in self.modules.items()]
            try:
                self.model.base_model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
            finally:
                for h in hooks:
                    h.remove()
            out[s : s + len(input_ids)] = arrow_scores(self.protos, seen, mask, self.temperature)
        return out
