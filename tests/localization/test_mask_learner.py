"""MaskLearner: the masked forward, the recipes' updates, learned vs dataless, DDP, bad input."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from transformers import BertForSequenceClassification, BertModel

from helpers import DDP_TIMEOUT
from helpers.models import finetune_like, learned, live_copy, make_skill, tiny_config
from skillbank import (
    LearnerSpec,
    LocalizationSpec,
    MaskLearner,
    SkillBank,
    SkillbankError,
    SkillNameError,
    Stitcher,
    TaskVectorError,
    localize_dataless,
    task_vector,
)
from skillbank.localization.fewshot import balanced_indices
from skillbank.localization.mask_recipes import resolve_recipe
from skillbank.stitching.heads import accuracy
from skillbank.testbed.demo import demo_classifier, finetune_demo_task, pretrained_base, quiet
from skillbank.testbed.synthetic import DEMO_TASKS, TokenDataset, make_splits

TESTS = Path(__file__).parent


def trainer(**overrides) -> pl.Trainer:
    settings = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    settings.update(overrides)
    warnings.filterwarnings("ignore", ".*(num_workers|eval mode|LeafSpec|does not have many workers).*")
    return pl.Trainer(**settings)


def token_loader(n: int = 64, batch_size: int = 16, seed: int = 0) -> DataLoader:
    ids, labels = DEMO_TASKS[0].sample(n, torch.Generator().manual_seed(seed))
    return DataLoader(TokenDataset(ids, labels), batch_size=batch_size)


def entries(skill) -> set[tuple[str, int]]:
    return {(name, i) for name, region in skill.regions.items() for i in region.indices.tolist()}


def test_masked_forward_spans_base_to_finetuned(base_model):
    finetuned = finetune_like(base_model, seed=3, scale=0.05)
    learner = MaskLearner(copy.deepcopy(finetuned), base_model, spec=learned(0.1))
    batch = next(iter(token_loader()))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    _, full, _ = learner(batch, gate=torch.ones_like(learner.tau))
    _, none, _ = learner(batch, gate=torch.zeros_like(learner.tau))
    base_with_head = live_copy(base_model)
    base_with_head.classifier.load_state_dict(finetuned.classifier.state_dict())
    torch.testing.assert_close(full, finetuned(**inputs).logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(none, base_with_head(**inputs).logits, atol=1e-5, rtol=1e-5)
    # the model now holds θ_pre, not a second copy of the finetune
    torch.testing.assert_close(learner.model.bert.state_dict(), base_model.state_dict())


def test_only_the_scores_train_and_start_at_the_dataless_mask(base_model):
    finetuned = finetune_like(base_model, seed=3)
    learner = MaskLearner(copy.deepcopy(finetuned), base_model, spec=learned(0.05))
    assert [n for n, p in learner.named_parameters() if p.requires_grad] == ["scores"]
    assert learner.configure_optimizers().param_groups[0]["params"] == [learner.scores]
    tv = task_vector(base_model, finetuned)
    assert learner.tau.numel() == learner.scores.numel() == tv.num_shared
    assert entries(learner.to_skill("init")) == entries(localize_dataless(tv, 0.05, name="d"))
    assert set(learner.scores.detach().unique().tolist()) == {-1.0, 1.0}


def test_exclude_keeps_parameters_out_of_the_scores(base_model):
    finetuned = finetune_like(base_model, seed=3)
    learner = MaskLearner(finetuned, base_model, spec=learned(0.05, exclude=["embeddings"]))
    tv = task_vector(base_model, finetune_like(base_model, seed=3))
    eligible = sum(t.numel() for n, t in tv.shared.items() if "embeddings" not in n)
    assert learner.scores.numel() == eligible
    skill = learner.to_skill("x")
    assert skill.num_shared == tv.num_shared  # the skill still describes every shared tensor
    assert all(r.indices.numel() == 0 for n, r in skill.regions.items() if "embeddings" in n)
    assert skill.num_entries == learner.k


def test_paper_recipe_takes_the_released_codes_full_batch_step(base_model):
    """One epoch = one step: S ← S − lr·mean_b ∂L_b/∂S + λ·sign(S)·σ'(S), as in Localizer.train_graft."""
    learner = MaskLearner(
        finetune_like(base_model, seed=3, scale=0.05), base_model, spec=learned(0.05, recipe="paper", lr=1e4, init_sparsity=0.05)
    )
    loader = token_loader(n=48, batch_size=16)
    start = learner.scores.detach().clone()
    grads = [torch.autograd.grad(learner(batch)[0], learner.scores)[0] for batch in loader]
    sig = torch.sigmoid(start)
    expected = start - 1e4 * torch.stack(grads).mean(0) + 10.0 * torch.sign(start) * sig * (1 - sig)
    trainer().fit(learner, loader)
    assert learner._updates == 1
    torch.testing.assert_close(learner.scores.detach(), expected, atol=1e-4, rtol=1e-4)
    assert not torch.equal(learner.scores.detach(), start)
    skill = learner.skill
    positive = int((learner.scores > 0).sum())
    assert skill.num_entries == positive  # round(σ(S)): size not controlled
    assert skill.metadata.sparsity == pytest.approx(positive / learner.tau.numel())
    assert skill.metadata.method == "learned" and skill.metadata.settings["binarize"] == "round"


def test_any_module_with_a_loss_function():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    finetuned = copy.deepcopy(base)
    x = torch.randn(96, 8)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    optimizer = torch.optim.SGD(finetuned.parameters(), lr=0.5)
    for _ in range(100):
        nn.functional.cross_entropy(finetuned(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    loader = DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    learner = MaskLearner(
        copy.deepcopy(finetuned), base.state_dict(), spec=learned(0.2), loss_fn=nn.CrossEntropyLoss(), num_labels=3
    )
    seen = []

    class Record(pl.Callback):
        def on_validation_epoch_end(self, trainer, module):  # noqa: ANN001
            if not trainer.sanity_checking:
                seen.append(float(module.val_acc.compute()))

    trainer(max_epochs=5, callbacks=[Record()]).fit(learner, loader, loader)
    assert learner.skill.num_entries == learner.k == 39  # ceil(0.2 · 195 entries)
    # keep_best: the mask of the (last) best validation epoch
    best = max(seen)
    assert learner.skill.metadata.metrics["val_acc"] == pytest.approx(best)
    assert learner.skill.metadata.settings["selected_epoch"] == len(seen) - 1 - seen[::-1].index(best)
    assert 0.0 <= learner.skill.metadata.metrics["val_acc"] <= 1.0
    assert set(learner.skill.metadata.metrics) >= {"val_acc", "val_acc_soft", "mask_density"}


@pytest.fixture(scope="module")
def adam_finetune():
    """The demo's pretrained base and an Adam finetune of its sentiment task: dataless masks fail on it."""
    quiet()
    base = pretrained_base(steps=400, seed=0)
    finetuned, test = finetune_demo_task(base, DEMO_TASKS[0], 200, seed=0, lr=1e-3, optimizer="adamw")
    return base, finetuned, make_splits(DEMO_TASKS[0], seed=0)[0].dataset, test


@pytest.mark.slow
def test_learned_mask_beats_dataless_on_an_adam_finetune(adam_finetune, tmp_path):
    base, finetuned, train, test = adam_finetune
    few = DataLoader(
        Subset(train, balanced_indices(train.labels, 64, seed=0)),
        batch_size=32,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    pl.seed_everything(0, verbose=False)
    learner = MaskLearner(copy.deepcopy(finetuned), base, spec=learned(0.01), bank=str(tmp_path / "bank"), skill_name="sentiment")
    trainer(max_epochs=learner.recipe.epochs).fit(learner, few)
    dataless = localize_dataless(task_vector(base, finetuned), 0.01, name="sentiment")
    scores = {}
    for kind, skill in (("dataless", dataless), ("learned", SkillBank(tmp_path / "bank").get("sentiment"))):
        stitcher = Stitcher(demo_classifier(base, 2).eval(), base)
        stitcher.add(skill)
        with stitcher.use_head("sentiment") as model:
            scores[kind] = accuracy(model, test)
    finetuned_acc = accuracy(finetuned, test)
    assert learner.skill.num_entries == dataless.num_entries
    assert scores["learned"] >= scores["dataless"] + 0.15, scores
    assert scores["learned"] >= 0.95 * finetuned_acc, (scores, finetuned_acc)


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.timeout(DDP_TIMEOUT)
def test_ddp_learns_the_same_mask_and_writes_the_bank_once(tmp_path):
    script = str(TESTS / "mask_ddp_run.py")
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    subprocess.run([sys.executable, script, "prepare", one], check=True, cwd=TESTS, capture_output=True)
    shutil.copytree(one + ".finetuned", two + ".finetuned")
    for devices, bank in ((1, one), (2, two)):
        done = subprocess.run([sys.executable, script, str(devices), bank], cwd=TESTS, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
    single, ddp = SkillBank(one), SkillBank(two)
    assert ddp.names() == ["sentiment"] and ddp.verify() == {"sentiment": "ok"}  # written once, by rank 0
    a, b = single.get("sentiment"), ddp.get("sentiment")
    assert entries(a) == entries(b)
    torch.testing.assert_close(torch.load(two + ".scores.pt"), torch.load(one + ".scores.pt"), atol=1e-4, rtol=0)
    # the mask did move away from where it started, so agreeing is not trivial
    torch.manual_seed(0)
    start = localize_dataless(
        task_vector(BertModel(tiny_config()), BertForSequenceClassification.from_pretrained(one + ".finetuned")),
        0.05,
        name="start",
    )
    assert len(entries(a) & entries(start)) < 0.9 * len(entries(a))


@pytest.mark.parametrize(
    "spec, kwargs, error, words",
    [
        ({"sparsity": 0.0}, {}, SkillbankError, "sparsity must be a fraction in (0, 1]"),
        ({"sparsity": 1.5}, {}, SkillbankError, "sparsity must be a fraction in (0, 1]"),
        ({"sparsity": "auto"}, {}, SkillbankError, "learns a mask of one size; for sparsity='auto' call localize_finetune"),
        ({"exclude": [".*"]}, {}, TaskVectorError, "no shared floating-point parameter is left"),
        ({"learner": {"recipe": "fast"}}, {}, SkillbankError, "unknown recipe 'fast'"),
        ({"learner": {"lr": -1.0}}, {}, SkillbankError, "need lr > 0"),
        ({"learner": {"pool_small": -1}}, {}, SkillbankError, "pool_small must be a whole number >= 0"),
        ({}, dict(bank="somewhere"), SkillbankError, "skill_name is not"),
        ({}, dict(bank="somewhere", skill_name="../up"), SkillNameError, "invalid skill name '../up'"),
    ],
)
def test_bad_arguments_are_refused(base_model, spec, kwargs, error, words):
    with pytest.raises(error, match=re.escape(words)):
        MaskLearner(finetune_like(base_model, seed=1), base_model, spec=spec, **kwargs)


def test_the_spec_may_be_given_as_its_fields_and_is_what_the_skill_records(base_model):
    finetuned = finetune_like(base_model, seed=1)
    typed = MaskLearner(copy.deepcopy(finetuned), base_model, spec=learned(0.05, exclude=["embeddings"], pool=2, lr=0.5))
    fields = {"sparsity": 0.05, "exclude": ["embeddings"], "learner": {"pool": 2, "lr": 0.5}}  # no method: a learned one
    plain = MaskLearner(copy.deepcopy(finetuned), base_model, spec=fields)
    assert plain.spec == typed.spec and plain.k == typed.k and plain.pool == 2 and plain.recipe.lr == 0.5
    assert plain.hparams["spec"] == typed.spec.to_dict()  # plain data in the checkpoint
    skill = plain.to_skill("s")
    assert LocalizationSpec.from_dict(skill.metadata.settings["spec"]) == typed.spec
    untyped = MaskLearner(copy.deepcopy(finetuned), base_model, spec=LocalizationSpec(sparsity=0.05, exclude=["embeddings"]))
    assert untyped.spec.method == "learned" and untyped.spec.exclude == ("embeddings",)  # the learner always learns
    default = MaskLearner(copy.deepcopy(finetuned), base_model)
    assert default.sparsity == 0.01 and default.recipe == LearnerSpec().mask_recipe() and default.pool is None


def test_a_taken_skill_name_is_refused_before_any_training(base_model, tmp_path):
    bank = SkillBank(tmp_path / "bank")
    bank.add(make_skill(base_model, "sentiment", seed=1))
    learner = MaskLearner(finetune_like(base_model, seed=1), base_model, bank=str(bank.path), skill_name="sentiment")
    steps = []
    learner.on_train_batch_start = lambda *args: steps.append(1)  # noqa: ARG005
    with pytest.raises(SkillNameError, match="already has a skill 'sentiment'; pick another skill_name .* before training"):
        trainer(max_epochs=40).fit(
            learner, DataLoader(TokenDataset(torch.ones(8, 4, dtype=torch.long), torch.zeros(8, dtype=torch.long)), batch_size=4)
        )
    assert steps == [] and bank.names() == ["sentiment"]


def test_a_finetune_of_another_base_is_refused(base_model):
    torch.manual_seed(0)
    other = BertModel(tiny_config(hidden_size=32, intermediate_size=64))
    with pytest.raises(TaskVectorError, match="share no floating-point parameter"):
        MaskLearner(finetune_like(base_model, seed=1), other)


def test_an_empty_dataloader_is_refused(base_model):
    learner = MaskLearner(finetune_like(base_model, seed=1), base_model)
    empty = DataLoader(TokenDataset(torch.zeros(0, 16, dtype=torch.long), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(SkillbankError, match="yielded no batches"):
        trainer().fit(learner, empty)


def test_a_model_without_a_loss_needs_loss_fn():
    base = nn.Linear(4, 2)
    finetuned = copy.deepcopy(base)
    with torch.no_grad():
        finetuned.weight.add_(0.01)
    learner = MaskLearner(finetuned, base.state_dict(), num_labels=2)
    with pytest.raises(SkillbankError, match="pass loss_fn="):
        learner((torch.randn(3, 4), torch.zeros(3, dtype=torch.long)))


@pytest.mark.parametrize("rule", ["mean", "sum"])
def test_in_context_forward_is_the_stitched_model_it_will_join(base_model, rule):
    from helpers.models import make_skill

    context = [make_skill(base_model, "c1", seed=11, sparsity=0.2), make_skill(base_model, "c2", seed=12, sparsity=0.2)]
    finetuned = finetune_like(base_model, seed=3, scale=0.05)
    new = localize_dataless(task_vector(base_model, finetuned), 0.2, name="new")
    learner = MaskLearner(copy.deepcopy(finetuned), base_model, spec=learned(0.2, rule=rule), context=context)
    batch = next(iter(token_loader()))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    _, logits, _ = learner(batch, gate=learner._gate_of({n: r.indices for n, r in new.regions.items()}))
    live = live_copy(base_model)
    stitcher = Stitcher(live, rule=rule)
    for skill in [*context, new]:
        stitcher.add(skill)
    with stitcher.use_head("new") as model:
        torch.testing.assert_close(logits, model(**inputs).logits, atol=1e-5, rtol=1e-5)
    isolated = MaskLearner(copy.deepcopy(finetuned), base_model, spec=learned(0.2))
    _, alone, _ = isolated(batch, gate=isolated._gate_of({n: r.indices for n, r in new.regions.items()}))
    assert not torch.allclose(alone, logits, atol=1e-4)  # the context does change what the mask is judged on


def test_in_context_learning_records_the_context_and_penalizes_owned_entries(base_model):
    from helpers.models import make_skill

    context = [make_skill(base_model, "c1", seed=11, sparsity=0.3)]
    finetuned = finetune_like(base_model, seed=3, scale=0.05)
    owned = entries(context[0])
    overlaps = {}
    for penalty in (0.0, 1000.0):
        learner = MaskLearner(
            copy.deepcopy(finetuned), base_model, spec=learned(0.05, owned_penalty=penalty, lr=0.5, l1=0.0), context=context
        )
        skill = learner.learn(token_loader(), epochs=5, name="new")
        assert skill.metadata.settings["context"] == ["c1"] and skill.metadata.settings["rule"] == "mean"
        overlaps[penalty] = len(entries(skill) & owned)
    assert overlaps[1000.0] < overlaps[0.0]  # paying for owned entries moves the mask off them


@pytest.mark.parametrize(
    "options, error, words",
    [
        (dict(rule="sign_mean"), SkillbankError, "no differentiable form"),
        (dict(owned_penalty=-1.0), SkillbankError, "owned_penalty"),
        (dict(exclude=["embeddings"]), SkillbankError, "not supported"),
        (dict(foreign=True), SkillbankError, "another base"),
    ],
)
def test_bad_context_settings_are_refused(base_model, options, error, words):
    torch.manual_seed(5)
    other = BertModel(tiny_config()).eval()
    context = [make_skill(other if options.pop("foreign", False) else base_model, "c1", seed=11)]
    finetuned = finetune_like(base_model, seed=3, scale=0.05)
    with pytest.raises(error, match=words):
        MaskLearner(copy.deepcopy(finetuned), base_model, spec=learned(0.05, **options), context=context)


def test_in_context_masks_depend_on_what_arrived_before_not_on_its_order(base_model):
    from helpers.models import make_skill

    c1, c2 = make_skill(base_model, "c1", seed=11, sparsity=0.3), make_skill(base_model, "c2", seed=12, sparsity=0.3)
    finetuned = finetune_like(base_model, seed=3, scale=0.05)

    def learn(context):  # noqa: ANN001, ANN202
        torch.manual_seed(0)
        learner = MaskLearner(copy.deepcopy(finetuned), base_model, spec=learned(0.05, lr=0.5, l1=0.0), context=context)
        return entries(learner.learn(token_loader(), epochs=4, name="new"))

    assert learn([c1, c2]) == learn([c2, c1])  # the rule is order-free: only the set of earlier skills counts
    assert learn([c1, c2]) != learn([])  # arrival-aware: the mask is chosen for the model it joins


def test_an_unknown_classifier_optimizer_is_a_skillbank_error(base_model):
    from skillbank.integrations.classifier import SequenceClassifier

    with pytest.raises(SkillbankError, match="optimizer must be 'adamw' or 'sgd', got 'adam'"):
        SequenceClassifier(finetune_like(base_model, seed=1), num_labels=2, optimizer="adam")


def test_a_resumed_run_keeps_the_best_mask_and_the_update_count(base_model, tmp_path):
    def learner() -> MaskLearner:
        return MaskLearner(finetune_like(base_model, seed=3, scale=0.05), base_model, spec=learned(0.05, lr=0.5))

    def run(module: MaskLearner, epochs: int, **fit) -> pl.Trainer:
        pl.seed_everything(0, verbose=False)
        done = trainer(max_epochs=epochs)
        done.fit(module, token_loader(), token_loader(n=32, seed=1), **fit)
        return done

    straight = learner()
    run(straight, 4)
    first = learner()
    run(first, 2).save_checkpoint(tmp_path / "half.ckpt")
    resumed = learner()
    run(resumed, 4, ckpt_path=tmp_path / "half.ckpt")
    assert resumed._updates == straight._updates == 4 * 4
    assert resumed._best[:2] == straight._best[:2]  # the best epoch, found before or after the interruption
    assert entries(resumed.skill) == entries(straight.skill)


def test_load_from_checkpoint_rebuilds_the_learner_from_folders_or_given_modules(base_model, tmp_path):
    finetuned = finetune_like(base_model, seed=9, scale=0.05)
    finetuned.save_pretrained(tmp_path / "ft")
    base_model.save_pretrained(tmp_path / "base")
    for label, args, again in (
        ("folders", (str(tmp_path / "ft"), str(tmp_path / "base")), {}),
        ("modules", (copy.deepcopy(finetuned), base_model), {"model": copy.deepcopy(finetuned), "base": base_model}),
    ):
        learner = MaskLearner(*args, spec=learned(0.05, recipe=resolve_recipe("topk", lr=0.05), pool=3), num_labels=2)
        run = trainer(max_epochs=2, enable_checkpointing=True, default_root_dir=tmp_path / label)
        run.fit(learner, token_loader())
        restored = MaskLearner.load_from_checkpoint(run.checkpoint_callback.best_model_path, **again)
        assert torch.equal(restored.scores, learner.scores) and torch.equal(restored.scored, learner.scored), label
        assert restored.recipe == learner.recipe and restored.sparsity == 0.05 and restored.pool == 3, label
        assert restored.binary_mask().keys() == learner.binary_mask().keys()
