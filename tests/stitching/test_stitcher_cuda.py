"""The Stitcher on CUDA: same math as on CPU (skipped without a GPU; run on a GPU machine by hand)."""

from __future__ import annotations

import pytest
import torch

from helpers.models import live_copy, make_skill, reference_stitch
from skillbank import Stitcher

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_cuda_stitching_matches_the_batch_formula_and_restores_the_base(base_model):
    base_state = {k: v.clone() for k, v in base_model.state_dict().items() if v.is_floating_point()}
    skills = [make_skill(base_model, f"t{i}", seed=i, sparsity=0.1) for i in range(4)]
    model = live_copy(base_model).cuda()
    stitcher = Stitcher(model, base_model)
    for skill in skills:
        stitcher.add(skill)
    stitcher.remove("t1")
    expected = reference_stitch(base_state, [s for s in skills if s.name != "t1"])
    for name, value in model.bert.state_dict().items():
        if value.is_floating_point():
            assert value.is_cuda
            torch.testing.assert_close(value.cpu(), expected[name], rtol=1e-6, atol=1e-6)
    with stitcher.use_head("t2") as m:
        assert m(torch.tensor([[1, 2, 3]], device="cuda")).logits.shape == (1, 2)
    for name in stitcher.stitched:
        stitcher.remove(name)
    for name, value in model.bert.state_dict().items():
        if value.is_floating_point():
            assert torch.equal(value.cpu(), base_state[name])
