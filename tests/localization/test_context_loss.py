"""Masks learned in context against the earlier skills' loss on the examples they keep
(``LearnerSpec(context_weight=...)``, :mod:`skillbank.localization.context_loss`)."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch.utils.data import DataLoader

from helpers.models import finetune_like, learned, live_copy, make_skill
from skillbank import MaskLearner, SkillbankError, Stitcher, localize_dataless, task_vector
from skillbank.localization.context_loss import ContextExamples
from skillbank.localization.spec import LearnerSpec
from skillbank.storage.examples import Examples
from skillbank.testbed.synthetic import DEMO_TASKS, TokenDataset


def kept(seed: int, n: int = 12) -> Examples:
    ids, labels = DEMO_TASKS[0].sample(n, torch.Generator().manual_seed(seed))
    return Examples({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels)


def token_loader(n: int = 64, seed: int = 0) -> DataLoader:
    ids, labels = DEMO_TASKS[0].sample(n, torch.Generator().manual_seed(seed))
    return DataLoader(TokenDataset(ids, labels), batch_size=16)


def with_examples(skill, examples: Examples):  # noqa: ANN001, ANN201
    """``skill`` keeping ``examples``, its head scaled up so that its answers are confident (a random tiny head's
    logits are near 0, where no change of the body shows)."""
    return replace(skill, examples=examples, head={k: 200 * v for k, v in skill.head.items()})


@pytest.fixture
def context(base_model):  # noqa: ANN201 - two earlier skills keeping examples
    return [
        with_examples(make_skill(base_model, "c1", seed=11, sparsity=0.3), kept(1)),
        with_examples(make_skill(base_model, "c2", seed=12, sparsity=0.3), kept(2)),
    ]


def _stitched_logits(base_model, skills, head: str, examples: Examples) -> torch.Tensor:  # noqa: ANN001
    live = live_copy(base_model)
    stitcher = Stitcher(live, rule="mean")
    for skill in skills:
        stitcher.add(skill)
    inputs = dict(examples.inputs)
    with torch.no_grad(), stitcher.use_head(head) as model:
        return model(**inputs).logits


@pytest.mark.parametrize("loss", ["distill", "labels"])
def test_the_loss_is_each_earlier_skills_loss_in_the_stitched_model_averaged_over_skills(base_model, context, loss):
    finetuned = finetune_like(base_model, seed=3, scale=0.05)
    new = localize_dataless(task_vector(base_model, finetuned), 0.1, name="new")
    spec = learned(0.1, context_weight=1.0, context_loss=loss)
    learner = MaskLearner(copy.deepcopy(finetuned), base_model, spec=spec, context=context)
    gate = learner._gate_of({n: r.indices for n, r in new.regions.items()})
    examples = learner.context_examples
    assert examples is not None
    value = examples.loss(learner.model, learner.masked_weights(gate), lambda: learner.masked_weights(torch.zeros_like(gate)))
    expected = []
    for skill in context:  # by hand: the model holding every skill, stitched, answering through the skill's head
        after = torch.log_softmax(_stitched_logits(base_model, [*context, new], skill.name, skill.examples), -1)
        if loss == "labels":
            expected.append(torch.nn.functional.nll_loss(after, skill.examples.labels))
        else:
            before = torch.log_softmax(_stitched_logits(base_model, context, skill.name, skill.examples), -1)
            expected.append((before.exp() * (before - after)).sum(-1).mean())
    torch.testing.assert_close(value, torch.stack(expected).mean(), rtol=1e-4, atol=1e-6)
    # the learner's term is taken at its scores' top k: at the start, the dataless mask of that size (``new``)
    torch.testing.assert_close(learner.context_loss(), value, rtol=1e-5, atol=1e-7)
    assert value > 1e-4  # the new skill does change the earlier skills' answers
    if loss == "distill":  # without the new skill the earlier ones answer exactly as before
        zero = torch.zeros_like(gate)
        assert float(examples.loss(learner.model, learner.masked_weights(zero), lambda: {})) == pytest.approx(0.0, abs=1e-6)


def test_weighing_the_earlier_skills_loss_moves_the_mask_off_what_they_need(base_model, context):
    finetuned = finetune_like(base_model, seed=3, scale=0.05)
    masks, costs = {}, {}
    for weight in (0.0, 5.0):
        torch.manual_seed(0)
        spec = learned(0.05, context_weight=weight)  # the default recipe
        learner = MaskLearner(copy.deepcopy(finetuned), base_model, spec=spec, context=context)
        skill = learner.learn(token_loader(), epochs=20, name="new")
        masks[weight] = skill
        probe = ContextExamples.of(context)  # the same measure for both: the earlier skills' distillation loss
        gate = learner._gate_of({n: r.indices for n, r in skill.regions.items()})
        costs[weight] = float(
            probe.loss(learner.model, learner.masked_weights(gate), lambda: learner.masked_weights(torch.zeros_like(gate)))
        )
        settings = skill.metadata.settings
        assert ("context_weight" in settings) == bool(weight)
        if weight:
            assert settings["context_weight"] == 5.0 and settings["context_loss"] == "distill"
            assert learner.last_context_loss == pytest.approx(costs[weight], rel=0.5)  # taken at the binary mask
    assert costs[5.0] < 0.2 * costs[0.0]  # the mask it keeps costs the earlier skills far less (0.0005 vs 0.042)
    assert sum(map(len, masks[5.0].regions.values())) == sum(map(len, masks[0.0].regions.values()))  # same size k


@pytest.mark.parametrize(
    "change, options, words",
    [
        ("no examples", {}, r"context skills \['c2'\] keep no examples.*--keep-examples N"),
        ("unlabelled", {"context_loss": "labels"}, r"\['c1'\] keep unlabelled examples; use the 'distill' loss"),
        ("no head", {}, r"\['c1'\] keep no head"),
        ("no context", {}, "there is no context: pass the earlier skills as context="),
    ],
)
def test_earlier_skills_that_cannot_take_part_are_refused_before_any_work(base_model, context, change, options, words):
    if change == "no examples":
        context[1] = replace(context[1], examples=None)
    elif change == "unlabelled":
        context[0] = replace(context[0], examples=Examples(context[0].examples.inputs))
    elif change == "no head":
        context[0] = replace(context[0], head={})
    finetuned = finetune_like(base_model, seed=3, scale=0.05)
    spec = learned(0.05, context_weight=1.0, **options)
    with pytest.raises(SkillbankError, match=words):
        MaskLearner(copy.deepcopy(finetuned), base_model, spec=spec, context=[] if change == "no context" else context)


@pytest.mark.parametrize(
    "fields, words", [({"context_weight": -1.0}, "context_weight must be"), ({"context_loss": "entropy"}, "context_loss")]
)
def test_bad_context_loss_settings_are_refused(fields, words):
    with pytest.raises(SkillbankError, match=words):
        LearnerSpec(**fields)
