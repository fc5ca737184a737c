"""Streaming dataless localization: the same skill, bit for bit, as the in-memory path, one tensor at a time."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from helpers.models import finetune_like
from skillbank import SkillbankError, TaskVectorError, localize_dataless, task_vector
from skillbank.localization.streaming import SafetensorsReader, localize_streaming


def assert_same_skill(a, b) -> None:  # noqa: ANN001
    assert list(a.regions) == list(b.regions)
    for name, region in a.regions.items():
        assert torch.equal(region.indices, b.regions[name].indices), name
        assert torch.equal(region.values, b.regions[name].values) and region.values.dtype == b.regions[name].values.dtype, name
    assert list(a.head) == list(b.head) and all(torch.equal(t, b.head[n]) for n, t in a.head.items())
    meta_a, meta_b = vars(a.metadata).copy(), vars(b.metadata).copy()
    meta_a.pop("created"), meta_b.pop("created")
    assert meta_a == meta_b


@pytest.fixture
def folders(tmp_path, base_model):  # noqa: ANN001, ANN201
    base_model.save_pretrained(tmp_path / "base")
    finetune_like(base_model, seed=1).save_pretrained(tmp_path / "ft")
    finetune_like(base_model, seed=2).save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    return tmp_path


@pytest.mark.parametrize("sparsity, exclude", [(0.01, ()), (0.05, ("embeddings",)), (1.0, ()), (1e-6, ())])
def test_streaming_gives_the_in_memory_skill_bit_for_bit(folders, sparsity, exclude):
    streamed = localize_streaming(folders / "base", folders / "ft", sparsity, name="s", exclude=exclude, task="t")
    in_memory = localize_dataless(task_vector(folders / "base", folders / "ft"), sparsity, name="s", exclude=exclude, task="t")
    assert_same_skill(streamed, in_memory)


def test_sharded_folders_and_single_files_stream_alike(folders):
    assert len(list((folders / "sharded").glob("model-*.safetensors"))) >= 2
    streamed = localize_streaming(folders / "base" / "model.safetensors", folders / "sharded", 0.02, name="s")
    assert_same_skill(streamed, localize_dataless(task_vector(folders / "base", folders / "sharded"), 0.02, name="s"))


def test_ties_at_the_threshold_go_to_the_same_earliest_entries(tmp_path, base_model):
    torch.manual_seed(0)
    state = {k: torch.full_like(v, 0.5) if v.dim() == 2 else v.clone() for k, v in base_model.state_dict().items()}
    finetuned = {k: v + 0.125 if v.dim() == 2 else v + 1e-3 * torch.randn_like(v) for k, v in state.items()}
    save_file(state, tmp_path / "base.safetensors")  # |τ| is exactly 0.125 on every matrix entry: one big tie
    save_file(finetuned, tmp_path / "ft.safetensors")
    streamed = localize_streaming(tmp_path / "base.safetensors", tmp_path / "ft.safetensors", 0.03, name="s")
    in_memory = localize_dataless(task_vector(tmp_path / "base.safetensors", tmp_path / "ft.safetensors"), 0.03, name="s")
    assert_same_skill(streamed, in_memory)
    chosen = torch.cat([r.values.abs() for r in streamed.regions.values()])
    assert bool((chosen == 0.125).all())  # the cut fell inside the tie


def test_the_reader_lists_from_the_headers_and_reads_one_tensor(folders):
    reader = SafetensorsReader(folders / "sharded")
    name = "bert.encoder.layer.0.output.dense.weight"
    assert reader.shape[name] == [16, 32] and reader.dtype[name] == "F32" and name in reader.float_names
    torch.testing.assert_close(reader.read(name), finetune_like_weight(folders, name), rtol=0, atol=0)


def finetune_like_weight(folders, name: str) -> torch.Tensor:  # noqa: ANN001
    from skillbank.vectors.weights import load_weights

    return load_weights(folders / "sharded")[name]


def test_streaming_refuses_what_the_in_memory_path_refuses(folders, tmp_path):
    with pytest.raises(TaskVectorError, match="equal the base's everywhere"):
        localize_streaming(folders / "base", folders / "base", 0.01, name="s")
    (tmp_path / "weights.bin").write_bytes(b"not safetensors")
    with pytest.raises(SkillbankError, match="neither a .safetensors file nor a model folder"):
        localize_streaming(tmp_path / "weights.bin", folders / "ft", 0.01, name="s")


def test_the_selection_never_holds_more_than_k_plus_one_tensor(folders, monkeypatch):
    from skillbank.localization import streaming

    held, original = [], streaming._RunningTopk.offer

    def offer(self, tau, offset):  # noqa: ANN001, ANN202
        original(self, tau, offset)
        held.append((self.scores.numel(), self.k, tau.numel()))

    monkeypatch.setattr(streaming._RunningTopk, "offer", offer)
    reader = SafetensorsReader(folders / "base")
    localize_streaming(folders / "base", folders / "ft", 0.01, name="s")
    largest = max(torch.Size(shape).numel() for shape in reader.shape.values())
    assert len(held) == len(reader.float_names) and all(n <= k for n, k, _ in held)  # after each tensor: at most k kept
    assert max(k for _, k, _ in held) + largest < sum(torch.Size(s).numel() for s in reader.shape.values()) // 2


def test_tensors_read_in_pieces_give_the_same_skill(folders, monkeypatch):
    from skillbank.localization import streaming

    whole = localize_streaming(folders / "base", folders / "ft", 0.02, name="s")
    monkeypatch.setattr(streaming, "CHUNK_ENTRIES", 40)  # a few rows a piece: every matrix in many pieces
    name = "encoder.layer.0.intermediate.dense.weight"
    pieces = list(SafetensorsReader(folders / "base").chunks(name))
    assert len(pieces) == 16 and torch.equal(torch.cat(pieces), SafetensorsReader(folders / "base").read(name))
    assert_same_skill(localize_streaming(folders / "base", folders / "ft", 0.02, name="s"), whole)


def test_a_nan_in_one_piece_is_named_with_the_whole_tensors_count(tmp_path, base_model, monkeypatch):
    from skillbank.localization import streaming

    state = {k: v.clone() for k, v in base_model.state_dict().items()}
    finetuned = {k: v + 1e-3 for k, v in state.items()}
    name = "encoder.layer.1.output.dense.weight"
    finetuned[name][0, 0] = finetuned[name][-1, -1] = float("nan")  # in the first and the last piece
    save_file(state, tmp_path / "base.safetensors")
    save_file(finetuned, tmp_path / "ft.safetensors")
    monkeypatch.setattr(streaming, "CHUNK_ENTRIES", 40)
    with pytest.raises(TaskVectorError, match=f"task vector of '{name}' has 2 NaN/Inf entries"):
        localize_streaming(tmp_path / "base.safetensors", tmp_path / "ft.safetensors", 0.01, name="s")
    with pytest.raises(TaskVectorError, match=f"task vector of '{name}' has 2 NaN/Inf entries"):
        task_vector(tmp_path / "base.safetensors", tmp_path / "ft.safetensors")


@pytest.mark.parametrize("base_dtype, ft_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_bf16_weights_stream_to_the_in_memory_skill_bit_for_bit(tmp_path, base_model, base_dtype, ft_dtype):
    """Checkpoints saved in bfloat16 (as LLMs ship), sharded or not, give the same skill either way."""
    base_model.to(base_dtype).save_pretrained(tmp_path / "base")
    finetune_like(base_model.float(), seed=3).to(ft_dtype).save_pretrained(tmp_path / "ft", max_shard_size="8KB")
    assert len(list((tmp_path / "ft").glob("model-*.safetensors"))) >= 2
    streamed = localize_streaming(tmp_path / "base", tmp_path / "ft", 0.03, name="s")
    in_memory = localize_dataless(task_vector(tmp_path / "base", tmp_path / "ft"), 0.03, name="s")
    assert_same_skill(streamed, in_memory)
    region = next(iter(streamed.regions.values()))
    assert region.values.dtype == torch.float32 and region.values.abs().min() > 0  # τ of bf16 weights, kept in fp32
