"""One model's weights in a torch module: the base's architecture loaded once, any expert's weights copied in.

    model = load_model(base, hf_config, device)       # float32, eval mode, the base's weights
    assign_weights(model, expert_tensors(base, e))     # now it computes expert e, exactly

so a pass over N experts holds one model, whatever N is.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from twinrt.errors import TwinError
from twinrt.sources.checkpoint import GGUFFile, SafetensorsDir
from twinrt.sources.experts import FullExpert, LoraExpert


def load_model(base: SafetensorsDir | GGUFFile, config: Any, device: str | torch.device = "cpu") -> nn.Module:
    """The base as a transformers causal LM in float32 on `device`, in eval mode.

    An HF dir is loaded as is; a GGUF base is built from its config and given the dequantized tensors."""
    from transformers import AutoModelForCausalLM

    try:
        if isinstance(base, SafetensorsDir):
            model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            assign_weights(model, ((n, base.get(n)) for n in base.names()))
    except TwinError:
        raise
    except Exception as e:  # transformers raises many types for a model it cannot build
        raise TwinError(f"base {base.label} cannot be loaded as a transformers model: {e}".splitlines()[0]) from None
    return model.to(device).eval()


Weights = Iterator[tuple[str, torch.Tensor]]


def expert_tensors(base: SafetensorsDir | GGUFFile, expert: LoraExpert | FullExpert) -> Weights:
    """(name, θ_expert) for every tensor of the base: a LoRA expert's base + B A, a full expert's own."""
    for name in base.names():
        yield name, expert.get(name, base.get(name))


def assign_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy every (name, tensor) into the model's weight of that name (cast to its dtype and device).

    The names must cover every weight of the model (a tied weight counts as covered by its twin) and name no
    weight it lacks: a partial assignment would leave earlier weights behind.
    """
    state = model.state_dict()
    covered: set[int] = set()
    with torch.no_grad():
        for name, t in weights:
            target = state.get(name)
            if target is None:
                raise TwinError(f"weight {name} is not a weight of the {type(model).__name__} built from the config")
            if tuple(target.shape) != tuple(t.shape):
                raise TwinError(f"weight {name} has shape {list(t.shape)}, the model's is {list(target.shape)}")
            target.copy_(t)
            covered.add(target.data_ptr())
    missing = sorted(n for n, t in state.items() if t.data_ptr() not in covered)
    if missing:
        raise TwinError(f"the weights left {len(missing)} model tensor(s) unset, e.g. {missing[0]}")
