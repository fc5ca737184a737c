"""Stitching at RoBERTa-base size: incremental add time vs skills stitched, dense re-merge, file size, memory.

    python benchmarks/bench_stitch.py [--device cuda] [--skills 100] [--out results.json]

A RoBERTa-base-sized model (about 125M parameters, random init from the default
``RobertaConfig``) and 1% skills with random masks (a uniform 1% per tensor: the
worst case for union growth, since real skills overlap more). Measures:

* the time of ``Stitcher.add`` for the n-th skill, n = 1 … ``--skills``, from a ``Skill`` in memory, and from
  one laid out on the device beforehand (``Stitcher.prepare``, not timed) with the one-launch gather/scatter
  (CUDA + Triton: :mod:`skillbank.stitching.multi_tensor`) and with the per-tensor loop (first 20 skills);
* a dense re-merge of 8 skills as the paper's released ``Stitcher`` does it (dense
  masks averaged by pairwise intersections, then ``θ += γ'_i ⊙ (θ_ft − θ_pre)`` over
  dense finetuned weights), and a leaner one-pass dense merge; the dense masks and
  finetuned weights are built beforehand and not timed;
* skill file bytes (float32 and bfloat16 values) over the dense float32 checkpoint;
* peak memory of stitching 8 skills from a bank (a child process; RSS on CPU,
  ``max_memory_allocated`` on CUDA).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import RobertaConfig, RobertaModel

from skillbank import Region, Skill, SkillBank, SkillMetadata, Stitcher, base_fingerprint
from skillbank.stitching import multi_tensor


def make_base(device: str) -> RobertaModel:
    torch.manual_seed(0)
    return RobertaModel(RobertaConfig(), add_pooling_layer=True).eval().to(device)


def random_skill(state: dict, fingerprint: str, name: str, seed: int, sparsity: float = 0.01) -> Skill:
    gen = torch.Generator().manual_seed(seed)
    regions = {}
    for pname, tensor in state.items():
        k = math.ceil(sparsity * tensor.numel())
        drawn = torch.unique(torch.randint(0, tensor.numel(), (k + k // 10 + 16,), generator=gen))
        if drawn.numel() < k:
            drawn = torch.randperm(tensor.numel(), generator=gen)[:k]
        idx = drawn[torch.randperm(drawn.numel(), generator=gen)[:k]].sort().values
        regions[pname] = Region(idx, torch.randn(k, generator=gen) * 1e-3)
    meta = SkillMetadata(name, fingerprint, sparsity, {k: list(v.shape) for k, v in state.items()})
    return Skill(meta, regions)


def warm_up_kernels(device: str) -> None:
    """Compile the one-launch kernels for float32 before timing (Triton specializes on a count divisible by 16)."""
    tensors = [torch.zeros(64, device=device), torch.zeros(64, device=device)]
    table = multi_tensor.AddressTable(tensors, [0, 64]).current(torch.device(device), 4)
    for n in (16, 17):
        ids = torch.zeros(n, dtype=torch.int32, device=device)
        positions = torch.arange(n, device=device)
        multi_tensor.scatter(table, ids, positions, torch.ones(n, device=device))
        multi_tensor.gather(table, ids, positions, positions, torch.float32)
    sync(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def paper_remerge(base: dict, masks: list[dict], finetuned: list[dict]) -> dict:
    """The paper's released ``Stitcher``: per-task averaged masks from pairwise dense intersections,
    then ``θ += γ'_i ⊙ (θ_ft(i) − θ_pre)`` over dense finetuned weights (its name-lookup loops left out)."""
    averaged = []
    for i, mask in enumerate(masks):
        counts = {}
        for name, m in mask.items():
            c = m.float()
            for j, other in enumerate(masks):
                if j != i:
                    c += torch.logical_and(m, other[name])
            counts[name] = torch.reciprocal(c).masked_fill(c == 0, 0)
        averaged.append(counts)
    out = {name: theta.clone() for name, theta in base.items()}
    for ft, avg in zip(finetuned, averaged):
        for name, theta in out.items():
            theta += avg[name] * (ft[name] - base[name])
    return out


def linear_remerge(base: dict, masks: list[dict], finetuned: list[dict]) -> dict:
    """A leaner dense re-merge: one pass, ``θ_pre + Σ m_i τ_i / Σ m_i``."""
    out = {}
    for name, theta in base.items():
        count = sum(m[name].float() for m in masks)
        merged = sum(m[name] * (ft[name] - theta) for m, ft in zip(masks, finetuned))
        out[name] = theta + torch.nan_to_num(merged / count)
    return out


def timed_adds(stitcher: Stitcher, skills: Iterable[Skill], device: str, params: int) -> list[float]:
    """Seconds of each ``stitcher.add``, one skill after another; the base is fingerprinted before the first, untimed."""
    seconds = []
    for i, skill in enumerate(skills):
        if i == 0:
            stitcher._check_base(skill, stitcher._match(skill))  # one-time base fingerprinting, not an add cost
        sync(device)
        start = time.perf_counter()
        stitcher.add(skill)
        sync(device)
        seconds.append(time.perf_counter() - start)
        print(f"add #{i + 1}: {seconds[-1] * 1e3:.1f} ms, covered {stitcher.covered / params:.2%}", file=sys.stderr)
    return seconds


def bench_add_and_dense(device: str, n_skills: int, n_dense: int) -> dict:
    model = make_base(device)
    state = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    cpu_state = {k: v.detach().cpu() for k, v in state.items()}
    params = sum(v.numel() for v in state.values())
    fingerprint = base_fingerprint(cpu_state)
    skills = [random_skill(cpu_state, fingerprint, f"s{i}", seed=i) for i in range(n_skills)]
    sizes = {"fp32": len(skills[0].to_bytes())}
    skills[0].metadata.value_dtype = "bfloat16"
    sizes["bf16"] = len(skills[0].to_bytes())
    skills[0].metadata.value_dtype = "float32"
    stitcher = Stitcher(model)
    add_s = timed_adds(stitcher, skills, device, params)
    state_bytes = stitcher.state_nbytes
    del stitcher
    prepared_ms: dict[str, list[float]] = {}
    if multi_tensor.enabled([state[next(iter(state))]]):
        warm_up_kernels(device)
    for label, one_launch in (("one_launch", "1"), ("per_tensor", "0")):
        # skills laid out on the device beforehand (Stitcher.prepare, not timed): the add alone
        os.environ["SKILLBANK_MULTI_TENSOR"] = one_launch
        fresh = make_base(device)
        stitcher = Stitcher(fresh)
        stitcher._check_base(skills[0], stitcher._match(skills[0]))
        times = []
        try:
            for skill in skills if one_launch == "1" else skills[:20]:
                ready = stitcher.prepare(skill)
                sync(device)
                start = time.perf_counter()
                stitcher.add(ready)
                sync(device)
                times.append((time.perf_counter() - start) * 1e3)
                del ready
        except Exception as exc:  # noqa: BLE001 - recorded, so the other figures still come back
            print(f"prepared adds ({label}) failed: {exc!r}", file=sys.stderr)
            times = times or [float("nan")]
        prepared_ms[label] = times
        print(f"prepared adds ({label}): median {statistics.median(times):.2f} ms, max {max(times):.2f} ms", file=sys.stderr)
        del stitcher, fresh
    os.environ.pop("SKILLBANK_MULTI_TENSOR")
    dense_inputs = ([], [])
    for skill in skills[:n_dense]:
        masks, taus = {}, {}
        for pname, region in skill.regions.items():
            mask = torch.zeros(state[pname].numel(), dtype=torch.bool, device=device)
            mask[region.indices.to(device)] = True
            tau = torch.zeros(state[pname].numel(), device=device)
            tau[region.indices.to(device)] = region.values.to(device)
            masks[pname], taus[pname] = mask.view_as(state[pname]), state[pname].detach() + tau.view_as(state[pname])
        dense_inputs[0].append(masks)
        dense_inputs[1].append(taus)
    del skills
    base_clone = {k: v.detach().clone() for k, v in state.items()}
    dense_s = {}
    for label, merge in (("paper", paper_remerge), ("linear", linear_remerge)):
        times = []
        for _ in range(2):
            sync(device)
            start = time.perf_counter()
            merge(base_clone, *dense_inputs)
            sync(device)
            times.append(time.perf_counter() - start)
        dense_s[label] = min(times)
    return {
        "params": params,
        "add_ms": [t * 1e3 for t in add_s],
        "prepared_add_ms": prepared_ms,
        "paper_remerge_8_ms": dense_s["paper"] * 1e3,
        "linear_remerge_8_ms": dense_s["linear"] * 1e3,
        "skill_bytes_fp32": sizes["fp32"],
        "skill_bytes_bf16": sizes["bf16"],
        "dense_checkpoint_bytes": params * 4,
        "dense_inputs": "8 dense finetuned states and masks, built beforehand, not timed",
        "state_bytes_after": state_bytes,
    }


def bench_memory(device: str, bank_dir: str) -> dict:
    """Child process: peak memory of stitching the bank's 8 skills onto the base, one skill in memory at a time."""
    model = make_base(device)
    bank = SkillBank(bank_dir)
    stitcher = Stitcher(model, bank=bank)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _status_bytes("VmRSS")
    for name in bank.names():
        stitcher.add(name)
    sync(device)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_bytes("VmHWM")  # this address space's peak RSS (ru_maxrss would carry the parent's across exec)
    model_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    return {"model_bytes": model_bytes, "before_bytes": before, "peak_bytes": peak, "state_bytes": stitcher.state_nbytes}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skills", type=int, default=100)
    parser.add_argument("--dense-skills", type=int, default=8)
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(bench_memory(args.device, args.memory_child)))
        return
    result = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    result.update(bench_add_and_dense(args.device, args.skills, args.dense_skills))
    with tempfile.TemporaryDirectory() as tmp:
        model = make_base("cpu")
        state = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
        fingerprint = base_fingerprint(state)
        bank = SkillBank(Path(tmp) / "bank")
        for i in range(8):
            bank.add(random_skill(state, fingerprint, f"s{i}", seed=i))
        del model, state
        child = subprocess.run(
            [sys.executable, __file__, "--device", args.device, "--memory-child", str(bank.path)],
            capture_output=True,
            text=True,
            check=True,
        )
        result["memory_8"] = json.loads(child.stdout.strip().splitlines()[-1])
    add = result["add_ms"]
    summary = {
        "add_ms_first_8_median": statistics.median(add[:8]),
        "add_ms_last_8_median": statistics.median(add[-8:]),
        "add_ms_max": max(add),
        "paper_remerge_8_ms": result["paper_remerge_8_ms"],
        "linear_remerge_8_ms": result["linear_remerge_8_ms"],
        "speedup_vs_paper_first_8": result["paper_remerge_8_ms"] / statistics.median(add[:8]),
        "speedup_vs_paper_last_8": result["paper_remerge_8_ms"] / statistics.median(add[-8:]),
        "speedup_vs_linear_last_8": result["linear_remerge_8_ms"] / statistics.median(add[-8:]),
        "prepared_add_ms_median": {k: statistics.median(v) for k, v in result["prepared_add_ms"].items()},
        "prepared_add_ms_max": {k: max(v) for k, v in result["prepared_add_ms"].items()},
        "prepared_add_ms_first_8_vs_last_8": [
            statistics.median(result["prepared_add_ms"]["one_launch"][:8]),
            statistics.median(result["prepared_add_ms"]["one_launch"][-8:]),
        ],
        "speedup_prepared_vs_linear": result["linear_remerge_8_ms"] / statistics.median(result["prepared_add_ms"]["one_launch"]),
        "file_ratio_fp32": result["skill_bytes_fp32"] / result["dense_checkpoint_bytes"],
        "file_ratio_bf16": result["skill_bytes_bf16"] / result["dense_checkpoint_bytes"],
    }
    result["summary"] = summary
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
