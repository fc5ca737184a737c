"""The bad-input catalogue: every case is refused with a message that names the problem and says what to do."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest
import torch
from safetensors.torch import save
from transformers import BertModel

from helpers.models import finetune_like, live_copy, make_skill, tiny_config
from skillbank import (
    BankError,
    BaseMismatchError,
    Skill,
    SkillBank,
    SkillbankError,
    SkillFileError,
    SkillNameError,
    Stitcher,
    StitchError,
    TaskVectorError,
    localize_dataless,
    task_vector,
)


def other_base() -> BertModel:
    torch.manual_seed(1234)
    return BertModel(tiny_config()).eval()


def case_other_base_into_bank(base, tmp):
    bank = SkillBank(tmp / "b")
    bank.add(make_skill(base, "t", seed=1))
    bank.add(make_skill(other_base(), "u", seed=1))


def case_other_base_into_stitcher(base, tmp):
    Stitcher(live_copy(base)).add(make_skill(other_base(), "u", seed=1))


def case_shape_mismatch(base, tmp):
    torch.manual_seed(0)
    Stitcher(live_copy(BertModel(tiny_config(hidden_size=32)).eval())).add(make_skill(base, "t", seed=1))


def case_dtype_mismatch(base, tmp):
    Stitcher(live_copy(base).to(torch.bfloat16)).add(make_skill(base, "t", seed=1))


def case_nan_task_vector(base, tmp):
    ft = finetune_like(base, seed=1)
    with torch.no_grad():
        ft.bert.pooler.dense.bias[0] = float("nan")
    task_vector(base, ft)


def case_inf_task_vector(base, tmp):
    ft = finetune_like(base, seed=1)
    with torch.no_grad():
        ft.bert.encoder.layer[0].output.dense.weight[1, 1] = float("inf")
    task_vector(base, ft)


def case_sparsity_zero(base, tmp):
    localize_dataless(task_vector(base, finetune_like(base, seed=1)), 0.0, name="t")


def case_sparsity_above_one(base, tmp):
    localize_dataless(task_vector(base, finetune_like(base, seed=1)), 1.5, name="t")


def case_empty_mask(base, tmp):
    skill = make_skill(base, "e", seed=1)
    for region in skill.regions.values():
        region.indices, region.values = region.indices[:0], region.values[:0]
    SkillBank(tmp / "b").add(skill)


def case_duplicate_name(base, tmp):
    bank = SkillBank(tmp / "b")
    bank.add(make_skill(base, "t", seed=1))
    bank.add(make_skill(base, "t", seed=2))


def case_unknown_name(base, tmp):
    SkillBank(tmp / "b").get("nope")


def case_unsafe_name(base, tmp):
    SkillBank(tmp / "b").add(make_skill(base, "../escape", seed=1))


def case_bank_path_is_a_file(base, tmp):
    (tmp / "f").write_text("x")
    SkillBank(tmp / "f")


def case_read_only_bank(base, tmp):
    bank = SkillBank(tmp / "b")
    bank.add(make_skill(base, "t", seed=1))
    os.chmod(tmp / "b", stat.S_IREAD | stat.S_IEXEC)
    try:
        assert SkillBank(tmp / "b").get("t").name == "t"  # reads still work
        SkillBank(tmp / "b").add(make_skill(base, "u", seed=2))
    finally:
        os.chmod(tmp / "b", stat.S_IRWXU)


def case_newer_manifest(base, tmp):
    SkillBank(tmp / "b")
    manifest = tmp / "b" / "manifest.json"
    body = json.loads(manifest.read_text())
    body["format_version"] = 99
    manifest.write_text(json.dumps(body))
    SkillBank(tmp / "b")


def case_newer_skill_file(base, tmp):
    skill = make_skill(base, "t", seed=1)
    skill.metadata.format_version = 99
    Skill.from_bytes(skill.to_bytes(), origin="t.safetensors")


def case_safetensors_not_a_skill(base, tmp):
    Skill.from_bytes(save({"weight": torch.ones(3)}), origin="model.safetensors")


def case_remove_never_added(base, tmp):
    Stitcher(live_copy(base)).remove("ghost")


def case_model_differs_from_bank_base(base, tmp):
    bank = SkillBank(tmp / "b")
    bank.add(make_skill(base, "t", seed=1))
    Stitcher(finetune_like(base, seed=7), bank=bank).add("t")


def case_model_differs_from_given_base(base, tmp):
    Stitcher(finetune_like(base, seed=7), base)


def case_no_shared_parameters(base, tmp):
    task_vector(base, {"totally.different": torch.ones(3)})


CATALOGUE = [
    # (case, error, what is wrong, what to do)
    (case_other_base_into_bank, BaseMismatchError, "another base model", "use a bank for that base"),
    (case_other_base_into_stitcher, BaseMismatchError, "another base model", "stitch it onto its own base"),
    (case_shape_mismatch, StitchError, "has shape", "stitch it onto the architecture"),
    (case_dtype_mismatch, StitchError, "float32 base.*bfloat16", "load the model in float32"),
    (case_nan_task_vector, TaskVectorError, "pooler.dense.bias.*NaN/Inf", "pick an earlier checkpoint"),
    (case_inf_task_vector, TaskVectorError, "layer.0.output.dense.weight.*NaN/Inf", "Re-run"),
    (case_sparsity_zero, SkillbankError, r"\(0, 1\].*0\.0", "e.g. 0.01"),
    (case_sparsity_above_one, SkillbankError, r"\(0, 1\].*1\.5", "e.g. 0.01"),
    (case_empty_mask, SkillFileError, "empty mask", "larger sparsity"),
    (case_duplicate_name, SkillNameError, "already in", "pick another name or remove it first"),
    (case_unknown_name, SkillNameError, "no skill named 'nope'", "it holds"),
    (case_unsafe_name, SkillNameError, "invalid skill name", "use 1-128 letters"),
    (case_bank_path_is_a_file, BankError, "is a file", "pass a directory"),
    (case_read_only_bank, BankError, "read-only", "make the directory writable or copy the bank"),
    (case_newer_manifest, BankError, "format version 99", "upgrade skillbank"),
    (case_newer_skill_file, SkillFileError, "version 99", "upgrade skillbank"),
    (case_safetensors_not_a_skill, SkillFileError, "model.safetensors is a safetensors file but not a skill", "metadata"),
    (case_remove_never_added, StitchError, "'ghost' is not stitched", "stitched: none"),
    (case_model_differs_from_bank_base, BaseMismatchError, "another base model", "stitch it onto its own base"),
    (case_model_differs_from_given_base, BaseMismatchError, "differs from the base", "load the base model"),
    (case_no_shared_parameters, TaskVectorError, "share no floating-point parameter", "is this the base"),
]


@pytest.mark.parametrize("case, error, problem, advice", CATALOGUE, ids=[c[0].__name__[5:] for c in CATALOGUE])
def test_bad_input_is_refused_clearly(case, error, problem, advice, base_model, tmp_path):
    with pytest.raises(error) as info:
        case(base_model, tmp_path)
    message = str(info.value)
    assert re.search(problem, message), message
    assert advice in message, message
