"""Models served by other boxes: `[models.NAME]` with `url`, and the models `[upstreams.NAME]` lists.

The proxy relays to them and watches them (the poller reads each one's /health, or an upstream's /v1/models and
/running); it never starts, stops, evicts or plans them, and they count against no seat or memory here. This
module is the state and the choices, without I/O: the poller feeds it readings (`record`), the model route asks
it for a box (`acquire`) and says when one failed (`failed`). A model on several upstreams goes to the first
whose /running showed a free slot, else the first reachable one. Keys are sent to their box and shown nowhere.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from llamactl.config import Config, Remote
from llamactl.errors import ModelUnavailableError
from llamactl.servers.names import valid_name

log = logging.getLogger("llamactl.proxy")

MAX_IMPORTED = 256  # models taken from one upstream's /v1/models, in its order; the rest are left out


@dataclass(frozen=True)
class Reading:
    """One poll of a box: reachable or not, how long its answer took, and for an upstream what it serves and
    its models' slots as its /running showed them."""

    reachable: bool
    latency_ms: float | None = None
    models: tuple[str, ...] | None = None  # None: not an upstream, or its list was unreadable
    slots: dict[str, tuple[int, int]] = field(default_factory=dict)  # model → (busy, total) from /running


@dataclass
class Box:
    """A remote model's box (`imports` False: it serves the one model named like it) or an upstream's."""

    remote: Remote
    imports: bool
    reachable: bool | None = None  # None: not polled yet (a request tries it)
    latency_ms: float | None = None
    models: tuple[str, ...] = ()  # what it serves: its model, or what its /v1/models listed at the last poll
    slots: dict[str, tuple[int, int]] = field(default_factory=dict)  # model → (busy, total) at the last poll
    in_flight: dict[str, int] = field(default_factory=dict)  # requests relayed to it now, per model

    @property
    def name(self) -> str:
        return self.remote.name

    @property
    def base_url(self) -> str:
        return self.remote.url

    @property
    def api_key(self) -> str | None:
        return self.remote.api_key

    @property
    def state(self) -> str:
        """`ready`, `unreachable`, or `unknown` before its first poll."""
        return {True: "ready", False: "unreachable", None: "unknown"}[self.reachable]

    def describe(self) -> str:
        return f"{self.name} ({self.base_url})"


def models_of(body: bytes, limit: int = MAX_IMPORTED) -> tuple[str, ...] | None:
    """The model ids an OpenAI `/v1/models` answer lists that are valid instance names, in its order, at most
    `limit`; None when it is not such an answer."""
    try:
        data = json.loads(body).get("data")
    except (ValueError, RecursionError, AttributeError):
        return None
    if not isinstance(data, list):
        return None
    ids = [m.get("id") for m in data if isinstance(m, dict)]
    return tuple(dict.fromkeys(i for i in ids if valid_name(i)))[:limit]


def running_slots(body: bytes) -> dict[str, tuple[int, int]]:
    """(requests in flight, slots) per ready model from a llamactl proxy's `/running` (slots 1 when unknown; of
    two rows for a model, the freer); what cannot be read counts as no slot."""
    try:
        running = json.loads(body).get("running")
    except (ValueError, RecursionError, AttributeError):
        return {}
    out: dict[str, tuple[int, int]] = {}
    for entry in running if isinstance(running, list) else ():
        if not isinstance(entry, dict) or entry.get("state") != "ready" or not valid_name(entry.get("model")):
            continue
        slots, busy = entry.get("slots_total"), entry.get("in_flight")
        slots = slots if isinstance(slots, int) and not isinstance(slots, bool) and slots > 0 else 1
        busy = busy if isinstance(busy, int) and not isinstance(busy, bool) and busy >= 0 else 0
        held = out.get(entry["model"])
        if held is None or slots - busy > held[1] - held[0]:
            out[entry["model"]] = (busy, slots)
    return out


def pick(boxes: Sequence[Box], model: str, tried: Iterable[Box] = ()) -> Box | None:
    """The box for a request: of those not known unreachable (and not tried already), the first with a free
    slot for it beyond what this proxy sends it now, else the first; None when none is left."""
    left = [b for b in boxes if b.reachable is not False and all(b is not t for t in tried)]
    for box in left:
        busy, total = box.slots.get(model, (0, 0))
        if total - busy > box.in_flight.get(model, 0):
            return box
    return left[0] if left else None


class Remotes:
    """Every remote box of the config, and which models each serves."""

    def __init__(self, config: Config) -> None:
        self.boxes: list[Box] = []
        self._said: set[tuple[str, str]] = set()  # (upstream, model) name clashes already logged
        self.reload(config)

    def reload(self, config: Config) -> None:
        """The boxes of a new config; one whose name, url and key did not change keeps what its polls learned."""
        old = {(b.imports, b.remote): b for b in self.boxes}
        self.local = frozenset(config.models) | frozenset(config.variants) | frozenset(
            a for m in config.models.values() for a in m.aliases)
        wanted = [(False, r) for r in config.remotes.values()] + [(True, r) for r in config.upstreams]
        self.boxes = [old.get((imports, r)) or Box(r, imports, models=() if imports else (r.name,))
                      for imports, r in wanted]
        self.configured = frozenset(config.remotes)

    def serving(self, model: str) -> list[Box]:
        """The boxes a request for `model` may go to: its url, or the upstreams that list it (in the config's
        order); none for a name this proxy runs itself."""
        if model in self.local:
            return []
        if model in self.configured:
            return [b for b in self.boxes if not b.imports and b.name == model]
        return [b for b in self.boxes if b.imports and model in b.models]

    def served(self) -> list[tuple[str, Box]]:
        """(model, box) for every remote model, sorted by model, then in the config's order."""
        pairs = [(m, b) for b in self.boxes for m in b.models
                 if m not in self.local and (not b.imports or m not in self.configured)]  # as `serving` routes
        return sorted(pairs, key=lambda p: p[0])

    def acquire(self, model: str, tried: Sequence[Box] = ()) -> Box:
        """A box for this request, counted in flight there; ModelUnavailableError naming the boxes when each is
        unreachable (or already failed this request)."""
        boxes = self.serving(model)
        box = pick(boxes, model, tried)
        if box is None:
            named = ", ".join(b.describe() for b in boxes)
            raise ModelUnavailableError(f"{model}: upstream {named} {'is' if len(boxes) == 1 else 'are'} unreachable; "
                                        "it is polled again every poll interval", retry_after_s=1)
        box.in_flight[model] = box.in_flight.get(model, 0) + 1
        return box

    def release(self, box: Box, model: str) -> None:
        box.in_flight[model] -= 1

    def failed(self, box: Box, why: str) -> None:
        """A request could not reach it: unreachable until a poll finds it again."""
        if box.reachable is not False:
            log.warning("upstream %s is unreachable: %s", box.name, why,
                        extra={"event": "upstream_down", "upstream": box.name, "url": box.base_url, "reason": why})
        box.reachable = False

    def record(self, box: Box, reading: Reading) -> None:
        """A poll's reading: reachability and latency, and an upstream's models (kept from the last good read
        while it is unreachable, so that a request for one is a 503 naming it, not a 404)."""
        if reading.reachable != box.reachable and box.reachable is not None:
            kind = "upstream_up" if reading.reachable else "upstream_down"
            log.log(logging.INFO if reading.reachable else logging.WARNING, "upstream %s is %s", box.name,
                    "reachable again" if reading.reachable else "unreachable",
                    extra={"event": kind, "upstream": box.name, "url": box.base_url})
        box.reachable, box.latency_ms = reading.reachable, reading.latency_ms
        if not reading.reachable:
            return
        box.slots = reading.slots
        if box.imports and reading.models is not None:
            box.models = self._importable(box, reading.models)

    def _importable(self, box: Box, models: tuple[str, ...]) -> tuple[str, ...]:
        """What an upstream lists, less the names this proxy serves itself (the local model wins, said once)."""
        for model in models:
            if (model in self.local or model in self.configured) and (box.name, model) not in self._said:
                self._said.add((box.name, model))
                log.info("upstream %s: %s is served by this proxy's own config; not imported", box.name, model,
                         extra={"event": "upstream_clash", "upstream": box.name, "model": model})
        return tuple(m for m in models if m not in self.local and m not in self.configured)
