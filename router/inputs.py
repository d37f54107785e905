"""What a router reads from an input: plain text, or the USER turns of a chat.

    routing_text("what is 2+2")                                   == "what is 2+2"
    routing_text([{"role": "system", "content": "be terse"},
                  {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "hello"},
                  {"role": "user", "content": "add 2 and 2"}])    == "hi\nadd 2 and 2"

System and assistant turns are ignored: the router judges what the user asks, not how the deployment
prompts the model. A content given as OpenAI content parts ([{"type": "text", "text": ...}, ...]) reads as
its text parts joined by newlines. An input whose routing text is empty or whitespace is "without evidence":
routers do not encode it and give it the fallback row (see `router.options`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

from twinrt.errors import TwinError

Message = Mapping[str, Any]
RouterInput = Union[str, Sequence[Message]]


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, Mapping) and p.get("type") == "text"]
        if all(isinstance(t, str) for t in parts):
            return "\n".join(parts)
    raise TwinError(f"{where}: a message's content must be a string or a list of text parts")


def routing_text(x: RouterInput, where: str = "input") -> str:
    """The text a router encodes: `x` itself, or its user turns joined by newlines."""
    if isinstance(x, str):
        return x
    if not isinstance(x, Sequence) or isinstance(x, (bytes, bytearray)):
        raise TwinError(f"{where}: expected a string or a list of chat messages, got {type(x).__name__}")
    users = []
    for j, m in enumerate(x):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or "content" not in m:
            raise TwinError(f"{where}: message {j} must be an object with a string 'role' and a 'content'")
        if m["role"] == "user":
            users.append(_content_text(m["content"], f"{where}, message {j}"))
    return "\n".join(users)


def routing_texts(batch: Sequence[RouterInput]) -> list[str]:
    """routing_text of every input of a batch (a bare string is one input, not a batch of characters)."""
    if isinstance(batch, str):
        raise TwinError("route() takes a batch: wrap a single input in a list")
    return [routing_text(x, f"input {i}") for i, x in enumerate(batch)]
