"""Switching one live model between skills at RoBERTa-base size, beside a dense reload and PEFT's LoRA hot-swap.

    python benchmarks/bench_switch.py [--device cuda] [--repeats 21] [--out switch.json]

A RoBERTa-base-sized model (about 125M parameters, random init from the default
``RobertaConfig``) and random skills at 1% and 10% (``--sparsities``; uniform per tensor, as in
``bench_stitch.py``). Measured in one run, median of ``--repeats``:

* **skill switch**: the live model holds skill A; ``Stitcher.switch([B])``
  rewrites the union of A's and B's masks (skills in memory, and read from the
  bank: one file read + parse per switch);
* **one-skill switch**: ``SingleSkillSwitcher`` (what ``skillbank serve`` uses) from A to
  B, prepared (two scatters a tensor), and by name from a bank of the skills coded in
  2 bits (read, decode, prepare, switch); and by name into banks of ``--bank-sizes``
  2-bit 1% skills (median and slowest); and prepared, between random skills of whole
  runs of ``--blocks`` entries (what ``localize_dataless(block=B)`` makes);
* **dense reload**: ``load_weights`` of a whole finetuned checkpoint read from
  a safetensors file (what serving a task with its own finetune costs);
* **PEFT hot-swap**: ``peft.utils.hotswap.hotswap_adapter`` of a LoRA adapter
  (every linear layer of the encoder, rank chosen so the adapter file is about
  the skill file's size) read from its folder; and ``set_adapter`` between two
  adapters already loaded.

Memory for N tasks served from one device (N = 6 and 100), from the measured
file sizes: base + N skills, N dense finetunes, base + N LoRA adapters.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from bench_stitch import make_base, random_skill, sync  # noqa: E402
from skillbank import Region, Skill, SkillBank, SkillMetadata, Stitcher, base_fingerprint  # noqa: E402
from skillbank.stitching.single_skill import SingleSkillSwitcher  # noqa: E402

LINEAR_MODULES = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def median_ms(fn: Callable[[], None], repeats: int, device: str) -> float:
    """Median wall time of ``fn`` in milliseconds (after one warm-up call)."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def lora_rank_for(model: torch.nn.Module, target_bytes: int) -> int:
    """The LoRA rank (float32, every encoder linear layer) whose adapter holds about ``target_bytes``."""
    per_rank = sum(
        m.in_features + m.out_features
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "encoder" in n and n.endswith(tuple(LINEAR_MODULES))
    )
    return max(1, round(target_bytes / (4 * per_rank)))


def bench(
    device: str,
    repeats: int,
    work: Path,
    sparsities: list[float],
    bank_sizes: list[int],
    blocks: list[int],
    prepared_only: bool = False,
) -> dict:
    model = make_base(device)
    base = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    fingerprint = base_fingerprint(base)
    dense = work / "finetuned.safetensors"
    save_file({k: (v + 1e-3 * torch.randn_like(v)).cpu().contiguous() for k, v in base.items()}, dense)
    dense_bytes = dense.stat().st_size
    out: dict = {
        "device": str(torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"),
        "parameters": sum(v.numel() for v in base.values()),
        "dense checkpoint bytes": dense_bytes,
        "dense reload ms": median_ms(
            lambda: model.load_state_dict(load_file(dense, device=device), strict=False), max(3, repeats // 4), device
        ),
    }
    model.load_state_dict(base, strict=False)
    print(f"dense reload of a {dense_bytes / 1e6:.0f} MB checkpoint: {out['dense reload ms']:.0f} ms", flush=True)
    for sparsity in sparsities:
        skills = [random_skill(base, fingerprint, f"s{i}", seed=i, sparsity=sparsity) for i in range(2)]
        if prepared_only:  # the one-skill path between prepared skills: entries, and runs
            row = {"one-skill switch ms (prepared)": bench_prepared(model, base, skills, repeats, device)[0]}
            row |= bench_runs(model, base, fingerprint, sparsity, blocks, repeats, device)
            out[f"{sparsity:g}"] = row
            cells = [f"{k.partition(', ')[2][:-1] or 'entries'} {v:.1f} ms" for k, v in row.items()]
            print(f"{sparsity:.0%} skills, prepared: " + ", ".join(cells), flush=True)
            continue
        bank = SkillBank(work / f"bank-{sparsity:g}")
        for skill in skills:
            bank.add(skill)
        skill_bytes = bank.entry("s0").bytes
        stitcher = Stitcher(model, base, bank=bank)
        state = {"at": 0}

        def flip(source: list) -> None:
            state["at"] ^= 1
            stitcher.switch([source[state["at"]]])

        stitcher.switch([skills[0]])
        in_memory = median_ms(lambda: flip(skills), repeats, device)
        from_bank = median_ms(lambda: flip(["s0", "s1"]), repeats, device)
        stitcher.switch([])
        one = bench_one_skill(model, base, skills, work / f"coded-{sparsity:g}", repeats, device)
        one |= bench_runs(model, base, fingerprint, sparsity, blocks, repeats, device)
        lora = bench_lora(model, skill_bytes, work / f"lora-{sparsity:g}", repeats, device)
        out[f"{sparsity:g}"] = {
            "skill bytes": skill_bytes,
            "switch ms (skills in memory)": in_memory,
            "switch ms (read from the bank)": from_bank,
            **one,
            **lora,
        }
        runs_text = "".join(f", runs of {b} {one[f'one-skill switch ms (prepared, runs of {b})']:.1f} ms" for b in blocks)
        print(
            f"{sparsity:.0%} skills ({skill_bytes / 1e6:.1f} MB): switch {in_memory:.1f} ms in memory, "
            f"{from_bank:.1f} ms from the bank; one-skill path {one['one-skill switch ms (prepared)']:.1f} ms prepared, "
            f"{one['one-skill switch ms (2bit, read from the bank)']:.1f} ms from a 2bit bank "
            f"({one['2bit skill bytes'] / 1e6:.2f} MB){runs_text}; LoRA r={lora['lora rank']} ({lora['lora bytes'] / 1e6:.1f} MB): "
            f"hot-swap {lora['peft hotswap ms']:.1f} ms, set_adapter {lora['peft set_adapter ms']:.2f} ms",
            flush=True,
        )
    if prepared_only:
        return out
    out["bank sizes"] = bench_bank_sizes(model, base, fingerprint, bank_sizes, work / "bank-sizes", device)
    out["memory bytes"] = {
        str(n): {
            "base + N skills (1%)": dense_bytes + n * out["0.01"]["skill bytes"],
            "N dense finetunes": n * dense_bytes,
            "base + N LoRA (1%-sized)": dense_bytes + n * out["0.01"]["lora bytes"],
        }
        for n in (6, 100)
    }
    return out


def random_run_skill(state: dict, fingerprint: str, name: str, seed: int, sparsity: float, block: int) -> Skill:
    """A random skill of whole runs ``[j·block, (j + 1)·block)``: ``ceil(k / block)`` runs a tensor drawn uniformly,
    ``k = ceil(sparsity · numel)`` (the last run of a tensor may be short)."""
    gen = torch.Generator().manual_seed(seed)
    regions = {}
    for pname, tensor in state.items():
        count = -(-tensor.numel() // block)
        chosen = torch.randperm(count, generator=gen)[: -(-math.ceil(sparsity * tensor.numel()) // block)].sort().values
        entries = (chosen.unsqueeze(1) * block + torch.arange(block)).reshape(-1)
        entries = entries[entries < tensor.numel()]
        regions[pname] = Region(entries, torch.randn(entries.numel(), generator=gen) * 1e-3)
    meta = SkillMetadata(name, fingerprint, sparsity, {k: list(v.shape) for k, v in state.items()})
    return Skill(meta, regions)


def bench_prepared(model: torch.nn.Module, base: dict, skills: list, repeats: int, device: str) -> tuple[float, int]:
    """Median ms of a ``SingleSkillSwitcher`` switch A -> B between the two prepared ``skills``, and the bytes one
    prepared skill holds; the base back after."""
    switcher = SingleSkillSwitcher(model, base)
    prepared = [switcher.prepare(s) for s in skills]
    state = {"at": 0}

    def flip() -> None:
        state["at"] ^= 1
        switcher.switch(prepared[state["at"]])

    fast = median_ms(flip, repeats, device)
    switcher.switch(None)  # the base back before another switcher is made on the model
    return fast, prepared[0].nbytes


def bench_runs(
    model: torch.nn.Module, base: dict, fingerprint: str, sparsity: float, blocks: list[int], repeats: int, device: str
) -> dict:
    """The prepared one-skill switch between two random skills of whole runs of each length of ``blocks``
    (what ``localize_dataless(block=B)`` makes): the switch writes runs."""
    out = {}
    for block in blocks:
        runs = [random_run_skill(base, fingerprint, f"r{i}", seed=i, sparsity=sparsity, block=block) for i in range(2)]
        out[f"one-skill switch ms (prepared, runs of {block})"] = bench_prepared(model, base, runs, repeats, device)[0]
    return out


def bench_one_skill(model: torch.nn.Module, base: dict, skills: list, folder: Path, repeats: int, device: str) -> dict:
    """The one-skill serving path (``SingleSkillSwitcher``): A -> B between prepared skills, and by name from a bank of
    the same skills coded in 2 bits (a read, a decode and a prepare each switch)."""
    fast, prepared_bytes = bench_prepared(model, base, skills, repeats, device)
    state = {"at": 0}
    bank = SkillBank(folder)
    for skill in skills:
        bank.add(replace(skill, metadata=replace(skill.metadata, value_dtype="2bit")))
    coded = SingleSkillSwitcher(model, base, bank=bank)

    def by_name() -> None:
        state["at"] ^= 1
        coded.switch(coded.prepare(skills[state["at"]].name))

    slow = median_ms(by_name, max(3, repeats // 3), device)
    coded.switch(None)
    return {
        "one-skill switch ms (prepared)": fast,
        "one-skill switch ms (2bit, read from the bank)": slow,
        "2bit skill bytes": bank.entry(skills[0].name).bytes,
        "prepared bytes": prepared_bytes,
    }


def bench_bank_sizes(model: torch.nn.Module, base: dict, fingerprint: str, sizes: list[int], folder: Path, device: str) -> dict:
    """One-skill switches by name into banks of 2bit 1% skills of growing size: median and slowest of 9 switches
    to skills drawn at random (each a manifest lookup, a read, a decode, a prepare and the switch)."""
    bank = SkillBank(folder)
    switcher = SingleSkillSwitcher(model, base, bank=bank)
    out = {}
    rng = random.Random(0)
    for size in sizes:
        for i in range(len(bank.names()), size):
            skill = random_skill(base, fingerprint, f"b{i}", seed=100 + i, sparsity=0.01)
            bank.add(replace(skill, metadata=replace(skill.metadata, value_dtype="2bit")))
        times = []
        for name in [rng.choice(bank.names()) for _ in range(10)]:
            start = time.perf_counter()
            switcher.switch(switcher.prepare(name))
            sync(device)
            times.append(1e3 * (time.perf_counter() - start))
        times = sorted(times[1:])  # the first warms up
        out[str(size)] = {"median ms": statistics.median(times), "slowest ms": times[-1]}
        print(
            f"bank of {size} 2bit skills: switch by name median {out[str(size)]['median ms']:.0f} ms, slowest {times[-1]:.0f} ms"
        )
    switcher.switch(None)
    return out


def bench_lora(model: torch.nn.Module, target_bytes: int, folder: Path, repeats: int, device: str) -> dict:
    """Hot-swap and set_adapter times of LoRA adapters about ``target_bytes`` large."""
    from peft import LoraConfig, get_peft_model
    from peft.utils.hotswap import hotswap_adapter

    rank = lora_rank_for(model, target_bytes)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LINEAR_MODULES, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    for i in range(2):
        torch.manual_seed(i)
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.data.normal_(0, 1e-3)
        peft_model.save_pretrained(folder / f"a{i}")
    size = sum(f.stat().st_size for f in (folder / "a0").glob("*.safetensors"))
    state = {"at": 0}

    def swap() -> None:
        state["at"] ^= 1
        hotswap_adapter(peft_model, str(folder / f"a{state['at']}"), adapter_name="default", torch_device=device)

    hot = median_ms(swap, repeats, device)
    peft_model.load_adapter(str(folder / "a1"), adapter_name="other")
    names = ["default", "other"]

    def select() -> None:
        state["at"] ^= 1
        peft_model.set_adapter(names[state["at"]])

    set_ms = median_ms(select, repeats, device)
    peft_model.unload()  # the plain model back, for the next size
    return {"lora rank": rank, "lora bytes": size, "peft hotswap ms": hot, "peft set_adapter ms": set_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=21, help="timed repeats per figure (median; default 21)")
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--sparsities", type=lambda t: [float(x) for x in t.split(",")], default=[0.01, 0.1])
    parser.add_argument(
        "--bank-sizes", type=lambda t: [int(x) for x in t.split(",")], default=[2, 10, 100], help="skills in the bank"
    )
    parser.add_argument(
        "--blocks",
        type=lambda t: [int(x) for x in t.split(",") if x],
        default=[16, 64, 256],
        help="also switch skills of whole runs of these lengths (localize_dataless(block=B)), prepared",
    )
    parser.add_argument(
        "--prepared-only",
        action="store_true",
        help="only the one-skill switch between prepared skills (entries and --blocks runs), e.g. at large sizes",
    )
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory(prefix="bench-switch-") as work:
        result = bench(args.device, args.repeats, Path(work), args.sparsities, args.bank_sizes, args.blocks, args.prepared_only)
    for n, row in result.get("memory bytes", {}).items():
        print(f"N = {n}: " + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in row.items()))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
