"""Load test of ``skillbank serve`` on the real benchmark's skills: a real HTTP client on 127.0.0.1, bounded.

    python benchmarks/bench_serve.py --work /tmp/real --cache /tmp/sbcache --bank dataless-auto-2bit

Serves the --tasks' skills of ``<work>/banks/<bank>`` with ``skillbank serve`` (the README's command, in its own
process) on the pulled MiniLM, and sends --clients concurrent clients x --requests requests of real test texts:

- **mixed**: each request names a random task's skill (batches mix skills: a switch per skill group);
- **sorted**: each client's requests are sorted by skill (a batch mostly holds one skill);
- **one skill**: every request names the first task's skill (no switch after the first);
- **dense finetunes**: the same mixed traffic on a LitServe server holding every task's dense finetune (no switch,
  one model per task in memory) — what serving per task costs without a bank;
- **peft adapters**: the same mixed traffic on a LitServe server holding the base encoder with one LoRA adapter a
  task (PEFT, every linear layer, the rank that gives the served skills' mean bytes) and each task's head; a group
  switches with ``set_adapter``, PEFT's switch between loaded adapters. The adapters are untrained (LoRA's B = 0):
  this row measures speed only, its accuracy is the base's with each task's head.

Per pattern: throughput, p50 and p99 latency, accuracy against the labels, and the server's switches. Requests are
bounded in count and each in time; the servers are stopped at the end (SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import litserve as ls
import torch

from skillbank import SkillBank
from skillbank.integrations.pulled.tasks import TASKS, load_task
from skillbank.integrations.pulled.wheels import resolve_model
from skillbank.integrations.serving import run_until_stopped

#: Seconds a server may take to start, and one request to be answered.
STARTUP, REQUEST = 600.0, 120.0


class _GroupedServer(ls.LitAPI):
    """A baseline server: JSON in and out, each batch grouped by skill and each group answered by :meth:`logits`."""

    def __init__(self, max_length: int, max_batch_size: int) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=0.01)
        self.max_length = max_length

    def decode_request(self, request):  # noqa: ANN001, ANN201 - unannotated: LitServe then passes the JSON body
        return request

    def batch(self, inputs: list) -> list:
        return inputs

    def unbatch(self, output: list) -> list:
        return output

    def logits(self, skill: str, tokens: dict) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, requests: list[dict]) -> list[dict]:
        answers: list[dict] = [{} for _ in requests]
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r["skill"], []).append(i)
        for name, members in groups.items():
            texts = [requests[i]["text"] for i in members]
            tokens = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
            with torch.no_grad():
                logits = self.logits(name, tokens)
            for i, row in zip(members, logits):
                answers[i] = {"skill": name, "label": int(row.argmax())}
        return answers

    def encode_response(self, output: dict) -> dict:
        return output


class DenseServer(_GroupedServer):
    """The baseline: one dense finetuned classifier per task in memory, each request answered by its task's model."""

    def __init__(self, folders: dict[str, str], tokenizer: str, max_length: int, max_batch_size: int) -> None:
        super().__init__(max_length, max_batch_size)
        self.folders, self.tokenizer_path = folders, tokenizer

    def setup(self, device: str) -> None:
        from skillbank.vectors.models import load_classifier, load_tokenizer

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.models = {name: load_classifier(folder).eval() for name, folder in self.folders.items()}
        self.tokenizer = load_tokenizer(self.tokenizer_path)

    def logits(self, skill: str, tokens: dict) -> torch.Tensor:
        return self.models[skill](**tokens).logits


class PeftServer(_GroupedServer):
    """The PEFT baseline: the base encoder with a LoRA adapter a task, switched per group with ``set_adapter``."""

    def __init__(
        self, base: str, heads: dict[str, str], lora_bytes: int, max_length: int, max_batch_size: int, info: str | None
    ) -> None:
        super().__init__(max_length, max_batch_size)
        self.base, self.heads_from, self.lora_bytes, self.info = base, heads, lora_bytes, info

    def setup(self, device: str) -> None:
        from peft import LoraConfig, get_peft_model

        from skillbank.vectors.models import load_classifier, load_tokenizer

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.tokenizer = load_tokenizer(self.base)
        encoder = load_classifier(self.base, num_labels=2).base_model.eval()  # the base's encoder and pooler
        targets = [m for m in encoder.modules() if isinstance(m, torch.nn.Linear)]
        per_rank = 4 * sum(m.in_features + m.out_features for m in targets)  # fp32 bytes of A and B at rank 1
        rank = max(1, round(self.lora_bytes / per_rank))
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["query", "key", "value", "dense"])
        names = list(self.heads_from)
        self.model = get_peft_model(encoder, config, adapter_name=names[0])
        for name in names[1:]:
            self.model.add_adapter(name, config)
        self.model.eval()
        # each task's head on the pooled features, as its finetune has it
        self.heads = {name: cast(torch.nn.Module, load_classifier(folder).classifier) for name, folder in self.heads_from.items()}
        self.active = names[0]
        if self.info:
            Path(self.info).write_text(json.dumps({"lora rank": rank, "lora bytes": rank * per_rank}))

    def logits(self, skill: str, tokens: dict) -> torch.Tensor:
        if skill != self.active:
            self.model.set_adapter(skill)
            self.active = skill
        return self.heads[skill](self.model(**tokens).pooler_output)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(command: list[str], url: str, log: Path) -> subprocess.Popen:
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + STARTUP
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return process
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start: {log.read_text()[-2000:]}")
        time.sleep(1)


def _stop(process: subprocess.Popen) -> None:
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def _post(url: str, body: dict) -> tuple[dict, float]:
    request = urllib.request.Request(
        f"{url}/predict", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=REQUEST) as response:
        answer = json.loads(response.read())
    return answer, time.perf_counter() - start


def _traffic(url: str, plans: list[list[tuple[str, str, int]]]) -> dict[str, Any]:
    """Every client sends its plan's (skill, text, label) requests one after another; all clients at once."""

    def client(plan: list[tuple[str, str, int]]) -> list[tuple[bool, float]]:
        out = []
        for skill, text, label in plan:
            answer, seconds = _post(url, {"text": text, "skill": skill})
            out.append((answer["label"] == label and answer["skill"] == skill, seconds))
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(len(plans)) as pool:
        results = [r for rs in pool.map(client, plans) for r in rs]
    wall = time.perf_counter() - start
    latencies = sorted(s for _, s in results)
    return {
        "requests": len(results),
        "seconds": round(wall, 2),
        "throughput": round(len(results) / wall, 2),
        "p50_ms": round(1e3 * latencies[len(latencies) // 2], 1),
        "p99_ms": round(1e3 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1),
        "accuracy": round(sum(ok for ok, _ in results) / len(results), 4),
    }


def _metrics(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/metrics", timeout=REQUEST) as response:
        return json.loads(response.read())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, help="bench_real.py's work folder (its banks and finetunes)")
    p.add_argument("--cache", default=None, help="pulled wheels' files (default $SKILLBANK_CACHE or ~/.cache/skillbank)")
    p.add_argument("--bank", default="dataless-auto-2bit", help="the work folder's bank whose skills are served")
    p.add_argument("--tasks", type=lambda s: s.split(","), default=list(TASKS), help="the served tasks (default the six)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=100, help="requests per client and pattern")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64, help="tokens per text (bench_real's default)")
    p.add_argument(
        "--patterns",
        type=lambda s: s.split(","),
        default=["mixed", "sorted", "one skill", "dense finetunes", "peft adapters"],
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON results (default <work>/serve.json)")
    a = p.parse_args()
    if a.cache:
        os.environ["SKILLBANK_CACHE"] = a.cache
    work = Path(a.work).expanduser()
    base = resolve_model("pulled:minilm")
    served = work / f"serve-{a.bank}"
    bank = SkillBank(served)
    source = SkillBank(work / "banks" / a.bank, create=False)
    for name in a.tasks:
        if name not in bank:
            bank.add(source.get(name))
    texts = {name: load_task(name, a.cache).test for name in a.tasks}
    rng = random.Random(a.seed)

    def draw(skill: str) -> tuple[str, str, int]:
        i = rng.randrange(len(texts[skill]))
        return skill, texts[skill].texts[i], texts[skill].labels[i]

    plans = {
        "mixed": [[draw(rng.choice(a.tasks)) for _ in range(a.requests)] for _ in range(a.clients)],
        "one skill": [[draw(a.tasks[0]) for _ in range(a.requests)] for _ in range(a.clients)],
    }
    plans["sorted"] = [sorted(plan, key=lambda r: a.tasks.index(r[0])) for plan in plans["mixed"]]
    plans["dense finetunes"] = plans["peft adapters"] = plans["mixed"]
    results: dict[str, Any] = {"bank": a.bank, "tasks": a.tasks, "clients": a.clients, "requests": a.requests}
    bits = [bank.entry(n).bits_per_parameter or 0.0 for n in a.tasks]
    results["bits per parameter"] = round(sum(bits) / len(bits), 3)
    skill_patterns = [q for q in a.patterns if q not in ("dense finetunes", "peft adapters")]
    if skill_patterns:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-c", "from skillbank.integrations.cli import main; raise SystemExit(main())", "serve"]
        command += [str(served), "--base", str(base), "--port", str(port), "--max-batch-size", str(a.max_batch_size)]
        command += ["--max-length", str(a.max_length)]
        start = time.perf_counter()
        process = _start(command, url, work / "serve.log")
        results["startup seconds"] = round(time.perf_counter() - start, 1)
        try:
            for pattern in skill_patterns:
                before = _metrics(url).get("switches", 0)
                results[pattern] = _traffic(url, plans[pattern])
                results[pattern]["switches"] = _metrics(url)["switches"] - before
                print(pattern, json.dumps(results[pattern]), flush=True)
        finally:
            _stop(process)
    entries = [bank.entry(n) for n in a.tasks]  # the skills' shared parts (their heads aside), which LoRA stands for
    skill_bytes = int(sum((e.bits_per_parameter or 0.0) * e.shared / 8 for e in entries) / len(entries))
    for pattern, flag in (("dense finetunes", "--serve-dense"), ("peft adapters", "--serve-peft")):
        if pattern not in a.patterns:
            continue
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, __file__, "--work", str(work), "--tasks", ",".join(a.tasks), flag, str(port)]
        command += ["--max-batch-size", str(a.max_batch_size), "--max-length", str(a.max_length)]
        command += ["--lora-bytes", str(skill_bytes), "--info", str(work / "serve-peft.json")]
        process = _start(command, url, work / f"serve-{flag[8:]}.log")
        try:
            results[pattern] = _traffic(url, plans[pattern])
            if pattern == "peft adapters":  # the adapters' rank and bytes, as the server's worker chose them
                results[pattern].update(json.loads((work / "serve-peft.json").read_text()))
            print(pattern, json.dumps(results[pattern]), flush=True)
        finally:
            _stop(process)
    out = Path(a.out) if a.out else work / "serve.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"results in {out}")


def serve_baseline() -> None:
    """A baseline's server process: ``--serve-dense PORT`` (the dense finetunes) or ``--serve-peft PORT`` (LoRA)."""
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    p.add_argument("--tasks", type=lambda s: s.split(","), required=True)
    p.add_argument("--serve-dense", type=int, default=None)
    p.add_argument("--serve-peft", type=int, default=None)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lora-bytes", type=int, default=2_000_000)
    p.add_argument("--info", default=None, help="where the PEFT server writes its adapters' rank and bytes")
    a = p.parse_args()
    work = Path(a.work)
    folders = {name: str(work / "finetuned" / name) for name in a.tasks}
    base = str(resolve_model("pulled:minilm"))
    api: ls.LitAPI
    if a.serve_peft is not None:
        api = PeftServer(base, folders, a.lora_bytes, a.max_length, a.max_batch_size, a.info)
    else:
        api = DenseServer(folders, base, a.max_length, a.max_batch_size)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=REQUEST)
    run_until_stopped(server, "127.0.0.1", a.serve_peft if a.serve_peft is not None else a.serve_dense)


if __name__ == "__main__":
    if "--serve-dense" in sys.argv or "--serve-peft" in sys.argv:
        serve_baseline()
    else:
        main()
