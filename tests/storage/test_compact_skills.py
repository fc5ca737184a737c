"""Compact skills: values in 1, 2 or 4 bits, positions in Elias–Fano or a bitmap, and what a crafted file may not do."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save

from helpers.models import make_skill
from skillbank import Skill, SkillBank, SkillFileError
from skillbank.errors import SkillbankError
from skillbank.storage import bit_packing
from skillbank.storage.bank import SkillEntry
from skillbank.storage.bit_packing import pack_bits, packed_size, unpack_bits
from skillbank.storage.position_codes import decode_positions, encode_positions, positions_size
from skillbank.storage.value_codes import decode_values, encode_values


@settings(max_examples=60, deadline=None)
@given(width=st.integers(1, 12), values=st.lists(st.integers(0, 2**12 - 1), max_size=70))
def test_bit_packing_round_trips(width, values):
    values = [v % (1 << width) for v in values]
    packed = pack_bits(torch.tensor(values, dtype=torch.int64), width)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(len(values), width)
    assert unpack_bits(packed, len(values), width).tolist() == values


def test_bit_packing_is_the_same_across_chunks(monkeypatch):
    values = torch.randint(0, 8, (1000,), generator=torch.Generator().manual_seed(0))
    whole = pack_bits(values, 3)
    monkeypatch.setattr(bit_packing, "_CHUNK", 64)  # many chunks: the bytes and the decoded values may not change
    assert torch.equal(pack_bits(values, 3), whole)
    assert torch.equal(unpack_bits(whole, 1000, 3), values)


@pytest.mark.parametrize("numel", [7, 300, 70_000, 400_003])
@pytest.mark.parametrize("density", [0.0005, 0.01, 0.14, 0.5, 1.0])
def test_positions_round_trip_in_the_smallest_code(numel, density):
    count = max(1, round(numel * density))
    indices = torch.randperm(numel, generator=torch.Generator().manual_seed(numel))[:count].sort().values
    codes = encode_positions(indices, numel)
    assert torch.equal(decode_positions(codes, numel), indices)
    stored = sum(t.numel() * t.element_size() for t in codes.values())
    assert stored == min(positions_size(count, numel).values())


def test_positions_near_their_entropy_at_the_auto_size():
    numel, density = 1_000_000, 0.14
    indices = torch.randperm(numel, generator=torch.Generator().manual_seed(0))[: int(numel * density)].sort().values
    codes = encode_positions(indices, numel)
    bits = 8 * sum(t.numel() for t in codes.values()) / indices.numel()
    entropy = -(density * math.log2(density) + (1 - density) * math.log2(1 - density)) / density
    assert set(codes) == {"ef_lo", "ef_hi"} and entropy < bits < entropy + 0.7  # 4.79 bits against 4.17; the plain code: 16


def test_crafted_positions_are_refused():
    numel = 10_000
    codes = encode_positions(torch.arange(0, numel, 50), numel)
    with pytest.raises(SkillbankError, match="low bits"):
        decode_positions({**codes, "ef_lo": codes["ef_lo"][:-1]}, numel)
    with pytest.raises(SkillbankError, match="do not fit"):
        decode_positions({**codes, "ef_hi": torch.cat([codes["ef_hi"], torch.zeros(3, dtype=torch.uint8)])}, numel)
    with pytest.raises(SkillbankError, match="no longer than"):
        decode_positions({**codes, "ef_hi": torch.full((10 * numel,), 255, dtype=torch.uint8)}, numel)
    with pytest.raises(SkillbankError, match="not an integer"):
        decode_positions({**codes, "ef_lo": codes["ef_lo"].float()}, numel)
    twice = torch.tensor([5, 5, 9])  # a repeated position Elias–Fano can express: refused as out of order
    low = (12 // 3).bit_length() - 1  # 3 entries in 12: two low bits; the parts built by hand
    high = torch.zeros(3 + (11 >> low) + 1, dtype=torch.int64)
    high[(twice >> low) + torch.arange(3)] = 1
    crafted = {"ef_lo": pack_bits(twice & ((1 << low) - 1), low), "ef_hi": pack_bits(high, 1)}
    with pytest.raises(SkillbankError, match="strictly ascending"):
        decode_positions(crafted, 12)
    with pytest.raises(SkillbankError, match="bitmap"):
        decode_positions({"bits": torch.zeros(3, dtype=torch.uint8)}, 100)


def test_one_bit_values_are_sign_times_the_mean_magnitude():
    values = torch.tensor([0.5, -1.5, 2.0, -0.0, -1.0])
    coded = decode_values(encode_values(values, 1), 5, 1)
    assert coded.tolist() == [1.0, -1.0, 1.0, 1.0, -1.0]  # -0.0 is not negative: it decodes to +level


@pytest.mark.parametrize("bits", [2, 4])
def test_each_k_bit_level_is_the_mean_of_its_members(bits):
    values = torch.randn(4096, generator=torch.Generator().manual_seed(bits))
    codes = encode_values(values, bits)
    decoded = decode_values(codes, values.numel(), bits)
    assert torch.equal(decoded.sign(), values.sign())
    levels = codes["val_levels"]
    assert levels.numel() == 1 << (bits - 1) and bool((levels[1:] > levels[:-1]).all())
    for level in levels:
        members = decoded.abs() == level
        assert members.any()
        torch.testing.assert_close(values.abs()[members].mean(), level)


def test_more_bits_keep_the_values_closer():
    values = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) ** 3  # heavy tails
    gaussian = torch.randn(10_000, generator=torch.Generator().manual_seed(1))
    quantiles_only = 0.150  # the 4-bit error of equal-count bins alone on a Gaussian; Lloyd's steps lower it
    four_bits = decode_values(encode_values(gaussian, 4), gaussian.numel(), 4)
    assert float((four_bits - gaussian).norm() / gaussian.norm()) < quantiles_only - 0.02
    errors = [float((decode_values(encode_values(values, b), values.numel(), b) - values).norm()) for b in (1, 2, 4)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.4 * float(values.norm())


def test_crafted_values_are_refused():
    codes = encode_values(torch.randn(100), 2)
    with pytest.raises(SkillbankError, match="take 25 uint8 bytes"):
        decode_values({**codes, "val_code": codes["val_code"][:-1]}, 100, 2)
    with pytest.raises(SkillbankError, match="2 float32 levels"):
        decode_values({**codes, "val_levels": torch.ones(3)}, 100, 2)
    with pytest.raises(SkillbankError, match="finite and non-negative"):
        decode_values({**codes, "val_levels": torch.tensor([1.0, float("nan")])}, 100, 2)
    with pytest.raises(SkillbankError, match="exactly"):
        decode_values({"val_code": codes["val_code"]}, 100, 2)


@pytest.mark.parametrize("code,bits", [("1bit", 1), ("2bit", 2), ("4bit", 4)])
def test_coded_skill_round_trips_at_format_3(base_model, code, bits):
    skill = make_skill(base_model, "t", seed=1, sparsity=0.14)
    coded = replace(skill, metadata=replace(skill.metadata, value_dtype=code))
    data = coded.to_bytes()
    back = Skill.from_bytes(data)
    assert back.metadata.format_version == 3 and back.metadata.value_dtype == code
    for name, region in skill.regions.items():
        assert torch.equal(back.regions[name].indices, region.indices)
        expected = decode_values(encode_values(region.values, bits), len(region), bits) if len(region) else region.values
        assert torch.equal(back.regions[name].values, expected)
    assert torch.equal(Skill.from_bytes(back.to_bytes()).regions[name].values, back.regions[name].values)
    bf16 = replace(skill, metadata=replace(skill.metadata, value_dtype="bfloat16")).to_bytes()
    assert _region_bytes(data) < _region_bytes(bf16)  # tiny tensors: a level table each; sizes at scale are benchmarked
    assert Skill.from_bytes(skill.to_bytes()).metadata.format_version == 1  # float values stay readable by release 1


def _region_bytes(data: bytes) -> int:
    """Bytes of a skill file's region tensors (the tiny model's header, a name per tensor, would drown them)."""
    return sum(t.numel() * t.element_size() for key, t in load(data).items() if key.startswith("region/"))


def _retagged(data: bytes, **header: object) -> bytes:
    """The skill file ``data`` with fields of its header replaced (a crafted file)."""
    tensors = load(data)
    length = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + length])["__metadata__"]
    fields = json.loads(meta["skillbank"])
    fields.update(header)
    return save(tensors, metadata={"skillbank": json.dumps(fields)})


def test_crafted_coded_skills_are_refused(base_model):
    skill = make_skill(base_model, "t", seed=1, sparsity=0.14)
    coded = replace(skill, metadata=replace(skill.metadata, value_dtype="2bit")).to_bytes()
    with pytest.raises(SkillFileError, match="coded values but declares format 1"):
        Skill.from_bytes(_retagged(coded, format_version=1))
    with pytest.raises(SkillFileError, match="another form than the header's 'float32'"):
        Skill.from_bytes(_retagged(coded, value_dtype="float32"))
    with pytest.raises(SkillFileError, match="another form than the header's '2bit'"):
        Skill.from_bytes(_retagged(skill.to_bytes(), value_dtype="2bit", format_version=3))
    with pytest.raises(SkillFileError, match="is damaged"):
        Skill.from_bytes(_retagged(coded, value_dtype="4bit"))  # 2-bit codes read as 4-bit: wrong sizes


def test_bank_lists_bits_per_model_parameter(base_model, tmp_path, capsys):
    from skillbank.integrations.cli import main

    skill = make_skill(base_model, "t", seed=1, sparsity=0.14)
    bank = SkillBank(tmp_path / "bank")
    bank.add(skill)
    bank.add(replace(skill, metadata=replace(skill.metadata, name="t2", value_dtype="1bit")))
    full, small = bank.entry("t"), bank.entry("t2")
    assert full.shared == small.shared == skill.num_shared
    assert small.bits_per_parameter == pytest.approx(small.bytes * 8 / skill.num_shared)
    assert full.bits_per_parameter == pytest.approx(full.bytes * 8 / skill.num_shared)  # the order of the two: benchmarked
    assert main(["list", str(bank.path)]) == 0
    out = capsys.readouterr().out
    assert "bits/param" in out and f" {small.bits_per_parameter:.0f} " in out  # 27 on the tiny model: headers dominate
    assert main(["show", str(bank.path), "t2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bits_per_parameter"] == pytest.approx(small.bits_per_parameter)
    old = json.loads((bank.path / "manifest.json").read_text())  # a manifest line written before the field
    del old["skills"][0]["shared"]
    assert SkillEntry.from_dict(old["skills"][0]).bits_per_parameter is None
