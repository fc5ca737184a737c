"""What composing skills matrix by matrix costs: ``SpectralStitcher`` against the per-entry ``Stitcher``.

    python benchmarks/bench_spectral.py [--model minilm|roberta] [--skills 8] [--sparsity 0.1] [--rules mean,tsv_m]

A model of MiniLM-L6's shape (6 layers, width 384, 22M parameters) or RoBERTa-base's (12 layers, width 768,
125M), random init, and random skills of ``--sparsity`` (uniform per tensor, as ``bench_stitch.py``). Skills
arrive one at a time; the time of each arrival (every matrix the skill touches recomputed from all skills
stitched so far) and of removing the last one are recorded for TSV-M, Iso-C and Iso-CTS, with the ``mean``
rule's add beside them. One process, float32, the CPU (or ``--device cuda``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertModel

sys.path.insert(0, str(Path(__file__).parent))
from bench_stitch import make_base, random_skill  # noqa: E402
from skillbank import Stitcher, base_fingerprint  # noqa: E402
from skillbank.stitching.spectral_stitcher import SpectralStitcher  # noqa: E402


def model(kind: str, device: str) -> torch.nn.Module:
    if kind == "roberta":
        return make_base(device)
    torch.manual_seed(0)
    config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    return BertModel(config).eval().to(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("minilm", "roberta"), default="minilm")
    p.add_argument("--skills", type=int, default=8)
    p.add_argument("--sparsity", type=float, default=0.1)
    p.add_argument("--rules", default="mean,tsv_m,iso_c,iso_cts", help="comma-separated: mean and spectral merges")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    live = model(args.model, args.device)
    state = {k: v.detach().cpu() for k, v in live.state_dict().items() if v.is_floating_point()}
    fingerprint = base_fingerprint(state)
    skills = [random_skill(state, fingerprint, f"s{i}", seed=i, sparsity=args.sparsity) for i in range(args.skills)]
    params = sum(t.numel() for t in state.values())
    result: dict = {"model": args.model, "parameters": params, "sparsity": args.sparsity, "skills": args.skills}
    for label in args.rules.split(","):
        stitcher = Stitcher(live, rule="mean") if label == "mean" else SpectralStitcher(live, merge=label, scale=1.0)
        adds = []
        for skill in skills:
            start = time.perf_counter()
            stitcher.add(skill)
            adds.append(round(time.perf_counter() - start, 3))
        start = time.perf_counter()
        stitcher.remove(skills[-1].name)
        removed = round(time.perf_counter() - start, 3)
        for skill in skills[:-1]:
            stitcher.remove(skill.name)
        result[label] = {"add seconds, one per arrival": adds, "remove the last": removed}
        print(f"{label:<8} adds {adds} s, remove {removed} s", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
