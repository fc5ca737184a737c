"""MaskLearner(pool=...): scores and optimizer state over a candidate pool of the top pool·k entries of |τ|."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader

from helpers.models import finetune_like, learned, make_skill
from skillbank import MaskLearner, SkillbankError, task_vector
from skillbank.testbed.synthetic import DEMO_TASKS, TokenDataset


def loader(n: int = 32, seed: int = 0) -> DataLoader:
    ids, labels = DEMO_TASKS[0].sample(n, torch.Generator().manual_seed(seed))
    return DataLoader(TokenDataset(ids, labels), batch_size=16)


def learn(base_model, finetuned, **options):
    torch.manual_seed(0)
    learner = MaskLearner(copy.deepcopy(finetuned), base_model, spec=learned(0.02, **options))
    return learner, learner.learn(loader(), epochs=3, name="s")


def test_a_pool_holding_every_entry_learns_the_full_scoring_mask(base_model):
    finetuned = finetune_like(base_model, seed=1, scale=0.05)
    full_learner, full = learn(base_model, finetuned)
    pooled_learner, pooled = learn(base_model, finetuned, pool=1e9)
    assert pooled_learner.scored.numel() == full_learner.tau.numel()
    for name, region in full.regions.items():
        assert torch.equal(pooled.regions[name].indices, region.indices), name
        assert torch.equal(pooled.regions[name].values, region.values), name
    assert pooled.metadata.settings["pool_entries"] == full_learner.tau.numel()


def test_a_small_pool_keeps_state_small_and_picks_k_entries_from_the_top_of_tau(base_model):
    finetuned = finetune_like(base_model, seed=2, scale=0.05)
    learner, skill = learn(base_model, finetuned, pool=3)
    k = learner.k
    assert learner.tau.numel() == learner.scores.numel() == 3 * k  # the state follows the pool
    # τ, S and Adam's two moments in float32, the pool's global and local positions in int64: 32 B a pool entry
    assert learner.state_nbytes == 32 * 3 * k
    assert skill.num_entries == k
    tv = task_vector(base_model, finetuned)
    flat = torch.cat([tv.shared[b].reshape(-1).abs() for b in tv.shared])
    threshold = flat.topk(3 * k).values[-1]
    for name, region in skill.regions.items():
        if len(region):
            assert torch.equal(region.values, tv.shared[name].reshape(-1)[region.indices]), name
            assert bool((region.values.abs() >= threshold).all()), name
    assert skill.metadata.settings["pool"] == 3


def test_small_tensors_join_the_pool_whole(base_model):
    finetuned = finetune_like(base_model, seed=3, scale=0.05)
    learner = MaskLearner(copy.deepcopy(finetuned), base_model, spec=learned(0.02, pool=2, pool_small=64))
    scored = set(learner.scored.tolist())
    small = [(b, start, n) for b, start, n in learner._layout if n <= 64]
    assert small and all(set(range(start, start + n)) <= scored for _, start, n in small)
    restored = MaskLearner(copy.deepcopy(finetuned), base_model, spec=learned(0.02, pool=2, pool_small=64))
    restored.load_state_dict(learner.state_dict())  # the pool is part of the checkpointed state
    assert torch.equal(restored.scored, learner.scored)


@pytest.mark.parametrize(
    "pool, context, message",
    [(0.5, False, "pool must be >= 1"), (5, True, "a pool with context= is not supported"), (1, False, None)],
)
def test_bad_pools_are_refused_before_any_work(base_model, pool, context, message):
    earlier = [make_skill(base_model, "earlier", seed=5)] if context else []
    if message is None:  # the smallest pool is accepted
        assert MaskLearner(finetune_like(base_model, seed=4), base_model, spec=learned(0.02, pool=pool)).pool == 1
        return
    with pytest.raises(SkillbankError, match=message):
        MaskLearner(finetune_like(base_model, seed=4), base_model, spec=learned(0.02, pool=pool), context=earlier)
