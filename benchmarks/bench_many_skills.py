"""A bank of thousands of skills: ``skillbank stitch --out``, ``list``, ``verify`` and ``report`` time against the number of skills.

    python benchmarks/bench_many_skills.py [--skills 500 2000] [--commands report] [--out many.json]

A tiny BERT base (2 layers, hidden 32: the model is small on purpose, so what
grows with the number of skills — the manifest read for each skill — shows) and
N random 1% skills. Each command runs as a user runs it, a ``skillbank`` child
process, and is timed whole (interpreter start included, about 2–5 s). The bank
is built with one manifest write (``SkillBank`` internals; N ``add`` calls would
fsync N manifests), so only the commands are timed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import BertConfig, BertModel

sys.path.insert(0, str(Path(__file__).parent))
from bench_stitch import random_skill  # noqa: E402
from skillbank import SkillBank, base_fingerprint  # noqa: E402
from skillbank.storage.bank import SkillEntry  # noqa: E402


def make_bank(path: Path, state: dict, n: int) -> SkillBank:
    """A bank of ``n`` random 1% skills, written with a single manifest write."""
    bank = SkillBank(path)
    fingerprint = base_fingerprint(state)
    manifest = bank._read_manifest()
    for i in range(n):
        skill = random_skill(state, fingerprint, f"s{i:05d}", seed=i)
        data = skill.to_bytes()
        entry = SkillEntry(
            name=skill.name,
            file=f"{skill.name}.safetensors",
            bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            sparsity=0.01,
            entries=skill.num_entries,
        )
        (path / entry.file).write_bytes(data)
        manifest["skills"].append(asdict(entry))
    manifest["base_fingerprint"] = fingerprint
    bank._write_manifest(manifest)
    return bank


def timed(argv: list[str]) -> float:
    """Seconds one ``skillbank`` command takes as a child process (it must succeed)."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "import sys; from skillbank.integrations.cli import main; sys.exit(main())", *argv],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skills", type=int, nargs="+", default=[500, 2000], help="bank sizes (default: 500 2000)")
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument(
        "--commands",
        nargs="+",
        default=["stitch", "list", "verify", "report", "help"],
        help="which commands to time (default: all)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = BertModel(config).eval()
    state = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-many-") as work:
        base = Path(work) / "base"
        model.save_pretrained(base)
        for n in args.skills:
            bank = Path(work) / f"bank-{n}"
            make_bank(bank, state, n)
            commands = {
                "stitch": ["stitch", "--bank", str(bank), "--base", str(base), "--out", str(Path(work) / f"out-{n}")],
                "list": ["list", str(bank)],
                "verify": ["verify", str(bank)],
                "report": ["report", str(bank), "--out", str(Path(work) / f"report-{n}.html")],
                "help": ["--help"],
            }
            row = {f"{c} s": timed(commands[c]) for c in args.commands}
            results[str(n)] = row
            print(f"{n} skills: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
