"""Fault injection for SkillBank: writer/reader child processes, SIGKILL trials and their invariants.

Used by ``tests/storage/test_reliability.py`` (a few trials) and ``benchmarks/bench_bank_faults.py``
(the full counts). Run as a script it is a child role:

    python tests/storage/bank_faults.py writer BANK ACKS START COUNT [KILL_AT_CALL]
    python tests/storage/bank_faults.py reader BANK STOP_FILE REPORT
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from skillbank.storage.bank import SkillBank
from skillbank.storage.skill import Region, Skill, SkillMetadata

HERE = Path(__file__).resolve()
FINGERPRINT = "f" * 64
NUMEL = 1 << 21  # a 2M-entry tensor: each skill file is about 1.2 MB, so writes take a while


def fixed_skill(i: int) -> Skill:
    """Skill number ``i``, the same bytes in every process."""
    gen = torch.Generator().manual_seed(i)
    idx = torch.unique(torch.randint(0, NUMEL, (200_000,), generator=gen))
    meta = SkillMetadata(f"s{i:05d}", FINGERPRINT, 0.1, {"w": [NUMEL]}, created="2026-01-01T00:00:00+00:00")
    return Skill(meta, {"w": Region(idx, torch.randn(idx.numel(), generator=gen))})


def skill_sha(i: int) -> str:
    return hashlib.sha256(fixed_skill(i).to_bytes()).hexdigest()


#: File-system calls per add: skill file (write, fsync, rename, fsync dir), then the manifest (the same four).
CALLS_PER_ADD = 8


def _kill_at(call: int) -> None:
    """SIGKILL this process at the ``call``-th write, fsync or rename; a write is torn: half its bytes land."""
    counter = {"n": 0}

    def wrap(fn, tear: bool = False):  # noqa: ANN001, ANN202
        def wrapped(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            counter["n"] += 1
            if counter["n"] == call:
                if tear:
                    fd, data = args
                    fn(fd, data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)

        return wrapped

    os.write = wrap(os.write, tear=True)
    os.fsync = wrap(os.fsync)
    os.replace = wrap(os.replace)


def writer(bank: str, acks: str, start: int, count: int, kill_at: int | None) -> None:
    skills = [fixed_skill(i) for i in range(start, start + count)]
    b = SkillBank(bank)
    Path(acks + ".ready").touch()
    if kill_at:
        _kill_at(kill_at)
    with open(acks, "a") as log:
        for skill in skills:
            b.add(skill)
            log.write(skill.name + "\n")  # acknowledged: add() has returned
            log.flush()


def reader(bank: str, stop: str, report: str) -> None:
    reads, errors = 0, []
    b = SkillBank(bank)
    while not Path(stop).exists():
        for name in b.names():
            try:
                b.get(name)
                reads += 1
            except Exception as exc:  # noqa: BLE001 - every failure is a finding
                errors.append(f"{name}: {exc}")
    Path(report).write_text(json.dumps({"reads": reads, "errors": errors}))


def spawn(*args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE), *map(str, args)], env={**os.environ, "PYTHONPATH": str(HERE.parent)})


def crash_trial(bank: Path, trial: int, rng: random.Random, per_trial: int = 6) -> dict:
    """One child adds skills and is SIGKILLed; returns what the bank holds against what was acknowledged."""
    acks = bank.parent / f"acks-{trial}.txt"
    start = trial * per_trial
    deterministic = rng.random() < 0.5
    kill_at = rng.randint(1, CALLS_PER_ADD * per_trial) if deterministic else 0
    child = spawn("writer", bank, acks, start, per_trial, kill_at)
    if not deterministic:
        while not Path(str(acks) + ".ready").exists() and child.poll() is None:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.15))
        child.send_signal(signal.SIGKILL)
    child.wait()
    acked = acks.read_text().split() if acks.exists() else []
    opened = SkillBank(bank)  # must open (a read cleans nothing: gc below, under the writer's lock, does)
    orphans = opened.orphans()
    opened.gc()
    names = opened.names()
    report = opened.verify()
    mine = [n for n in names if start <= int(n[1:]) < start + per_trial]
    # this trial's skills byte for byte; earlier ones were checked in their trial, and verify() re-checks their sha256
    wrong = [n for n in mine if opened.entry(n).sha256 != skill_sha(int(n[1:]))]
    return {
        "mode": f"kill at write/fsync/rename #{kill_at}" if deterministic else "timer",
        "killed": child.returncode == -signal.SIGKILL,
        "acked": len(acked),
        "present": len(mine),
        "lost": sorted(set(acked) - set(names)),
        "damaged": [n for n, status in report.items() if status != "ok"],
        "wrong_bytes": wrong,
        "orphans": orphans,
        "leftovers": sorted(p.name for p in bank.glob(".tmp-*")),
    }


def concurrent_writers(bank: Path, writers: int = 4, each: int = 25) -> dict:
    """``writers`` processes add ``each`` skills into one bank while a reader reads every listed skill."""
    stop, report = bank.parent / "stop", bank.parent / "reader.json"
    SkillBank(bank)
    reading = spawn("reader", bank, stop, report)
    started = time.perf_counter()
    procs = [spawn("writer", bank, bank.parent / f"w{w}.txt", 10_000 + w * each, each, 0) for w in range(writers)]
    codes = [p.wait() for p in procs]
    elapsed = time.perf_counter() - started
    stop.touch()
    reading.wait()
    read = json.loads(report.read_text())
    b = SkillBank(bank)
    return {
        "exit_codes": codes,
        "skills": len(b),
        "verified": sum(status == "ok" for status in b.verify().values()),
        "seconds": elapsed,
        "reader_reads": read["reads"],
        "reader_errors": read["errors"],
    }


if __name__ == "__main__":
    role, *rest = sys.argv[1:]
    if role == "writer":
        bank_dir, acks_file, first, n = rest[:4]
        writer(bank_dir, acks_file, int(first), int(n), int(rest[4]) if len(rest) > 4 and int(rest[4]) else None)
    else:
        reader(*rest)
