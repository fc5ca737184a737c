"""LLM scale on one CPU machine: a ~1.1B-parameter Llama and 1% skills (issue 16).

    python benchmarks/bench_scale.py --work /tmp/scale [--skills 10] [--sparsity 0.01] [--out scale.json]

Builds once, and keeps in --work, a Llama with TinyLlama-1.1B's shape (hidden 2048,
22 layers, 32 heads and 4 KV heads, MLP 5632, vocabulary 32000, untied LM head;
random init, bfloat16, safetensors shards of at most 1 GB) and a "finetune" of it
(the base plus seeded noise on every entry, written shard by shard, so neither is
ever whole in memory here). Then, each step in its own child process, which
reports its wall time and its peak resident memory (``VmHWM``, reset after the
imports through ``/proc/self/clear_refs``; Linux):

1. ``skillbank localize`` of the finetune at --sparsity (the streaming path);
2. --skills minus one more skills with random masks (--sparsity of every tensor,
   uniform: the worst case for union growth) added to the bank, not timed;
3. ``Stitcher(model, bank=...)`` adding the skills one at a time onto the loaded base:
   the time of each add, the state's bytes and the covered entries;
4. ``skillbank stitch --out`` of all the skills.

--learner-layers L adds a step: candidate-pool mask learning (``LearnerSpec(pool=30)``,
next-token loss) on a model of this shape cut to L layers, a few steps on random
tokens: its peak memory, learner state and step time.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

SHAPE = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}
SHARD_BYTES = 1 << 30

MEASURE = """
import json, sys, time
from pathlib import Path

def status(key):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024

import torch, transformers, skillbank.integrations.cli, skillbank.stitching.stitcher, skillbank.localization.mask_learner  # the imports, not measured
Path("/proc/self/clear_refs").write_text("5")  # peak RSS (VmHWM) := RSS now
before = status("VmRSS")
start = time.perf_counter()
result = {}
exec(sys.argv[1])
result.update(seconds=time.perf_counter() - start, peak_bytes_above_imports=status("VmHWM") - before,
              peak_rss_bytes=status("VmHWM"))
print("RESULT " + json.dumps(result))
"""

STITCH = """
from skillbank import SkillBank, Stitcher
from skillbank.vectors.models import load_base_model
base, bank = sys.argv[2], SkillBank(sys.argv[3])
model = load_base_model(base)
result["model_dtype"] = str(next(model.parameters()).dtype)
result["model_bytes"] = sum(t.numel() * t.element_size() for t in model.state_dict().values())
result["numel"] = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
stitcher = Stitcher(model, bank=bank)
result["adds"] = []
for name in bank.names():
    t = time.perf_counter()
    stitcher.add(name)
    result["adds"].append({"seconds": time.perf_counter() - t, "covered": stitcher.covered,
                           "state_bytes": stitcher.state_nbytes})
"""

LEARN = """
from skillbank.localization.mask_learner import MaskLearner
base, finetuned, steps = sys.argv[2], sys.argv[3], int(sys.argv[4])
learner = MaskLearner(finetuned, base, finetuned, {"sparsity": 0.01, "learner": {"pool": 30}})
result["setup_seconds"] = time.perf_counter() - start
result["pool_entries"] = learner.scores.numel()
result["eligible_entries"] = learner.num_eligible
optimizer = learner.configure_optimizers()
gen = torch.Generator().manual_seed(0)
times = []
for i in range(steps):
    batch = {"input_ids": torch.randint(0, 32000, (2, 64), generator=gen), "attention_mask": torch.ones(2, 64, dtype=torch.long)}
    learner.train()
    t = time.perf_counter()
    learner._step(batch, 0, 1, optimizer, lambda loss: loss.backward())
    times.append(time.perf_counter() - t)
result["step_seconds"] = times
result["learner_state_bytes"] = learner.state_nbytes
"""


def measure(code: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", MEASURE, code, *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])


def write_model(folder: Path, layers: int, make: Callable[[str, torch.Size, int], torch.Tensor]) -> None:
    """A Llama folder of this shape with ``layers`` layers, each tensor from ``make(name, shape, index)``, sharded."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**(SHAPE | {"num_hidden_layers": layers}), torch_dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config.save_pretrained(tmp)
    nbytes = {name: math.prod(shape) * 2 for name, shape in shapes.items()}  # bfloat16
    shards: list[list[str]] = [[]]  # names, in order, cut at SHARD_BYTES
    size = 0
    for name in shapes:
        if shards[-1] and size + nbytes[name] > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes[name]
    seed = {name: i for i, name in enumerate(shapes)}
    weight_map = {}
    for j, names in enumerate(shards, 1):
        file = f"model-{j:05d}-of-{len(shards):05d}.safetensors"  # as save_pretrained names them
        save_file(
            {name: make(name, shapes[name], seed[name]).contiguous() for name in names},
            str(tmp / file),
            metadata={"format": "pt"},
        )
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index))
    tmp.rename(folder)


def base_tensor(name: str, shape: torch.Size, index: int) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=torch.Generator().manual_seed(index)) * 0.02).to(torch.bfloat16)


def finetune_of(base: Path) -> Callable[[str, torch.Size, int], torch.Tensor]:
    """Each base tensor plus N(0, 0.002) noise (about a tenth of the weights' spread: every entry moves)."""
    from safetensors import safe_open

    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]

    def make(name: str, shape: torch.Size, i: int) -> torch.Tensor:
        with safe_open(str(base / index[name]), "pt") as f:
            tensor = f.get_tensor(name)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(10_000 + i)) * 0.002
        return (tensor.float() + noise).to(torch.bfloat16)

    return make


def random_skills(bank_path: Path, count: int, sparsity: float) -> None:
    """``count`` skills with uniform random masks of ``sparsity`` of every tensor, made like the bank's first skill."""
    from dataclasses import replace

    from skillbank import Region, Skill, SkillBank

    bank = SkillBank(bank_path)
    first = bank.get(bank.names()[0])
    for j in range(count):
        gen = torch.Generator().manual_seed(j)
        regions = {}
        for pname, shape in first.metadata.shapes.items():
            numel = math.prod(shape)
            k = math.ceil(sparsity * numel)
            idx = torch.randperm(numel, generator=gen)[:k].sort().values
            regions[pname] = Region(idx, torch.randn(k, generator=gen) * 1e-3)
        bank.add(Skill(replace(first.metadata, name=f"random{j}", method="random mask", metrics={}), regions))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="a folder for the models and the bank (kept between runs)")
    parser.add_argument("--skills", type=int, default=10)
    parser.add_argument("--sparsity", type=float, default=0.01)
    parser.add_argument("--learner-layers", type=int, default=0, help="also learn a pooled mask on a model this deep")
    parser.add_argument("--learner-steps", type=int, default=4)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    work = Path(args.work)
    base, finetuned, bank = work / "base", work / "finetuned", work / "bank"
    results: dict = {"shape": SHAPE}
    if not base.exists():
        write_model(base, SHAPE["num_hidden_layers"], base_tensor)
    if not finetuned.exists():
        write_model(finetuned, SHAPE["num_hidden_layers"], finetune_of(base))
    results["checkpoint_bytes"] = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    shutil.rmtree(bank, ignore_errors=True)
    results["localize"] = measure(
        "skillbank.integrations.cli.main(sys.argv[2:])",
        "localize",
        "--base",
        str(base),
        "--finetuned",
        str(finetuned),
        "--bank",
        str(bank),
        "--name",
        "real",
        "--sparsity",
        str(args.sparsity),
    )
    print("localize", results["localize"], flush=True)
    random_skills(bank, args.skills - 1, args.sparsity)
    results["stitch"] = measure(STITCH, str(base), str(bank))
    print("stitch", {k: v for k, v in results["stitch"].items() if k != "adds"}, flush=True)
    for i, add in enumerate(results["stitch"]["adds"]):
        print(
            f"  add {i + 1}: {add['seconds']:.2f} s, covered {add['covered']:,}, state {add['state_bytes'] / 2**20:,.0f} MiB "
            f"({add['state_bytes'] / add['covered']:.1f} B per covered entry)",
            flush=True,
        )
    out = work / "stitched"
    shutil.rmtree(out, ignore_errors=True)
    results["stitch_out"] = measure(
        "skillbank.integrations.cli.main(sys.argv[2:])", "stitch", "--base", str(base), "--bank", str(bank), "--out", str(out)
    )
    print("stitch --out", results["stitch_out"], flush=True)
    shutil.rmtree(out, ignore_errors=True)
    if args.learner_layers:
        small = {name: work / f"{name}-{args.learner_layers}layers" for name in ("base", "finetuned")}
        if not small["base"].exists():
            write_model(small["base"], args.learner_layers, base_tensor)
        if not small["finetuned"].exists():
            write_model(small["finetuned"], args.learner_layers, finetune_of(small["base"]))
        results["learner"] = measure(LEARN, str(small["base"]), str(small["finetuned"]), str(args.learner_steps))
        results["learner"]["layers"] = args.learner_layers
        print("learner", results["learner"], flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
