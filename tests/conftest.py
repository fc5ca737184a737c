"""Shared fixtures (a tiny base model) and the ``real`` lane's opt-in; helpers live in ``tests/helpers/``."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertModel

from helpers.models import tiny_config


@pytest.fixture
def config() -> BertConfig:
    return tiny_config()


@pytest.fixture
def base_model(config) -> BertModel:
    torch.manual_seed(0)
    return BertModel(config).eval()


@pytest.fixture
def bank(tmp_path, base_model):  # noqa: ANN201 - a SkillBank
    """A bank of two small skills, ``a`` and ``b``, of the tiny base (what the hostile-input tests tamper with)."""
    from helpers.models import make_skill
    from skillbank import SkillBank

    bank = SkillBank(tmp_path / "bank")
    bank.add(make_skill(base_model, "a", seed=1))
    bank.add(make_skill(base_model, "b", seed=2))
    return bank


def pytest_collection_modifyitems(config, items) -> None:  # noqa: ANN001
    """Tests marked ``real`` (real model and data, minutes of CPU, a registry download) run only with ``-m real``."""
    if "real" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="real-data experiment: opt in with -m real")
    for item in items:
        if item.get_closest_marker("real"):
            item.add_marker(skip)
