"""The core on a CUDA GPU: mixed-device inputs, localization, MaskLearner under a GPU Trainer, stitching in
fp32/bf16/fp16 (``pytest -m cuda``; skipped where no GPU is present, so in CI)."""

from __future__ import annotations

import copy
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from helpers.models import finetune_like, learned, live_copy, make_skill, reference_stitch
from skillbank import MaskLearner, SkillBank, Stitcher, StitchError, localize_dataless, task_vector
from skillbank.comparison.baselines import magmax, opcm, task_arithmetic, ties
from skillbank.stitching.stitch_out import stitch_to_folder
from skillbank.testbed.synthetic import DEMO_TASKS, TokenDataset
from skillbank.vectors.models import apply_delta

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def loader(n: int = 64, seed: int = 0) -> DataLoader:
    ids, labels = DEMO_TASKS[0].sample(n, torch.Generator().manual_seed(seed))
    return DataLoader(TokenDataset(ids, labels), batch_size=16)


def gpu_trainer(**overrides) -> pl.Trainer:
    settings = dict(
        accelerator="gpu",
        devices=1,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    settings.update(overrides)
    warnings.filterwarnings("ignore", ".*(num_workers|does not have many workers).*")
    return pl.Trainer(**settings)


def same_skill(a, b) -> None:
    assert a.metadata.base_fingerprint == b.metadata.base_fingerprint
    for name, region in a.regions.items():
        assert torch.equal(region.indices, b.regions[name].indices), name
        assert torch.equal(region.values, b.regions[name].values), name


@pytest.mark.parametrize("where", ["base on gpu", "finetuned on gpu", "both on gpu"])
def test_task_vectors_from_mixed_devices_equal_the_cpu_ones_and_live_with_the_finetune(base_model, tmp_path, where):
    finetuned = finetune_like(base_model, seed=1)
    finetuned.save_pretrained(tmp_path / "ft")
    expected = task_vector(base_model, finetuned)
    base = copy.deepcopy(base_model).cuda() if where != "finetuned on gpu" else base_model
    ft = copy.deepcopy(finetuned).cuda() if where != "base on gpu" else tmp_path / "ft"
    tv = task_vector(base, ft)
    device = "cpu" if where == "base on gpu" else "cuda"
    assert {t.device.type for t in [*tv.shared.values(), *tv.head.values()]} == {device}
    assert tv.base_fingerprint == expected.base_fingerprint
    for name, tau in expected.shared.items():
        torch.testing.assert_close(tv.shared[name].cpu(), tau, rtol=0, atol=1e-7)
    assert task_vector(base, ft, device="cuda").shared[name].is_cuda  # device= overrides
    same_skill(localize_dataless(tv, 0.05, name="s"), localize_dataless(expected, 0.05, name="s"))


def test_dataless_skills_from_gpu_task_vectors_are_the_cpu_skills_and_live_on_the_cpu(base_model):
    finetuned = finetune_like(base_model, seed=2)
    on_gpu = localize_dataless(task_vector(base_model, finetuned, device="cuda"), 0.01, name="s")
    same_skill(on_gpu, localize_dataless(task_vector(base_model, finetuned), 0.01, name="s"))
    assert all(r.indices.device.type == "cpu" and r.values.device.type == "cpu" for r in on_gpu.regions.values())


def test_merging_baselines_take_task_vectors_on_any_device(base_model):
    taus = [task_vector(base_model, finetune_like(base_model, seed=s)).shared for s in (1, 2, 3)]
    mixed = [{k: v.cuda() for k, v in taus[0].items()}, taus[1], {k: v.cuda() for k, v in taus[2].items()}]
    for merge in (task_arithmetic, ties, magmax, opcm):
        on_cpu, on_gpu = merge(taus), merge(mixed)
        for name, value in on_cpu.items():
            assert on_gpu[name].is_cuda  # the first task vector's device
            torch.testing.assert_close(on_gpu[name].cpu(), value, rtol=1e-5, atol=1e-6)
    model = apply_delta(live_copy(base_model).cuda(), base_model.state_dict(), task_arithmetic(mixed))
    assert next(model.parameters()).is_cuda


class _Seen(pl.Callback):
    """What the scores were during training (a Trainer moves the module back to the CPU when fit ends)."""

    def __init__(self) -> None:
        self.scores: tuple[str, torch.dtype] | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.scores = (pl_module.scores.device.type, pl_module.scores.dtype)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_mask_learner_trains_on_a_gpu_trainer_with_inputs_on_any_device(base_model, tmp_path, precision):
    finetuned = finetune_like(base_model, seed=3, scale=0.05)
    finetuned.save_pretrained(tmp_path / "ft")
    base_on_gpu = copy.deepcopy(base_model).cuda()
    learner = MaskLearner(str(tmp_path / "ft"), base_on_gpu, spec=learned(0.05), num_labels=2)  # model read onto the CPU
    seen = _Seen()
    gpu_trainer(precision=precision, callbacks=[seen]).fit(learner, loader(), loader(seed=1))
    assert seen.scores == ("cuda", torch.float32)  # trained on the GPU; the scores stay fp32 under mixed precision
    skill = learner.skill
    assert skill is not None and skill.num_entries == learner.k
    assert all(r.indices.device.type == "cpu" for r in skill.regions.values())
    # the same skill stitched on the GPU: valid and exact
    Stitcher(live_copy(base_model).cuda(), base_model).add(skill)
    Stitcher(live_copy(base_model), base_on_gpu).add(skill)  # a CPU model checked against a base on the GPU


def test_mask_learner_learns_without_a_trainer_on_the_gpu_and_in_context(base_model):
    context = [make_skill(base_model, "a", seed=7, sparsity=0.05)]
    finetuned = finetune_like(base_model, seed=4, scale=0.05)
    learner = MaskLearner(copy.deepcopy(finetuned).cuda(), base_model, spec=learned(0.05), context=context)
    assert learner.tau.is_cuda and learner.context_acc.is_cuda
    skill = learner.learn(loader(), epochs=1, name="b")
    assert skill.num_entries == learner.k and skill.metadata.settings["context"] == ["a"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_stitching_on_the_gpu_matches_the_formula_and_restores_the_base_bitwise(base_model, dtype):
    base = copy.deepcopy(base_model).to(dtype)
    skills = [make_skill(base, f"t{i}", seed=i, sparsity=0.1) for i in range(4)]
    model = live_copy(base).cuda().to(dtype)
    start = {k: v.clone() for k, v in model.bert.state_dict().items() if v.is_floating_point()}
    stitcher = Stitcher(model, base)
    prepared = stitcher.prepare(skills[3])
    for skill in skills[:3]:
        stitcher.add(skill)
    stitcher.add(prepared)
    stitcher.remove("t1")
    expected = reference_stitch({k: v.float() for k, v in base.state_dict().items()}, [s for s in skills if s.name != "t1"])
    for name, value in model.bert.state_dict().items():
        if value.is_floating_point():
            assert value.is_cuda
            assert torch.equal(value.cpu(), expected[name].to(dtype)), name
    stitcher.switch([])
    for name, value in model.bert.state_dict().items():
        if value.is_floating_point():
            assert torch.equal(value, start[name]), name


def test_a_merged_value_that_overflows_fp16_is_refused_and_nothing_changes(base_model):
    base = copy.deepcopy(base_model).half()
    skill = make_skill(base, "big", seed=1, sparsity=0.05)
    name = next(n for n, r in skill.regions.items() if len(r))
    skill.regions[name].values[0] = 1e6  # beyond fp16's 65504
    model = live_copy(base).cuda().half()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(StitchError, match="overflow"):
        Stitcher(model, base).add(skill)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_bank_of_gpu_made_skills_exports_to_a_folder(base_model, tmp_path):
    base_model.save_pretrained(tmp_path / "base")
    bank = SkillBank(tmp_path / "bank")
    bank.add(localize_dataless(task_vector(base_model, finetune_like(base_model, seed=5).cuda()), 0.05, name="g"))
    out = stitch_to_folder(tmp_path / "base", bank, ["g"], tmp_path / "out")
    assert (out / "model.safetensors").is_file()
