"""Tiny transformers built from configs, skills made from them, a plain reference of the stitch formula, and a pulled model's place in a cache."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import BertConfig, BertForSequenceClassification, BertModel, LlamaConfig

from skillbank import Skill, localize_dataless, task_vector
from skillbank.localization.spec import LearnerSpec, LocalizationSpec

#: The tiny models' shapes: a two-layer BERT classifier and a two-layer Llama (grouped-query attention, rotary).
TINY_BERT: dict[str, Any] = dict(
    vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, max_position_embeddings=32
)
TINY_LLAMA: dict[str, Any] = dict(
    vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64
)


def tiny_config(**overrides: Any) -> BertConfig:
    return BertConfig(**{**TINY_BERT, "num_labels": 2, **overrides})


def tiny_llama_config(**overrides: Any) -> LlamaConfig:
    """A two-layer Llama's config, for causal-LM tests."""
    return LlamaConfig(**{**TINY_LLAMA, "max_position_embeddings": 32, **overrides})


def finetune_like(base: BertModel, seed: int, scale: float = 0.02, num_labels: int = 2) -> BertForSequenceClassification:
    """A 'finetuned' classifier: the base backbone plus seeded noise, and its own head."""
    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_config(num_labels=num_labels)).eval()
    model.bert.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in model.bert.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def make_skill(base: BertModel, name: str, seed: int, sparsity: float = 0.05) -> Skill:
    return localize_dataless(task_vector(base, finetune_like(base, seed)), sparsity, name=name)


def tiny_tokenizer(words: Sequence[str]):  # noqa: ANN201 - a BertTokenizerFast
    """A word-level BERT tokenizer over the special tokens plus ``words``.

    Built from a vocab mapping: transformers 5 ignores ``vocab_file=`` and would map every word to [UNK].
    """
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})


def live_copy(base: BertModel) -> BertForSequenceClassification:
    model = BertForSequenceClassification(base.config).eval()
    model.bert.load_state_dict(base.state_dict())
    return model


def reference_stitch(base: Mapping[str, Tensor], skills: Sequence[Skill]) -> dict[str, Tensor]:
    """The batch formula θ_pre + Σ γ'_i ⊙ τ_i, written densely and plainly."""
    out = {}
    for name, theta in base.items():
        total = torch.zeros(theta.numel(), dtype=torch.float64)
        count = torch.zeros(theta.numel(), dtype=torch.float64)
        for skill in skills:
            region = skill.regions.get(name)
            if region is not None and len(region):
                total[region.indices] += region.values.double()
                count[region.indices] += 1
        merged = theta.reshape(-1).double() + torch.where(count > 0, total / count.clamp(min=1), 0.0)
        out[name] = merged.to(theta.dtype).reshape(theta.shape)
    return out


def pulled_minilm_folder(cache: Path) -> Path:
    """Where ``pulled:minilm`` resolves to in ``cache``, marked as completely pulled, so nothing is downloaded:
    a test writes a tiny model there and points ``$SKILLBANK_CACHE`` at ``cache``."""
    from skillbank.integrations.pulled.wheels import MODELS, package_root

    package, inner = MODELS["minilm"]
    package_root(package, cache).mkdir(parents=True)
    (package_root(package, cache) / ".complete").write_text("pulled by the test\n")
    return package_root(package, cache) / inner


#: The own-data set-up's words: the first three make a review positive, the next three negative.
REVIEW_WORDS = ["good", "great", "fine", "bad", "awful", "poor", "the", "film", "was", "plot"]


def own_data(folder: Path, monkeypatch: Any) -> Path:
    """A newcomer's own data: a pulled-MiniLM stand-in in ``folder/cache`` (``$SKILLBANK_CACHE`` set to it through
    ``monkeypatch``: a tiny BERT with a tokenizer, whose checkpoint carries an integer ``embeddings.position_ids``
    buffer, as the real one does and transformers 5's model no longer has) and ``folder/my.csv`` with ``review`` and
    ``verdict`` columns, labels as names. Returns the base model's folder."""
    import csv

    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("SKILLBANK_CACHE", str(folder / "cache"))
    base = pulled_minilm_folder(folder / "cache")
    tokenizer = tiny_tokenizer(REVIEW_WORDS)
    torch.manual_seed(0)
    config = tiny_config(vocab_size=len(tokenizer))
    BertModel(config).save_pretrained(base)
    weights = load_file(base / "model.safetensors")
    weights["embeddings.position_ids"] = torch.arange(config.max_position_embeddings).unsqueeze(0)
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(base)
    rows = [
        {"review": f"the film was {w} {w}", "verdict": "positive" if w in REVIEW_WORDS[:3] else "negative"}
        for w in REVIEW_WORDS[:6]
        for _ in range(12)
    ]
    with (folder / "my.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["review", "verdict"])
        writer.writeheader()
        writer.writerows(rows)
    return base


def learned(
    sparsity: float = 0.01, *, exclude: Sequence[str] = (), value_dtype: str = "float32", **learner: Any
) -> LocalizationSpec:
    """A learned spec of one size, as the tests write it: :class:`LearnerSpec`'s fields as keywords."""
    return LocalizationSpec(
        method="learned", sparsity=sparsity, exclude=tuple(exclude), value_dtype=value_dtype, learner=LearnerSpec(**learner)
    )
