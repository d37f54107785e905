"""The base of every validated value (frozen, unknown keys refused) and the one way a validation error
becomes a one-line message."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError


class Frozen(BaseModel):
    """An immutable validated value; a key it does not declare is an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")


def describe(err: ValidationError, *, flags: bool = False, first: bool = False) -> str:
    """One line for a pydantic error: `loc: message` per error, joined by "; ".

    flags: a location is a command-line option (`--max-batch: ...`, the last part of the location);
    first: only the first error (what a CLI reports before it exits)."""
    parts = []
    for e in err.errors()[:1] if first else err.errors():
        loc = [str(x) for x in e["loc"]]
        where = f"--{loc[-1].replace('_', '-')}" if flags and loc else ".".join(loc) or "value"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)
