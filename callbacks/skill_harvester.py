"""SkillHarvester: at the end of a finetuning run, localize what the run learned and add it to a bank."""

from __future__ import annotations

import copy
import functools
import itertools
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor
from torch.distributed.constants import default_pg_timeout
from torch.utils.data import DataLoader
from typing_extensions import override

from skillbank.callbacks._model import wrapped_model
from skillbank.callbacks._sharded_weights import save_sharded_weights
from skillbank.errors import SkillbankError, SkillNameError, TimeLimitError
from skillbank.localization.auto_sparsity import DEFAULT_GRID
from skillbank.localization.causal_lm import is_causal_lm
from skillbank.localization.fewshot import examples_from_batches
from skillbank.localization.finetune import localize_finetune
from skillbank.localization.methods import LocalizationInputs
from skillbank.localization.spec import LearnerSpec, LocalizationSpec
from skillbank.sharding import is_sharded
from skillbank.storage.bank import SkillBank
from skillbank.storage.ranks import bank_on_rank_zero, raise_everywhere
from skillbank.storage.skill import Skill
from skillbank.vectors.adapters import Finetune, find_peft_model, merged_finetune
from skillbank.vectors.models import apply_delta
from skillbank.vectors.weights import WeightsSource, is_float, load_weights

__all__ = ["BASE_FILE", "SkillHarvester", "save_finetune", "wait_budget"]

#: The captured base's file beside the saved finetune, for ``skillbank localize --base``.
BASE_FILE = "base.safetensors"


def save_finetune(plain: torch.nn.Module, folder: Path, base: Mapping[str, Tensor] | None = None) -> Path:
    """Save a finetuned model's weights (``plain``: a LoRA model merged first, :func:`_plain_finetune`) to ``folder``
    as ``skillbank localize --finetuned`` reads them (a Hugging Face model with ``save_pretrained``, so its config
    comes too; else one ``model.safetensors``), and ``base`` beside them as :data:`BASE_FILE` when given. Written
    into a sibling and renamed, so ``folder`` is complete or absent."""
    from safetensors.torch import save_file, save_model

    folder.parent.mkdir(parents=True, exist_ok=True)
    staged = folder.with_name(f".{folder.name}.partial-{uuid.uuid4().hex}")
    try:
        save_pretrained = getattr(plain, "save_pretrained", None)  # a Hugging Face model
        if callable(save_pretrained):
            save_pretrained(staged, safe_serialization=True)
        else:
            staged.mkdir()
            save_model(plain, str(staged / "model.safetensors"))
        if base is not None:
            save_file({k: v.contiguous() for k, v in base.items()}, str(staged / BASE_FILE))
        staged.rename(folder)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return folder


def _plain_finetune(model: torch.nn.Module) -> tuple[Finetune, torch.nn.Module]:
    """``model`` as a finetune (a LoRA model merged on a copy, once) and its plain weights as a module."""
    finetune = merged_finetune(model)
    return finetune, finetune.weights if finetune.source else model


def _add_advice(exc: BaseException, advice: str) -> None:
    """Append ``advice`` to ``exc``: to a skillbank error's one-line message, else as a note under its traceback."""
    if isinstance(exc, SkillbankError):
        exc.args = (f"{exc} {advice}",)
    elif hasattr(exc, "add_note"):  # Python 3.11+
        exc.add_note(advice)


def wait_budget(trainer: Any) -> float | None:
    """Seconds the other ranks can wait while rank 0 harvests: 80% of the process group's timeout under DDP
    (``DDPStrategy(timeout=...)``, else torch's default of 30 minutes); ``None`` in a single process."""
    if trainer.world_size <= 1:
        return None
    timeout = getattr(trainer.strategy, "_timeout", None) or default_pg_timeout
    return 0.8 * timeout.total_seconds()


class SkillHarvester(Callback):
    """Turn a finetuning run into a skill in a :class:`~skillbank.SkillBank` when fitting ends.

    Args:
        bank: the bank directory (created if missing).
        name: the skill's name; checked to be free when fitting starts, so a
            clash fails before the run rather than after it.
        base: the base weights (folder, file, module or state dict). ``None``
            captures the model's weights when fitting is set up, before any
            checkpoint is restored: right when the module is built from the base.
            Of a Hugging Face model only the backbone (``model.base_model``) is
            captured, so its task head becomes the skill's head; for other modules
            give ``head_patterns`` to keep a new head out of the task vector.
        sparsity: fraction of the shared entries in the mask, or ``"auto"``: the
            smallest size of ``grid`` whose skill alone keeps ``target_recovery`` of
            the finetune's accuracy on ``validation`` (learned masks start their
            search from the dataless choice); see :mod:`skillbank.localization.auto_sparsity`.
        target_recovery, grid: the goal and the sizes tried with ``sparsity="auto"``.
        validation: labelled batches for ``"auto"``; default the run's own validation dataloader.
        method: ``"dataless"`` (top-|τ|) or ``"learned"`` (:class:`~skillbank.MaskLearner`
            on ``few_shot``, on rank 0's device, without a Trainer).
        few_shot: the labelled few-shot batches for ``"learned"`` (64 per class in the paper).
        model_attr: the LightningModule attribute holding the model (dots allowed);
            ``None``, or a module without ``model``, means the LightningModule itself.
        task, exclude, head_patterns, value_dtype: as in :func:`~skillbank.localize_dataless`
            and :func:`~skillbank.task_vector`.
        learner: how a learned mask trains: a :class:`~skillbank.localization.spec.LearnerSpec` or its
            fields (``recipe``, ``lr``, ``pool``, …).
        routing: batches of the task (e.g. the few-shot or validation loader) whose
            base features become the skill's routing centroids, one per label, so a
            :class:`~skillbank.stitching.routing.SkillRouter` can pick it for requests that do not
            name their task (a Hugging Face encoder model; see :mod:`skillbank.stitching.routing`).
        routing_centroids: at most this many centroids are kept.
        low_rank: with the dataless method, also keep each weight matrix's top ``low_rank`` singular directions of τ as a
            low-rank part (:mod:`skillbank.localization.low_rank`); such a skill composes matrix by matrix.
        keep_examples: keep this many tokenized examples a class in the skill (default 0: none), from
            ``examples`` (default: ``few_shot``, else the validation data): a calibration set with which a
            composition of several skills can weigh them later (:mod:`skillbank.stitching.calibration`).
        finetuned_dir: where the finetuned weights are saved before localizing (default
            ``<default_root_dir>/finetuned/<name>``; a folder that exists gets a ``-1``, ``-2`` … twin,
            never overwritten), so a failure after training loses nothing: its error says
            where they are and the ``skillbank localize`` command that banks them.
        keep_finetuned: keep that folder once the skill is banked (default: removed then).

    The run's final ``trainer.callback_metrics`` (validation accuracy, …) go into the
    skill's metadata. Under ``ModelParallelStrategy`` (FSDP2, the model sharded in
    ``configure_model``) every rank takes part in writing the finetuned weights one tensor
    at a time into safetensors shards (no rank gathers the whole model), and rank 0
    streams a dataless mask of a fixed size from them: other methods, ``"auto"``,
    ``low_rank``, ``routing`` and ``keep_examples`` need the whole model in one process
    and are refused when fitting starts (run ``skillbank localize`` on the kept folder).
    Give ``base=`` as a folder or file there: a captured base is a whole copy on rank 0.
    Under DDP rank 0 localizes and writes; every rank waits for
    it and raises the same error if it fails. The skill is kept as ``self.skill`` on rank 0.
    A learned mask is learned on rank 0 alone, so it must be done within 80% of the
    process group's timeout (:func:`wait_budget`, 24 of torch's default 30 minutes):
    a learn projected past it stops early with a :class:`~skillbank.errors.TimeLimitError`
    that says how to go on, instead of the other ranks timing out.
    """

    def __init__(
        self,
        bank: str | Path,
        name: str,
        base: WeightsSource | None = None,
        sparsity: float | str = 0.01,
        method: str = "dataless",
        few_shot: Iterable[Any] | None = None,
        model_attr: str | None = "model",
        task: str = "",
        exclude: Sequence[str] = (),
        head_patterns: Sequence[str] = (),
        value_dtype: str = "float32",
        learner: LearnerSpec | Mapping[str, Any] | None = None,
        target_recovery: float = 0.99,
        grid: Sequence[float] = DEFAULT_GRID,
        validation: Iterable[Any] | None = None,
        routing: Iterable[Any] | None = None,
        routing_centroids: int = 16,
        keep_examples: int = 0,
        examples: Iterable[Any] | None = None,
        low_rank: int = 0,
        finetuned_dir: str | Path | None = None,
        keep_finetuned: bool = False,
    ) -> None:
        # one typed spec, checked now (an unknown method or a bad sparsity fails before training)
        self.spec = LocalizationSpec(
            method=method,
            sparsity=sparsity,
            target_recovery=target_recovery,
            grid=tuple(grid),
            exclude=tuple(exclude),
            head_patterns=tuple(head_patterns),
            value_dtype=value_dtype,
            learner=LearnerSpec.of(learner),
            routing_centroids=routing_centroids,
            low_rank=low_rank,
        )
        if method == "learned" and few_shot is None:
            raise SkillbankError("method='learned' needs few_shot=: a dataloader of labelled examples (e.g. 64 per class).")
        if not name:
            raise SkillNameError("name the skill the harvester should add (name=...).")
        if keep_examples < 0:
            raise SkillbankError(f"keep_examples is a count of examples a class (0: none), got {keep_examples}.")
        self.keep_examples, self.examples = keep_examples, examples
        self.bank, self.name, self.base = Path(bank), name, base
        self.few_shot, self.model_attr, self.task = few_shot, model_attr, task
        self.validation, self.routing = validation, routing
        self.finetuned_dir, self.keep_finetuned = finetuned_dir, keep_finetuned
        self.saved: Path | None = None  # where the finetuned weights went, on rank 0
        self.skill: Skill | None = None
        self._captured: dict[str, Tensor] | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(bank=str(self.bank), name=self.name)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if isinstance(trainer.strategy, ModelParallelStrategy):
            self._check_shardable()
        error = None
        if trainer.is_global_zero:
            try:
                if self.name in SkillBank(self.bank).names():
                    raise SkillNameError(
                        f"bank {self.bank} already has a skill {self.name!r}; pick another name= before training."
                    )
                if self.base is None:
                    model = wrapped_model(pl_module, self.model_attr)
                    if find_peft_model(model) is not None:  # a LoRA model: its weights as a plain model (B = 0 here)
                        model = merged_finetune(model).weights
                    # a Hugging Face model's head (outside .base_model) is task specific, not part of the base;
                    # a causal LM's head is the base's own LM head
                    state = (model if is_causal_lm(model) else getattr(model, "base_model", model)).state_dict()
                    self._captured = {k: v.detach().to("cpu", copy=True) for k, v in state.items() if is_float(v)}
            except SkillbankError as exc:
                error = exc
        raise_everywhere(trainer.strategy, error, "SkillHarvester")

    def _check_shardable(self) -> None:
        """Under FSDP2 the skill streams from the saved shards: a dataless mask of one size, and nothing else."""
        spec, unsupported = self.spec, []
        if spec.method != "dataless" or spec.auto:
            unsupported.append(f"method={spec.method!r} with sparsity={spec.sparsity!r}")
        if spec.low_rank:
            unsupported.append("low_rank")
        if self.routing is not None:
            unsupported.append("routing")
        if self.keep_examples:
            unsupported.append("keep_examples")
        if self.base is not None and not isinstance(self.base, (str, Path)):
            unsupported.append("a base given as a module or state dict")
        if unsupported:
            raise SkillbankError(
                f"under ModelParallelStrategy the harvester streams a dataless mask of one size from the sharded "
                f"weights; {', '.join(unsupported)} need(s) the whole model in one process. Harvest "
                f"method='dataless' with a number as sparsity (base= a folder or file, or captured), keep_finetuned=True, "
                f"then run skillbank localize on the kept folder for the rest."
            )

    def _save_sharded(self, trainer: pl.Trainer, model: torch.nn.Module) -> Path | None:
        """Every rank: write the sharded model's weights (and a captured base) to the run's finetuned folder, which
        rank 0 names; returns it on rank 0."""
        named = self._finetuned_folder(trainer) if trainer.is_global_zero else None
        folder = trainer.strategy.broadcast(named)  # every rank's copy of rank 0's choice
        assert folder is not None
        base = {BASE_FILE: self._captured} if self.base is None and self._captured is not None else None
        save_sharded_weights(model, folder, trainer.strategy, extra_files=base)
        return folder if trainer.is_global_zero else None

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.saved = None
        model = wrapped_model(pl_module, self.model_attr)
        sharded = is_sharded(model)
        if sharded:  # a collective: the weights are on disk before anything else may fail
            self.saved = self._save_sharded(trainer, model)

        def save_then_harvest() -> Skill:
            if sharded:
                return self.harvest(trainer, pl_module)
            merged = _plain_finetune(wrapped_model(pl_module, self.model_attr))
            base = None if self.base is not None else self._captured
            self.saved = save_finetune(merged[1], self._finetuned_folder(trainer), base)
            return self.harvest(trainer, pl_module, merged)

        try:
            skill = bank_on_rank_zero(trainer, self.bank, save_then_harvest, "SkillHarvester")
        except Exception as exc:
            if self.saved is not None:  # rank 0, trained weights on disk: say where, and how to go on
                _add_advice(exc, self._recovery_advice(self.saved))
            raise
        if skill is not None:  # rank 0
            self.skill = skill
            if self.saved is not None and not self.keep_finetuned:
                shutil.rmtree(self.saved, ignore_errors=True)
                self.saved = None

    def _finetuned_folder(self, trainer: pl.Trainer) -> Path:
        folder = Path(self.finetuned_dir) if self.finetuned_dir is not None else Path(trainer.default_root_dir) / "finetuned"
        target, n = folder / self.name, 0
        while target.exists():  # an earlier run's weights are never overwritten
            n += 1
            target = folder / f"{self.name}-{n}"
        return target

    def _base_file(self) -> str | Path | None:
        """The base as a file: the ``base=`` path, or the captured base saved beside the finetune; ``None`` for a base
        given as a module or state dict (it is not saved)."""
        if isinstance(self.base, (str, Path)):
            return self.base
        return self.saved / BASE_FILE if self.base is None and self.saved is not None else None

    def _recovery_advice(self, saved: Path) -> str:
        base = self._base_file() or "BASE (the base model's folder, which was passed as a module)"
        spec = self.spec
        sparsity = (
            "--sparsity auto --val-data VAL.jsonl (labelled validation texts)" if spec.auto else f"--sparsity {spec.sparsity}"
        )
        if spec.method != "dataless":
            sparsity += f" --method {spec.method}" + (
                " --few-shot FEW.jsonl (its labelled examples)" if spec.method == "learned" else ""
            )
        return (
            f"The finetuned weights are saved in {saved}; once the cause is fixed, bank them with: skillbank localize "
            f"--base {base} --finetuned {saved} --bank {self.bank} --name {self.name} {sparsity}"
        )

    def harvest(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, merged: tuple[Finetune, torch.nn.Module] | None = None
    ) -> Skill:
        """Localize the finetuned model (this process only) and return the skill, not yet banked: the run's
        arguments become a :class:`~skillbank.localization.spec.LocalizationSpec` and inputs, and
        :func:`~skillbank.localization.finetune.localize_finetune` does the rest, as for ``skillbank localize``.
        ``merged``: the model as :func:`_plain_finetune` gives it, when the caller has it already."""
        budget = wait_budget(trainer)
        deadline = None if budget is None else time.monotonic() + budget
        model = wrapped_model(pl_module, self.model_attr)
        base = self.base if self.base is not None else self._captured
        if base is None:
            raise SkillbankError(
                "no base weights: pass base=, or let the harvester capture them (fit set-up ran on another rank?)."
            )
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if not isinstance(v, Tensor) or v.numel() == 1}
        source = {
            "kind": "full finetune",
            "module": type(pl_module).__name__,
            "global_step": trainer.global_step,
            "epochs": trainer.current_epoch,
        }
        finetune, plain = merged if merged is not None else _plain_finetune(model)
        # the base with the finetuned head: copied once, for the routing features and the auto size search
        base_probe = functools.cache(lambda: apply_delta(copy.deepcopy(plain), load_weights(base), {}).eval())
        validation = self.validation if self.validation is not None else trainer.val_dataloaders
        if self.spec.auto and validation is None:
            raise SkillbankError(
                "sparsity='auto' needs validation data: give the fit a validation dataloader, or SkillHarvester(validation=...)."
            )
        inputs = LocalizationInputs(
            base=base,
            model=plain,
            few_shot=self.few_shot,
            validation=validation,
            probe=base_probe,
            time_limit=None if deadline is None else deadline - time.monotonic(),
            routing=self.routing,  # the base's features are what routes
        )
        # the weights saved before localizing are files: a dataless mask of a fixed size streams from them (memory
        # follows the skill), bit for bit the in-memory one. A merged LoRA stays in memory: its provenance and its
        # modules_to_save (the head) come with the merge, not with the files.
        sources: tuple[Any, Any] = (base, finetune)
        base_file = self._base_file()
        streamable = self.spec.method == "dataless" and not self.spec.auto and not finetune.source
        if streamable and self.saved is not None and base_file is not None:
            sources = (base_file, self.saved)
        try:
            skill = localize_finetune(
                *sources, self.spec, name=self.name, task=self.task, inputs=inputs, metrics=metrics, source=source
            )
        except TimeLimitError as exc:
            raise TimeLimitError(
                f"SkillHarvester: {exc} Under DDP rank 0 learns the mask alone while the other ranks wait for it, up to "
                "80% of the process group's timeout. Raise the timeout (Trainer(strategy=DDPStrategy(timeout=timedelta("
                "hours=2)))), learn on fewer few-shot batches or epochs, or harvest method='dataless' now and learn the "
                "mask afterwards in one process (MaskLearner(...).learn, or skillbank fit with a MaskLearner config)."
            ) from None
        if self.keep_examples:
            data = next((d for d in (self.examples, self.few_shot, validation) if d is not None), None)
            if data is None:
                raise SkillbankError(
                    "keep_examples needs labelled batches: SkillHarvester(examples=...), few_shot=, or a validation dataloader."
                )
            loaders = data if isinstance(data, (list, tuple)) and all(isinstance(d, DataLoader) for d in data) else [data]
            pad = getattr(getattr(plain, "config", None), "pad_token_id", None) or 0
            skill = replace(
                skill, examples=examples_from_batches(itertools.chain(*loaders), self.keep_examples, pad_token_id=pad)
            )
        return skill
