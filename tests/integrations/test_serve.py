"""``skillbank serve`` for real: the command in its own process, a real HTTP client on 127.0.0.1, bounded in count and time.

Every answer must equal what ``Stitcher.active(skill)`` gives on the same text in this process; bad requests get a
422 that says why and the server keeps answering; a skill banked while it runs is served without a restart; SIGTERM
stops it and every process it started.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertModel

from helpers.models import finetune_like, tiny_config, tiny_tokenizer
from skillbank import SkillBank, Stitcher, localize_dataless, task_vector
from skillbank.stitching.routing import SkillRouter, mean_pooled_features, with_routing
from skillbank.vectors.models import load_classifier

pytestmark = pytest.mark.slow

#: Seconds the server may take to start on a loaded box (it imports torch and transformers twice), and a request.
STARTUP, REQUEST = 300.0, 60.0
WORDS = [f"w{i}" for i in range(59)]


def _skill(base: BertModel, seed: int, labels: int):  # noqa: ANN202 - a Skill
    skill = localize_dataless(task_vector(base, finetune_like(base, seed=seed, num_labels=labels)), 0.05, name=f"t{seed}")
    centroid = torch.zeros(1, base.config.hidden_size)
    centroid[0, seed] = 1.0  # one direction each: the router's choice differs by input
    return with_routing(skill, centroid)


@pytest.fixture
def served(tmp_path, request):  # noqa: ANN201 - (url, bank folder, base folder, process); request.param: more flags
    torch.manual_seed(0)
    base = BertModel(tiny_config()).eval()
    base.save_pretrained(tmp_path / "base")
    tiny_tokenizer(WORDS).save_pretrained(tmp_path / "base")
    bank = SkillBank(tmp_path / "bank")
    for seed in range(3):
        bank.add(_skill(base, seed, labels=2 + seed))
    with socket.socket() as probe:  # a free port on loopback
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-c", "from skillbank.integrations.cli import main; raise SystemExit(main())", "serve"]
    command += [str(tmp_path / "bank"), "--base", str(tmp_path / "base"), "--port", str(port), "--max-batch-size", "8"]
    command += ["--refresh", "0.5", *getattr(request, "param", [])]
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP
        while not _healthy(url):
            assert process.poll() is None, (tmp_path / "server.log").read_text()
            assert time.monotonic() < deadline, "the server did not become healthy in time"
            time.sleep(0.5)
        yield url, tmp_path, base, process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
        log.close()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _post(url: str, body: object) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/predict", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=REQUEST) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _expected(folder: Path, texts: list[str], skills: list[str]) -> list[torch.Tensor]:
    """Each text's logits from ``Stitcher.active(skill)`` in this process, one text at a time."""
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "base"), local_files_only=True)
    stitcher = Stitcher(load_classifier(folder / "base").eval(), folder / "base", bank=SkillBank(folder / "bank", create=False))
    out = []
    with torch.no_grad():
        for text, skill in zip(texts, skills):
            with stitcher.active(skill) as model:
                out.append(model(**tokenizer(text, return_tensors="pt")).logits[0])
    return out


def test_every_answer_is_its_skills_own_model(served):
    url, folder, _, process = served
    texts = [" ".join(WORDS[(7 * n + j) % 59] for j in range(1 + n % 6)) for n in range(50)]  # lengths 1-6: padding
    skills = [f"t{n % 3}" for n in range(50)]
    with ThreadPoolExecutor(4) as clients:  # 4 clients, 50 mixed requests: batches mix skills
        answers = list(clients.map(lambda pair: _post(url, {"text": pair[0], "skill": pair[1]}), zip(texts, skills)))
    for (status, answer), skill, logits in zip(answers, skills, _expected(folder, texts, skills)):
        assert status == 200 and answer["skill"] == skill and "routed" not in answer
        torch.testing.assert_close(torch.tensor(answer["logits"]), logits, rtol=1e-4, atol=1e-5)
        assert answer["label"] == int(logits.argmax())

    with urllib.request.urlopen(f"{url}/metrics", timeout=REQUEST) as response:
        metrics = json.loads(response.read())
    assert metrics["requests"] == 50 and sum(s["requests"] for s in metrics["skills"].values()) == 50
    assert metrics["offered"] == ["t0", "t1", "t2"] and metrics["prepared"] == 3 and metrics["prepared on demand"] == 0
    assert 3 <= metrics["switches"] <= metrics["batches"] * 3

    os.kill(process.pid, signal.SIGTERM)  # a process manager's stop: the server and every process it started end
    assert process.wait(timeout=STARTUP) == 0
    deadline = time.monotonic() + 60
    while _group_alive(process.pid):
        assert time.monotonic() < deadline, "the server left processes behind"
        time.sleep(0.5)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_router_picks_when_no_skill_is_named_and_says_why(served):
    url, folder, base, _ = served
    texts = ["w1 w2 w3", "w40 w41", "w7"]
    with torch.no_grad():
        tokenizer = AutoTokenizer.from_pretrained(str(folder / "base"), local_files_only=True)
        features = mean_pooled_features(
            load_classifier(folder / "base").eval(), tokenizer(texts, return_tensors="pt", padding=True)
        )
    bank = SkillBank(folder / "bank", create=False)
    chosen = SkillRouter([bank.get(n) for n in bank.names()]).route(features)
    for text, skill, logits in zip(texts, chosen, _expected(folder, texts, chosen)):
        status, answer = _post(url, {"text": text})
        assert status == 200 and answer["skill"] == skill
        assert answer["routed"]["by"] == "nearest routing centroid under the base" and "runner_up" in answer["routed"]
        torch.testing.assert_close(torch.tensor(answer["logits"]), logits, rtol=1e-4, atol=1e-5)


def test_bad_requests_get_a_422_that_says_why_and_the_server_goes_on(served):
    url, folder, base, _ = served
    status, answer = _post(url, {"text": "w1", "skill": "nope"})
    assert status == 422 and "unknown skill 'nope'; the bank holds: t0, t1, t2" in json.dumps(answer)
    for body in (b"not json", {"txt": "w1"}, {"text": ""}, {"text": "w1", "skill": "t0", "extra": 1}, [1, 2], {"text": 5}):
        status, answer = _post(url, body)
        assert status == 422 and answer["detail"], body
    status, answer = _post(url, {"text": "w1 " * 60_000})  # past MAX_TEXT_CHARS
    assert status == 422 and "at most 100000 characters" in json.dumps(answer)
    status, answer = _post(url, {"text": "w1 w2", "skill": "t1"})
    assert status == 200 and answer["skill"] == "t1"

    bank = SkillBank(folder / "bank")  # a skill banked while the server runs: served without a restart
    bank.add(_skill(base, 3, labels=2))
    status, answer = _post(url, {"text": "w5 w6", "skill": "t3"})
    assert status == 200 and answer["skill"] == "t3"
    torch.testing.assert_close(torch.tensor(answer["logits"]), _expected(folder, ["w5 w6"], ["t3"])[0], rtol=1e-4, atol=1e-5)
    bank.remove("t0")  # a removed one is no longer offered
    status, answer = _post(url, {"text": "w1", "skill": "t0"})
    assert status == 422 and "the bank holds: t1, t2, t3" in json.dumps(answer)


@pytest.mark.parametrize("served", [["--max-prepared", "1"]], indirect=True)
def test_skills_past_the_prepared_cache_are_read_from_the_bank_when_named(served):
    url, folder, _, _ = served
    texts, skills = [f"w{n} w{n + 1}" for n in range(9)], [f"t{n % 3}" for n in range(9)]
    for text, skill, logits in zip(texts, skills, _expected(folder, texts, skills)):
        status, answer = _post(url, {"text": text, "skill": skill})  # one at a time: every request a switch
        assert status == 200 and answer["skill"] == skill
        torch.testing.assert_close(torch.tensor(answer["logits"]), logits, rtol=1e-4, atol=1e-5)
    with urllib.request.urlopen(f"{url}/metrics", timeout=REQUEST) as response:
        metrics = json.loads(response.read())
    assert metrics["prepared"] == 1 and metrics["prepared on demand"] == 8 and metrics["offered"] == ["t0", "t1", "t2"]
