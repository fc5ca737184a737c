"""Peak memory and time of dataless localization, in memory against streaming, at RoBERTa-base size.

    python benchmarks/bench_stream.py [--sparsity 0.01] [--out stream.json]

A RoBERTa-base-sized base (about 125M parameters, random init) and a "finetune"
(the base plus seeded noise), both saved as Hugging Face folders (the finetune
sharded at 100 MB). Each way runs in its own child process, which reports its
peak resident memory above what the imports left (``VmHWM`` reset through
``/proc/self/clear_refs`` after importing; Linux) and its wall time, and saves the
skill; the two skills must be equal bit for bit.

* in memory: ``localize_dataless(task_vector(base, finetuned), s)`` — both models, τ and |τ|;
* streaming: ``localize_streaming(base, finetuned, s)`` — one tensor of each at a time
  and the running top-k (``skillbank localize`` takes this path for a fixed sparsity).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import RobertaConfig, RobertaModel

CHILD = """
import json, sys, time
from pathlib import Path
import torch
from skillbank import localize_dataless, task_vector
from skillbank.localization.streaming import localize_streaming

def status(key):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))
    return int(line.split()[1]) / 1024

way, base, finetuned, sparsity, out = sys.argv[1:]
Path("/proc/self/clear_refs").write_text("5")  # peak RSS (VmHWM) := RSS now, after the imports
before = status("VmRSS")
start = time.perf_counter()
if way == "in memory":
    skill = localize_dataless(task_vector(base, finetuned), float(sparsity), name="s")
else:
    skill = localize_streaming(base, finetuned, float(sparsity), name="s")
seconds = time.perf_counter() - start
peak = status("VmHWM")
skill.save(out)
print(json.dumps({"peak MB above the imports": peak - before, "seconds": seconds}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, default=0.01)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = RobertaModel(RobertaConfig(), add_pooling_layer=True).eval()
    results: dict = {"parameters": sum(p.numel() for p in model.parameters())}
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as work:
        base, finetuned = Path(work) / "base", Path(work) / "finetuned"
        model.save_pretrained(base)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-3 * torch.randn_like(p))
        model.save_pretrained(finetuned, max_shard_size="100MB")
        del model
        results["checkpoint MB"] = (base / "model.safetensors").stat().st_size / 2**20
        for way in ("in memory", "streaming"):
            done = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    CHILD,
                    way,
                    str(base),
                    str(finetuned),
                    str(args.sparsity),
                    str(Path(work) / f"{way}.safetensors"),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            results[way] = json.loads(done.stdout.strip().splitlines()[-1])
            print(
                f"{way}: peak {results[way]['peak MB above the imports']:.0f} MB above the imports, "
                f"{results[way]['seconds']:.1f} s",
                flush=True,
            )
        from skillbank import Skill

        a, b = (Skill.load(Path(work) / f"{way}.safetensors") for way in ("in memory", "streaming"))
        results["same skill"] = all(
            torch.equal(r.indices, b.regions[n].indices) and torch.equal(r.values, b.regions[n].values)
            for n, r in a.regions.items()
        ) and list(a.regions) == list(b.regions)
    print(f"checkpoint {results['checkpoint MB']:.0f} MB, same skill bit for bit: {results['same skill']}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
