"""MaskLearner under ModelParallelStrategy (FSDP2) on 2 CPU processes: the flat learner's mask, from shards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import BertForSequenceClassification, BertModel

from helpers import DDP_TIMEOUT
from helpers.models import finetune_like, learned, make_skill, tiny_config
from skillbank import MaskLearner, SkillBank, SkillbankError, localize_dataless, task_vector
from skillbank.localization.sharded_scores import kth_largest, shard_scores
from skillbank.sparse import topk_positions

TESTS = Path(__file__).parent
SCRIPT = str(TESTS / "mask_fsdp_run.py")


def entries(skill) -> set[tuple[str, int]]:
    return {(name, int(i)) for name, region in skill.regions.items() for i in region.indices}


def prepared(tmp_path: Path, *names: str) -> list[str]:
    """Banks (not yet made) beside one shared quick finetune of the demo sentiment task."""
    first = str(tmp_path / names[0])
    subprocess.run([sys.executable, str(TESTS / "mask_ddp_run.py"), "prepare", first], check=True, cwd=TESTS, capture_output=True)
    for name in names[1:]:
        shutil.copytree(first + ".finetuned", str(tmp_path / name) + ".finetuned")
    return [str(tmp_path / name) for name in names]


def run(devices: int, bank: str, mode: str, epochs: int, resume: str | None = None, accelerator: str = "cpu") -> dict:
    args = [sys.executable, SCRIPT, str(devices), bank, mode, str(epochs), *([resume] if resume else [])]
    env = {**os.environ, "FSDP_ACCELERATOR": accelerator}
    done = subprocess.run(args, cwd=TESTS, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(Path(bank + ".json").read_text())


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.timeout(DDP_TIMEOUT)
@pytest.mark.parametrize("mode", ["full", "pool"])
def test_two_sharded_processes_learn_the_flat_learners_mask(tmp_path, mode):
    one, two = prepared(tmp_path, "one", "two")
    flat, sharded = run(1, one, mode, 30), run(2, two, mode, 30)
    bank = SkillBank(two)
    assert bank.names() == ["sentiment"] and bank.verify() == {"sentiment": "ok"}  # gathered, written once
    a, b = SkillBank(one).get("sentiment"), bank.get("sentiment")
    assert entries(a) == entries(b)
    for name, region in a.regions.items():
        assert torch.equal(region.values, b.regions[name].values), name  # τ read from each rank's shard
    torch.testing.assert_close(torch.load(two + ".scores.pt"), torch.load(one + ".scores.pt"), atol=1e-4, rtol=0)
    # each rank keeps half of τ, the scores and Adam's moments (a pool: its positions within each tensor, not two copies)
    assert sharded["state_nbytes"] <= 0.51 * flat["state_nbytes"], (sharded, flat)
    # the mask moved away from where it started, so agreeing is not trivial
    torch.manual_seed(0)
    start = localize_dataless(
        task_vector(BertModel(tiny_config()), BertForSequenceClassification.from_pretrained(one + ".finetuned")),
        0.05,
        name="start",
    )
    assert len(entries(a) - entries(start)) >= 10


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.timeout(DDP_TIMEOUT)
def test_a_run_resumed_from_its_sharded_checkpoint_keeps_the_best_mask(tmp_path):
    first, resumed = prepared(tmp_path, "first", "resumed")
    before = run(2, first, "best", 6)  # validation peaks at epoch 2 (a scripted metric), a checkpoint each epoch
    checkpoint = Path(first + ".ckpt") / "last.ckpt"
    assert checkpoint.is_dir() and len(list(checkpoint.glob("*.distcp"))) == 2  # one shard file per rank
    after = run(2, resumed, "best", 12, resume=str(checkpoint))  # six more epochs, none validating better
    assert before["selected_epoch"] == after["selected_epoch"] == 2
    assert entries(SkillBank(resumed).get("sentiment")) == entries(SkillBank(first).get("sentiment"))
    assert not after["last_equals_kept"]  # the scores moved on: the kept mask came from the checkpoint
    assert not torch.equal(torch.load(resumed + ".scores.pt"), torch.load(first + ".scores.pt"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.timeout(DDP_TIMEOUT)
def test_the_sharded_learner_on_a_gpu_learns_the_cpu_learners_mask(tmp_path):
    cpu, gpu = prepared(tmp_path, "cpu", "gpu")
    run(1, cpu, "pool", 30)
    run(1, gpu, "pool", 30, accelerator="gpu")  # ModelParallelStrategy on one GPU: NCCL counts, sharded state
    a, b = entries(SkillBank(cpu).get("sentiment")), entries(SkillBank(gpu).get("sentiment"))
    assert len(a & b) >= 0.97 * len(a)  # GPU arithmetic differs in the last bits: near-zero gradients may flip
    torch.testing.assert_close(torch.load(gpu + ".scores.pt").cpu(), torch.load(cpu + ".scores.pt"), atol=1e-3, rtol=0)


@pytest.mark.parametrize("seed", range(4))
def test_kth_largest_is_the_flat_top_ks_threshold_over_every_rank(seed):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(-3, 4, (300,), generator=generator).float() * 0.25  # many ties, zeros of both signs
    values[::7] = -0.0
    values[5] = -1e-40  # subnormal
    parts = list(torch.split(values, [0, 120, 1, 179]))  # ranks' parts, one empty
    for k in (1, 2, 57, 150, 299, 300):
        threshold = kth_largest(parts, k, lambda t: t)  # one process holding every part sums them as the ranks would
        expected = values[topk_positions(values, k)].min()
        assert threshold == float(expected), k


class FakeMesh:
    """What configure_model reads of a device mesh before it shards anything: its dimensions' names and sizes."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.mesh_dim_names = names

    def __getitem__(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(size=lambda: 2)


def test_sharded_learner_refuses_tensor_parallel_meshes_and_context(tmp_path):
    torch.manual_seed(0)
    base = BertModel(tiny_config()).eval()
    learner = MaskLearner(finetune_like(base, seed=1), base, spec=learned(0.05))
    learner._device_mesh = FakeMesh(("data_parallel", "tensor_parallel"))
    with pytest.raises(SkillbankError, match=r"data_parallel_size=<number of devices>, tensor_parallel_size=1"):
        learner.configure_model()
    in_context = MaskLearner(finetune_like(base, seed=1), base, spec=learned(0.05), context=[make_skill(base, "earlier", seed=3)])
    in_context._device_mesh = FakeMesh(("data_parallel",))
    with pytest.raises(SkillbankError, match="context= is not supported under ModelParallelStrategy"):
        in_context.configure_model()
    assert learner.shards is None and learner.scores.numel() == learner.num_eligible  # nothing was taken apart


def test_a_tied_parameter_is_refused_with_the_exclude_that_avoids_it():
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    model[1].weight = model[0].weight  # tied, as a language model's input and output embeddings are
    tau = torch.ones(15)
    with pytest.raises(SkillbankError, match=r"tied to \['1.weight'\].*exclude=\['embed'\]"):
        shard_scores(model, {"embed": "0.weight"}, [("embed", tau, tau.clone(), None)], lambda g: g.sum(), False)


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.timeout(DDP_TIMEOUT)
def test_a_causal_lm_with_tied_embeddings_is_sharded_once_they_are_excluded(tmp_path):
    script = str(TESTS / "causal_fsdp_run.py")

    def learn(devices: int, *exclude: str) -> subprocess.CompletedProcess:
        out = str(tmp_path / f"mask-{devices}-{len(exclude)}.pt")
        return subprocess.run([sys.executable, script, str(devices), out, *exclude], cwd=TESTS, capture_output=True, text=True)

    refused = learn(2)  # the tied embedding cannot be sharded as one scored tensor: said before any training
    assert refused.returncode != 0
    assert "'model.embed_tokens.weight' is tied to ['lm_head.weight']" in refused.stderr
    assert "exclude=['model.embed_tokens.weight']" in refused.stderr
    for devices in (1, 2):
        done = learn(devices, "embed_tokens")
        assert done.returncode == 0, done.stderr[-3000:]
    flat, sharded = torch.load(tmp_path / "mask-1-1.pt"), torch.load(tmp_path / "mask-2-1.pt")
    assert flat.keys() == sharded.keys() and "model.embed_tokens.weight" in flat
    assert all(torch.equal(flat[name], sharded[name]) for name in flat)  # next-token loss, buffers (rotary) and all
    assert len(flat["model.embed_tokens.weight"]) == 0 and sum(len(i) for i in flat.values()) > 0
