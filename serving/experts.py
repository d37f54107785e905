"""Expert updates on a running server: off unless `twinrt serve --allow-expert-updates`, behind the API key.

    GET    /v1/experts                the experts served (mix order), the static merges, the artifact's history
    POST   /v1/experts                {"name", "path", "base"?, "router_data"?, "router_label_key"?, "drop_router"?}
                                      what `twinrt add ARTIFACT NAME=PATH` does, then serves the new set
    DELETE /v1/experts/{name}         (?drop_router=true) what `twinrt remove ARTIFACT NAME` does, then serves the rest
    POST   /v1/experts/reload         serves the artifact as it is now on disk (after `twinrt add` from a shell)

Each answers 200 with the experts now served once new requests run on them. The artifact changes atomically
as the commands change it (docs/LIVING.md); then the backend loads the new expert set beside the running one
(the local backend on the same core, sharing its weights; see serving.backends.local), the router is loaded
again (refitted by the update: `router_data` are the new expert's examples, a JSONL file on the server, as
`twinrt router train --data` takes), and `/v1/models`, the arms and the routing extension switch to the new
set in one step. Requests already running finish on the experts they started with; a request that names a
removed expert (`expert:<name>`, a routing override) gets 404 model_not_found (400 for an override), as an
unknown one does; a `twin` request routed over the old set and admitted after the removal is routed again.

Refused, with the artifact and the served set unchanged: updates when the server was started without the flag
(403), a second update while one runs (409), a change an A/B alias of `--ab` depends on (409: removing an
arm's expert), and whatever `twinrt add`/`remove` refuse (400: a taken or invalid name, a path that is not
an expert of the artifact's base, an artifact with a router and neither `router_data` nor `drop_router`, the
last expert; 404: an unknown expert).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from serving.arms import ArmTable
from serving.errors import APIError
from serving.routing import RoutingService
from twinrt.errors import TwinError

log = logging.getLogger(__name__)


class AddExpertBody(BaseModel):
    """POST /v1/experts: what `twinrt add ARTIFACT NAME=PATH` takes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=128)
    path: str = Field(min_length=1, description="a full fine-tuned HF dir or a PEFT LoRA adapter, on the server")
    base: str | None = Field(None, description="another copy of the artifact's base (default: the one it records)")
    router_data: str | None = Field(None, description="JSONL of the new expert's examples, to refit the router")
    router_label_key: str = "expert"
    drop_router: bool = False


class ExpertUpdates:
    """Applies expert changes to one server's artifact and swaps the served set (see the module docstring)."""

    def __init__(self, artifact: Path, *, enabled: bool, router: bool, device: str) -> None:
        self.artifact = Path(artifact)
        self.enabled = enabled
        self.router = router  # load the artifact's router (False: `--no-router`)
        self.device = device
        self._lock = asyncio.Lock()
        self.updates = 0

    # ---- the endpoints ---------------------------------------------------------------------------------------

    def listing(self, server: Any) -> dict[str, Any]:
        from twinrt.artifact import Artifact

        art = Artifact.open(self.artifact, verify=False)
        return {"object": "list", "experts": list(server.routing.experts), "statics": list(server.arms.statics),
                "artifact_experts": list(art.experts), "router": server.routing.kind, "updates": self.updates,
                "allowed": self.enabled, "history": [h.model_dump() for h in art.manifest.history]}

    async def add(self, server: Any, body: AddExpertBody) -> dict[str, Any]:
        from router.refit import refitter
        from twinrt.split.add import add_expert

        async with self._exclusive():
            if body.router_data is None and "router_label_key" in body.model_fields_set:
                raise APIError(400, "router_label_key names the label field of router_data; give router_data too",
                               param="router_label_key")
            refit = _user_error(lambda: refitter(self.artifact, adding=True, data_file=body.router_data,
                                                 label_key=body.router_label_key, drop_router=body.drop_router,
                                                 flags=("router_data", "drop_router")))
            if refit is None and not body.drop_router and (self.artifact / "router").is_dir():
                raise APIError(400, "the artifact has a router: give router_data (a JSONL file of the new expert's "
                               "examples, as `twinrt router train --data` takes) to refit it, or drop_router: true",
                               param="router_data", code="router_needs_data")
            await _run(add_expert, self.artifact, body.name, Path(body.path),
                       base=None if body.base is None else Path(body.base), device=self.device,
                       drop_router=body.drop_router, router=refit)
            return await self._serve(server, f"added {body.name!r}")

    async def remove(self, server: Any, name: str, drop_router: bool = False) -> dict[str, Any]:
        from router.refit import refitter
        from twinrt.artifact import Artifact
        from twinrt.artifact.update import remove_expert

        async with self._exclusive():
            if name not in server.routing.experts:
                raise APIError(404, f"no expert {name!r}; experts are {', '.join(server.routing.experts)}",
                               param="name", code="expert_not_found")
            for split in server.arms.splits.values():
                if any(a.expert == name for a in split.arms):
                    raise APIError(409, f"the A/B alias {split.name!r} serves expert:{name}; restart the server with "
                                   "another --ab to remove it", code="expert_in_ab_split")
            refit = _user_error(lambda: refitter(self.artifact, adding=False, drop_router=drop_router,
                                                 flags=("router_data", "drop_router")))
            art = await _run(Artifact.open, self.artifact)
            _, notes = await _run(remove_expert, art, name, drop_router=drop_router, router=refit)
            return await self._serve(server, f"removed {name!r}", notes)

    async def reload(self, server: Any) -> dict[str, Any]:
        async with self._exclusive():
            return await self._serve(server, "reloaded")

    # ---- the swap --------------------------------------------------------------------------------------------

    def _exclusive(self):
        if not self.enabled:
            raise APIError(403, "expert updates are off: start the server with --allow-expert-updates",
                           code="expert_updates_off")
        if self._lock.locked():
            raise APIError(409, "another expert update is running; retry when it is done", code="update_in_progress")
        return self._lock

    @staticmethod
    def _not_served(server: Any, art: Any, what: str, why: str) -> APIError:
        """The artifact changed (`what`) but the server could not switch to it: a 500 that names both sets."""
        msg = (f"{what} in the artifact, but this server cannot serve its new expert set ({why}): it still serves "
               f"{', '.join(server.routing.experts)}; the artifact has {', '.join(art.experts)}. Restart the server "
               "to serve the artifact, or undo the change and POST /v1/experts/reload")
        return APIError(500, msg, code="update_not_served")

    async def _serve(self, server: Any, what: str, notes: list[str] | None = None) -> dict[str, Any]:
        """Serve the artifact as it is on disk now: backend, router, arms, in that order (see the module docstring)."""
        from router import load_router
        from twinrt.artifact import Artifact

        art = await _run(Artifact.open, self.artifact)
        for split in server.arms.splits.values():
            for arm in split.arms:
                if (arm.kind == "expert" and arm.expert not in art.experts) or \
                        (arm.kind == "static" and arm.name not in art.statics):
                    raise APIError(409, f"the artifact no longer has {arm.name}, which the A/B alias {split.name!r} "
                                   "serves: restart the server with another --ab", code="expert_in_ab_split")
        router = None
        if self.router and (art.router_dir / "router.json").is_file():
            router = await _run(load_router, art, device=self.device)
        routing = _user_error(lambda: RoutingService(art.experts, router))
        reload = getattr(server.backend, "reload", None)
        if reload is None:
            routing.close()
            raise self._not_served(server, art, what, f"the {server.backend.name} backend cannot take expert updates")
        try:
            await reload(art.path)
        except Exception as e:  # noqa: BLE001 - the artifact has changed; say so, and that the old set is served
            routing.close()
            log.error("expert update (%s) written to %s but not served", what, self.artifact, exc_info=True)
            raise self._not_served(server, art, what, str(e) if isinstance(e, TwinError) else type(e).__name__) \
                from None
        arms = ArmTable(art.experts, list(server.arms.splits.values()), statics=art.statics)
        arms.adopt_rng(server.arms)
        server.arms, server.routing = arms, routing  # one step of the loop: a request sees the old set or the new
        server.static_info = {f"static:{st.label}": {"method": st.method, "params": st.params}
                              for st in art.manifest.statics}
        self.updates += 1  # the old routing service is let go: decisions under way hold it until they are made
        log.warning("expert update (%s): serving %s", what, ", ".join(art.experts))
        out: dict[str, Any] = {"object": "list", "experts": list(art.experts), "statics": list(art.statics),
                               "router": routing.kind, "updates": self.updates}
        if notes:
            out["notes"] = list(notes)
        return out


def _user_error(fn):
    try:
        return fn()
    except (TwinError, ValueError) as e:
        raise APIError(400, str(e), code="invalid_update") from None


async def _run(fn, *args, **kwargs):
    """fn in a thread; what the commands refuse (TwinError: one line) is the request's 400."""
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except TwinError as e:
        raise APIError(400, str(e), code="invalid_update") from None
