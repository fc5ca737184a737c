"""``skillbank serve``: every request answered by its own skill, from one base model in memory, on LitServe.

LitServe brings the HTTP layer, the worker process and the batching; this
module says what a batch means here. :class:`SkillServer` (a ``LitAPI``) holds
the base classifier, a :class:`~skillbank.stitching.single_skill.SingleSkillSwitcher`
and up to ``max_prepared`` bank skills *prepared* (checked, decoded and laid out
once; the others are read from the bank when a request names them, the least
recently used one leaving). A batch of requests is grouped by skill and each
group costs one switch: the skill held by the last group stays held when the
next batch starts with it. A request that names no skill is routed
to the skill whose routing centroids are nearest under the base
(:class:`~skillbank.stitching.routing.SkillRouter`), and the answer says so.

New bank skills are picked up without a restart (the manifest is looked at
every ``refresh_seconds``, and at once when a request names a skill the worker
does not hold); a removed skill is no longer offered, and requests already
accepted for it are still answered (drained) from its prepared copy.

Requests are checked before they reach a batch, in the HTTP process: a body
that is not ``{"text": str, "skill": str | null}`` or names a skill the bank
does not hold gets a 422 whose message says what is wrong (and lists the bank's
skills), so one bad request never fails its batch. ``GET /metrics`` reports
the skills offered and prepared, switches, and request counts and latency per skill; LitServe's
``GET /health`` says when the worker is ready.
"""

# no ``from __future__ import annotations``: LitServe reads ``decode_request``'s annotation as the request type itself
import json
import os
import signal
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import litserve as ls
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from skillbank.errors import SkillbankError
from skillbank.stitching.single_skill import SwitchableSkill
from skillbank.storage.bank import SkillBank

__all__ = ["MAX_TEXT_CHARS", "ServeRequest", "SkillServer", "build_server", "read_metrics", "run_until_stopped"]

#: The longest text a request may carry (characters; texts are cut to ``max_length`` tokens anyway).
MAX_TEXT_CHARS = 100_000
#: The longest ``/metrics`` file the HTTP process reads back.
_MAX_METRICS_BYTES = 4 * 2**20


#: What the HTTP process checks a request's skill against; set by :func:`build_server` (the HTTP processes fork from it).
_CHECK: dict[str, Any] = {}


class ServeRequest(BaseModel):
    """A ``/predict`` body: the text to classify, and the skill that answers (``None``: the router picks).

    In a server from :func:`build_server` a skill the bank does not hold (re-read as the manifest changes) is
    refused, and so is a request without a skill when no skill can be routed to.
    """

    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    skill: str | None = Field(default=None, max_length=128)

    @field_validator("skill")
    @classmethod
    def _known(cls, skill: str | None) -> str | None:
        bank: SkillBank | None = _CHECK.get("bank")
        if bank is None:
            return skill
        if skill is None:
            if not _CHECK.get("routable"):
                raise ValueError("name a skill: no skill of this bank has routing data (localize with --routing-data to route)")
            return None
        names = bank.names()
        if skill not in names:
            shown = ", ".join(names[:50]) + (f" and {len(names) - 50} more" if len(names) > 50 else "")
            raise ValueError(f"unknown skill {skill!r}; the bank holds: {shown or 'no skills'}")
        return skill


class SkillServer(ls.LitAPI):
    """A LitServe API over a bank: ``/predict`` takes :class:`ServeRequest` and answers with the skill's own model.

    Args:
        bank: the bank folder.
        base: the base model's ``save_pretrained`` folder (the skills' base).
        tokenizer: the tokenizer's folder (default: ``base``).
        max_length: tokens per text (longer texts are cut).
        refresh_seconds: how often the worker looks for new or removed bank skills.
        max_prepared: skills kept prepared in memory (16 bytes an entry each); others are read from the bank and
            prepared when a request names them, the least recently used one leaving.
        metrics_path: where the worker writes its metrics (JSON, replaced atomically after every batch).
        max_batch_size, batch_timeout: LitServe's batching.
    """

    def __init__(
        self,
        bank: str | Path,
        base: str | Path,
        *,
        tokenizer: str | Path | None = None,
        max_length: int = 128,
        refresh_seconds: float = 2.0,
        max_prepared: int = 64,
        metrics_path: str | Path | None = None,
        max_batch_size: int = 16,
        batch_timeout: float = 0.01,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.bank_path, self.base_path = Path(bank), Path(base)
        self.tokenizer_path = Path(tokenizer) if tokenizer is not None else self.base_path
        self.max_length, self.refresh_seconds, self.max_prepared = max_length, refresh_seconds, max(1, max_prepared)
        self.metrics_path = Path(metrics_path) if metrics_path is not None else None

    def setup(self, device: str) -> None:
        """Load the base and its tokenizer, offer every bank skill and prepare up to ``max_prepared`` of them (LitServe
        calls this in the worker)."""
        from skillbank.stitching.single_skill import SingleSkillSwitcher
        from skillbank.vectors.models import load_classifier, load_tokenizer

        # Ctrl-C reaches the whole process group: the server process stops this worker, so no traceback here
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.device = torch.device(device)
        self.bank = SkillBank(self.bank_path, create=False)
        self.model = load_classifier(self.base_path).to(self.device).eval()
        self.tokenizer = load_tokenizer(self.tokenizer_path)
        self.switcher = SingleSkillSwitcher(self.model, self.base_path, bank=self.bank)
        self.offered: set[str] = set()
        self.prepared: OrderedDict[str, SwitchableSkill] = OrderedDict()  # least recently used first
        self.centroids: dict[str, torch.Tensor] = {}
        self.metrics: dict[str, Any] = {
            "switches": 0,
            "batches": 0,
            "requests": 0,
            "prepared on demand": 0,
            "skills": {},
            "started": time.time(),
        }
        self._looked = 0.0
        self._refresh(force=True)

    def _refresh(self, force: bool = False) -> None:
        """Offer the bank's new skills (prepared while there is room) and forget removed ones (a held one stays
        in the model until the next switch, so requests already in its batch are answered)."""
        if not force and time.monotonic() - self._looked < self.refresh_seconds:
            return
        self._looked = time.monotonic()
        listed = self.bank.names()
        names = set(listed)  # membership of every offered skill: a set, not the manifest's list
        for name in [n for n in self.offered if n not in names]:
            self.offered.discard(name)
            self.prepared.pop(name, None)
            self.centroids.pop(name, None)
        for name in [n for n in listed if n not in self.offered]:
            self.offered.add(name)
            room = len(self.prepared) < self.max_prepared
            if not room and not self.bank.routable(name):
                continue  # read when a request names it: a large bank is not read whole at start
            skill = self.bank.get(name)
            if skill.centroids is not None:
                self.centroids[name] = skill.centroids
            if room:
                self.prepared[name] = self.switcher.prepare(skill)
        self.metrics["offered"] = sorted(self.offered)
        self.metrics["prepared"] = len(self.prepared)

    def _skill(self, name: str) -> SwitchableSkill:
        """Skill ``name`` prepared: from the cache (now the most recently used), or read from the bank, the least
        recently used skill leaving the cache when it is full."""
        if name in self.prepared:
            self.prepared.move_to_end(name)
            return self.prepared[name]
        if name not in self.offered:
            raise SkillbankError(f"skill {name!r} left the bank before its requests were answered.")
        skill = self.switcher.prepare(name)
        self.metrics["prepared on demand"] += 1
        while len(self.prepared) >= self.max_prepared:  # the held skill may leave too: the switcher keeps its own copy
            self.prepared.popitem(last=False)
        self.prepared[name] = skill
        self.metrics["prepared"] = len(self.prepared)
        return skill

    def decode_request(self, request: ServeRequest) -> ServeRequest:
        """The request as FastAPI parsed and checked it (see :class:`ServeRequest`)."""
        return request

    def batch(self, inputs: list[ServeRequest]) -> list[ServeRequest]:
        """Requests stay a list: :meth:`predict` groups them by skill."""
        return inputs

    def unbatch(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One answer per request, in order."""
        return output

    def predict(self, requests: list[ServeRequest]) -> list[dict[str, Any]]:
        """Answer each request with its skill's model: route the unnamed ones, then one switch per skill group."""
        self._refresh(force=any(r.skill is not None and r.skill not in self.offered for r in requests))
        start = time.perf_counter()
        answers: list[dict[str, Any]] = [{} for _ in requests]
        chosen: list[str | None] = [r.skill for r in requests]
        unnamed = [i for i, name in enumerate(chosen) if name is None]
        if unnamed:
            for i, (routed, why) in zip(unnamed, self._route([requests[i].text for i in unnamed])):
                chosen[i] = routed
                answers[i]["routed"] = why
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(chosen):
            groups.setdefault(str(name), []).append(i)
        order = sorted(groups, key=lambda n: n != self.switcher.held)  # the held skill first: no switch for it
        for name in order:
            held = self.switcher.held_skill
            # a skill removed from the bank while held still answers the requests already in its batch (drained)
            skill = held if held is not None and held.name == name and name not in self.offered else self._skill(name)
            if skill is not held:  # by object: a skill replaced in the bank is switched to anew
                self.switcher.switch(skill)
                self.metrics["switches"] += 1
            members = groups[name]
            with torch.no_grad(), self.switcher.use_head(skill) as model:
                logits = model(**self._tokens([requests[i].text for i in members])).logits.float().cpu()
            for i, row in zip(members, logits):
                answers[i].update(skill=name, label=int(row.argmax()), logits=row.tolist())
        self._count(groups, time.perf_counter() - start, len(requests))
        return answers

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        """The answer as JSON: ``skill``, ``label``, ``logits``, and ``routed`` (why) when the router chose."""
        return output

    def _tokens(self, texts: list[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def _route(self, texts: list[str]) -> list[tuple[str, dict[str, Any]]]:
        """The nearest skill for each text under the base model, and why (the similarity, the runner-up)."""
        from skillbank.stitching.routing import SkillRouter, mean_pooled_features

        if not self.centroids:
            raise SkillbankError("no skill of this bank has routing data; name the skill in each request.")
        if self.switcher.held is not None:
            self.switcher.switch(None)
            self.metrics["switches"] += 1
        router = SkillRouter(self.centroids)
        with torch.no_grad():
            scores = router.scores(mean_pooled_features(self.model, self._tokens(texts)))
        out = []
        for row in scores:
            top = row.topk(min(2, len(row)))
            best = router.names[int(top.indices[0])]
            why: dict[str, Any] = {"by": "nearest routing centroid under the base", "similarity": round(float(top.values[0]), 4)}
            if len(top.values) > 1:
                why["runner_up"] = {"skill": router.names[int(top.indices[1])], "similarity": round(float(top.values[1]), 4)}
            out.append((best, why))
        return out

    def _count(self, groups: dict[str, list[int]], seconds: float, requests: int) -> None:
        """Add a batch to the metrics and write them where ``/metrics`` reads them."""
        self.metrics["batches"] += 1
        self.metrics["requests"] += requests
        for name, members in groups.items():
            per = self.metrics["skills"].setdefault(name, {"requests": 0, "seconds": 0.0})
            per["requests"] += len(members)
            per["seconds"] += seconds * len(members) / requests
            per["mean_ms"] = round(1e3 * per["seconds"] / per["requests"], 3)
        if self.metrics_path is not None:
            _write_atomically(self.metrics_path, json.dumps(self.metrics, sort_keys=True))


def _write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` at once for its readers; no fsync (``durable.atomic_write``'s two would cost every batch
    time, and metrics need not outlive the server)."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".metrics.")
    with os.fdopen(handle, "w") as out:
        out.write(text)
    os.replace(temporary, path)


def read_metrics(path: Path) -> dict[str, Any]:
    """The worker's last metrics (empty before its first batch), read with a bound."""
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_METRICS_BYTES + 1)
    except FileNotFoundError:
        return {"batches": 0}
    if len(data) > _MAX_METRICS_BYTES:
        return {"error": "metrics too large"}
    return json.loads(data)


def build_server(api: SkillServer, *, routable: bool, timeout: float = 60.0) -> ls.LitServer:
    """A ``LitServer`` for ``api`` whose ``/predict`` checks each request against the bank, with ``GET /metrics``.

    ``routable``: whether requests may leave the skill out (some skill has routing centroids).
    """
    _CHECK.update(bank=SkillBank(api.bank_path, create=False), routable=routable)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=timeout)
    metrics_path = api.metrics_path
    reader: Callable[[], dict[str, Any]] = (lambda: read_metrics(metrics_path)) if metrics_path else (lambda: {})
    server.app.add_api_route("/metrics", reader, methods=["GET"])
    return server


def run_until_stopped(server: ls.LitServer, host: str, port: int) -> None:
    """Run ``server`` until Ctrl-C or SIGTERM, then return once LitServe has stopped its worker and HTTP processes.

    SIGTERM is turned into Ctrl-C in this process; in the HTTP processes, which fork from here and keep the
    handler, it is a plain, quiet exit (uvicorn raises the signal it caught again when it stops).
    """
    owner = os.getpid()

    def stop(signum: int, frame: object) -> None:
        if os.getpid() != owner:
            raise SystemExit(0)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        server.run(host=host, port=port, generate_client_file=False, log_level="warning")
    finally:
        signal.signal(signal.SIGTERM, previous)
