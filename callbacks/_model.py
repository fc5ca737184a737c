"""The module inside a LightningModule that holds the model a callback works on."""

from __future__ import annotations

import lightning.pytorch as pl
from torch import nn

from skillbank.errors import SkillbankError


def wrapped_model(pl_module: pl.LightningModule, attr: str | None) -> nn.Module:
    """``pl_module.<attr>`` (dots allowed), or ``pl_module`` itself when ``attr`` is ``None``.

    The default ``"model"`` falls back to the module itself when it has no such
    attribute, so a LightningModule that *is* the model works unchanged; but when
    it holds a Hugging Face model under another name (``self.net``), that is an
    error naming it: treating the whole module as the model would fold the task
    head into the task vector.
    """
    if attr is None:
        return pl_module
    found: object = pl_module
    for part in attr.split("."):
        if not hasattr(found, part):
            if attr == "model":
                return _the_module_itself(pl_module)
            raise SkillbankError(
                f"{type(pl_module).__name__} has no attribute {attr!r}; set model_attr= to the attribute that "
                "holds the model (or None for the LightningModule itself)."
            )
        found = getattr(found, part)
    if not isinstance(found, nn.Module):
        raise SkillbankError(f"{type(pl_module).__name__}.{attr} is a {type(found).__name__}, not an nn.Module.")
    return found


def _the_module_itself(pl_module: pl.LightningModule) -> nn.Module:
    held = [name for name, child in pl_module.named_children() if hasattr(child, "base_model_prefix")]
    if held:
        raise SkillbankError(
            f"{type(pl_module).__name__} holds its Hugging Face model as {', '.join(f'self.{n}' for n in held)}, not "
            f"self.model; pass model_attr={held[0]!r} (or model_attr=None to treat the whole LightningModule as the model)."
        )
    return pl_module
