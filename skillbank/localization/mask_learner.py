"""Learned localization: a LightningModule that learns which entries of ``τ`` carry a skill.

The model is evaluated at ``θ_pre + σ(S) ⊙ τ`` through
:func:`torch.func.functional_call`; ``θ_pre`` lives in the model's own (frozen)
parameters, ``τ`` is one frozen flat tensor, and the flat scores ``S`` are the
only trainable tensor, so DDP all-reduces mask gradients and nothing else. Under
Lightning's ``ModelParallelStrategy`` (FSDP2) ``configure_model`` splits them tensor
by tensor into the blocks that use them and shards those
(:mod:`skillbank.localization.sharded_scores`), so each rank keeps ``1/world`` of them.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from dataclasses import replace
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn
from torch.func import functional_call
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from skillbank.devices import device_of
from skillbank.errors import BaseMismatchError, SkillbankError, SkillNameError, TaskVectorError, TimeLimitError
from skillbank.localization.causal_lm import NextTokenAccuracy, is_causal_lm, with_lm_labels
from skillbank.localization.context_loss import ContextExamples
from skillbank.localization.localize import skill_from_task_vector
from skillbank.localization.sharded_scores import ShardedScores, shard_scores
from skillbank.localization.spec import LocalizationSpec
from skillbank.sharding import data_parallel_mesh, shard_model
from skillbank.sparse import global_topk, num_selected, topk_positions
from skillbank.stitching.overlap import get_rule
from skillbank.storage.bank import SkillBank, check_skill_name
from skillbank.storage.ranks import bank_on_rank_zero, raise_everywhere
from skillbank.storage.skill import Region, Skill
from skillbank.vectors.adapters import find_peft_model, is_adapter_folder, merged_finetune
from skillbank.vectors.models import load_model
from skillbank.vectors.task_vectors import TaskVector, matches, task_vector
from skillbank.vectors.weights import WeightsSource, align_names, load_weights

__all__ = ["MaskLearner"]

LossFn = Callable[[Tensor, Tensor], Tensor]
_NO_UPDATES = (
    "no update was made to the mask: the few-shot dataloader yielded no batches "
    "(is the dataset empty, or limit_train_batches=0?)."
)


class MaskLearner(pl.LightningModule):
    """Learns a skill's mask on a few labelled examples, then returns it as a :class:`Skill`.

    Args:
        model: the finetuned model (module, or a local Hugging Face folder loaded
            as a sequence classifier). Its shared parameters are reset to the
            base in place; its head keeps the finetuned values.
        base: the base weights (folder, file, module or state dict).
        finetuned: where ``τ`` comes from if not ``model``'s own weights: weights or a
            :class:`TaskVector` (its head is then loaded into ``model``).
        spec: what to learn: ``sparsity`` (the fraction of the eligible entries in the final
            mask), ``exclude`` (regexes of shared parameter names that get no score: never in
            the mask, kept at the base), ``value_dtype`` and ``learner`` (recipe, pool, … — see
            :class:`~skillbank.localization.spec.LearnerSpec`). A
            :class:`~skillbank.localization.spec.LocalizationSpec` or its fields, e.g.
            ``{"sparsity": 0.02, "learner": {"pool": 30}}``; default 1% with the ``topk`` recipe.
        loss_fn: ``loss_fn(logits, target)``; without it the model's own loss is
            used (Hugging Face: ``labels`` in the batch -> ``outputs.loss``). A causal
            LM gets its next-token loss; a batch without ``labels`` is labelled with its
            ``input_ids``, padding ignored (:mod:`skillbank.localization.causal_lm`).
        metric: a torchmetrics metric of ``(logits, target)``; default accuracy over
            ``num_labels`` classes (taken from ``model.config`` when not given), or
            next-token accuracy for a causal LM.
        bank, skill_name, task: when ``bank`` is set, the skill is added to it at
            the end of fitting, by rank 0 only.
        context: skills already stitched into the model this skill will join. The
            mask is then learned against that model: the forward pass sees the
            earlier skills combined with the new one by ``spec.learner.rule``
            (differentiably in the soft mask, exactly at a binary one), so the mask is
            chosen for where it will live. Earlier skills are read only, never changed.
            With ``spec.learner.context_weight`` > 0 their loss on the examples they keep
            joins the objective (:mod:`~skillbank.localization.context_loss`).

    The learner works on its model's device (``τ`` computed elsewhere is brought
    there); a Trainer then moves all of it to its accelerator, as with any module.
    Batches are mappings (the target under ``"labels"``) or ``(inputs, target)`` pairs.
    The wrapped model always runs in eval mode (no dropout), as in the paper,
    so the mask gradient does not depend on the process or device count.
    """

    # buffers registered in __init__ (typed here: nn.Module's attribute lookup is untyped)
    scored: Tensor
    _pool_local: Tensor
    context_acc: Tensor
    context_count: Tensor

    def __init__(
        self,
        model: nn.Module | str,
        base: WeightsSource,
        finetuned: WeightsSource | TaskVector | None = None,
        spec: LocalizationSpec | Mapping[str, Any] | None = None,
        *,
        loss_fn: LossFn | None = None,
        metric: Metric | None = None,
        num_labels: int | None = None,
        bank: str | None = None,
        skill_name: str | None = None,
        task: str = "",
        context: Sequence[Skill] = (),
    ) -> None:
        super().__init__()
        self.spec = spec = _learned_spec(spec)
        # every argument that is plain data, so load_from_checkpoint(path) rebuilds the learner from folders
        # (pass model=/base=/... again where they were modules or tensors)
        objects = [
            n
            for n, v in (("model", model), ("base", base), ("finetuned", finetuned))
            if not isinstance(v, (str, os.PathLike, type(None)))
        ]
        self.save_hyperparameters(ignore=[*objects, "loss_fn", "metric", "context"])
        self.hparams["spec"] = spec.to_dict()
        learner = spec.learner
        self.sparsity = float(spec.sparsity)
        self.recipe = learner.mask_recipe()
        if bank is not None and not skill_name:
            raise SkillbankError("bank is set but skill_name is not: name the skill the learner should add.")
        if skill_name is not None:
            check_skill_name(skill_name)
        self.exclude = spec.exclude
        self.keep_best = learner.keep_best
        self.loss_fn = loss_fn
        self.bank, self.skill_name, self.task, self.value_dtype = bank, skill_name, task, spec.value_dtype
        self.automatic_optimization = False
        self.rule = get_rule(learner.rule)
        self.owned_penalty = float(learner.owned_penalty)
        self.context_names = [c.name for c in context]
        self.context_weight = float(learner.context_weight)
        self.context_examples = ContextExamples.of(context, learner.context_loss) if self.context_weight else None
        self.last_context_loss: float | None = None
        if learner.pool is not None and context:
            raise SkillbankError("a pool with context= is not supported: learn in context over every entry.")
        self.pool, self.pool_small = learner.pool, int(learner.pool_small)

        adapter = merged_finetune(model, base) if is_adapter_folder(model) or find_peft_model(model) is not None else None
        self.model = load_model(adapter.weights if adapter else model, num_labels)  # a PEFT model: its merged copy
        self.model.requires_grad_(False)
        self.causal_lm = is_causal_lm(self.model)  # next-token loss and metric (skillbank.localization.causal_lm)
        own = adapter or self.model
        tv = finetuned if isinstance(finetuned, TaskVector) else task_vector(base, own if finetuned is None else finetuned)
        self._names = self._reset_to_base(tv, base, finetuned is not None)
        self._tv, self._layout, tau = self._flatten(tv)
        del tv  # its τ now lives in the flat tensor alone (unless the caller holds the TaskVector it gave)
        self.num_eligible = tau.numel()
        self.k = num_selected(self.sparsity, self.num_eligible)
        if self.pooled:
            scored = self._candidates(tau)
            tau = tau[scored]
            self.register_buffer("scored", scored)  # ascending flat positions of the pool (checkpointed)
            self.register_buffer("_pool_local", scored - self._starts_of(scored), persistent=False)
            self._pool_counts = self._per_tensor_counts(scored)
        self.pool_entries = tau.numel() if self.pooled else None
        self.tau = nn.Parameter(tau, requires_grad=False)
        self.scores = nn.Parameter(self._initial_scores(tau))
        self.shards: ShardedScores | None = None  # set by configure_model under ModelParallelStrategy
        if context:
            acc, count = self._context_state(context, self._tv)
            self.register_buffer("context_acc", acc, persistent=False)
            self.register_buffer("context_count", count, persistent=False)
        self.val_acc = metric if metric is not None else self._default_metric(num_labels)
        self.val_acc_soft = copy.deepcopy(self.val_acc)
        self.skill: Skill | None = None
        self._updates = 0
        self._binary: Tensor | None = None
        self._binary_indices: dict[str, Tensor] = {}
        self._chosen: list[Tensor] = []  # sharded: this rank's part of the epoch's binary mask
        self._chosen_size = 0
        self._best: tuple[float, int, dict[str, Tensor]] | None = None  # (val_acc, epoch, indices)

    # ---- set-up -------------------------------------------------------------------------------

    def _reset_to_base(self, tv: TaskVector, base: WeightsSource, load_head: bool) -> dict[str, str]:
        """Write ``θ_pre`` into the model's shared parameters (and the head if ``τ`` came from elsewhere)."""
        params = dict(self.model.named_parameters())
        names = align_names(list(tv.names.values()), params)
        missing = [f for f in tv.names.values() if f not in names]
        if missing:
            raise TaskVectorError(
                f"the model has no parameter for {len(missing)} shared tensor(s) of the task vector, e.g. {missing[:3]}; "
                "give the architecture the finetune was made with."
            )
        base_state = load_weights(base)
        model_names = {b: names[f] for b, f in tv.names.items()}
        with torch.no_grad():
            for b, m in model_names.items():
                if params[m].shape != tv.shared[b].shape:
                    raise TaskVectorError(
                        f"model parameter {m!r} has shape {tuple(params[m].shape)}, τ has {tuple(tv.shared[b].shape)}."
                    )
                params[m].copy_(base_state[b])
            if load_head:
                head_names = align_names(list(tv.head), params)
                for h, t in tv.head.items():
                    if h not in head_names or params[head_names[h]].shape != t.shape:
                        raise TaskVectorError(f"head tensor {h!r} {tuple(t.shape)} has no same-shaped parameter in the model.")
                    params[head_names[h]].copy_(t)
        return model_names

    def _flatten(self, tv: TaskVector) -> tuple[TaskVector, list[tuple[str, int, int]], Tensor]:
        """One flat ``τ`` over the eligible shared tensors, their layout, and ``tv`` without its tensors."""
        eligible = [b for b in tv.shared if not matches(b, self.exclude)]
        if not eligible:
            raise TaskVectorError(
                f"no shared floating-point parameter is left to score (exclude={list(self.exclude)}); "
                "check the base model and the exclude patterns."
            )
        # the learner works where its model lives (a τ computed elsewhere is brought here once)
        device = device_of(self.model.parameters())
        tau = torch.cat([tv.shared[b].reshape(-1).to(device) for b in eligible])
        layout, start = [], 0
        for b in eligible:
            layout.append((b, start, tv.shared[b].numel()))
            start += tv.shared[b].numel()
        shapes = {b: torch.empty(t.shape, device="meta") for b, t in tv.shared.items()}
        return replace(tv, shared=shapes), layout, tau

    @property
    def pooled(self) -> bool:
        """Whether the learner scores a candidate pool rather than every entry."""
        return self.pool is not None

    @property
    def state_nbytes(self) -> int:
        """Bytes of what the learner keeps per scored entry: ``τ``, the scores, Adam's two moments (the scores' size
        each, whether or not a step has made them yet) and, with a pool, its global and local positions. Sharded:
        this rank's part (the pool's positions within each tensor, and the best mask's bit per entry as a byte)."""
        if self.shards is not None:
            return self.shards.local_nbytes
        scores = self.scores.numel() * self.scores.element_size()
        pool = [self.scored, self._pool_local] if self.pooled else []
        return self.tau.numel() * self.tau.element_size() + 3 * scores + sum(t.numel() * t.element_size() for t in pool)

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (FSDP2): give each scored tensor its slice of ``τ`` and of the scores and
        shard the model block by block with them (``fully_shard``), so each rank keeps ``1/world`` of the base,
        ``τ``, the scores and Adam's moments; any other strategy keeps the flat, replicated state."""
        mesh = self.device_mesh
        if mesh is None or self.shards is not None:
            return
        from torch.distributed.fsdp import fully_shard

        data_mesh = data_parallel_mesh(mesh)
        if self.context_names:
            raise SkillbankError("context= is not supported under ModelParallelStrategy: learn in context with DDP.")
        tau, scores = self.tau.detach(), self.scores.detach()
        counts = self._pool_counts if self.pooled else [n for _, _, n in self._layout]
        local = torch.split(self._pool_local, counts) if self.pooled else [None] * len(counts)
        tensors = [  # views of the flat tensors: fully_shard copies out each rank's part, then the flat ones are freed
            (b, t, s, p)
            for (b, _, _), t, s, p in zip(self._layout, torch.split(tau, counts), torch.split(scores, counts), local)
            if t.numel()
        ]
        del self.tau, self.scores, tau, scores, local  # the flat copies go: each rank keeps its shards only
        if self.pooled:
            del self.scored, self._pool_local
        shards = shard_scores(self.model, self._names, tensors, self._penalty, self.keep_best)
        del tensors
        shard_model(self.model, data_mesh)
        if len(shards.best):
            fully_shard(shards, mesh=data_mesh)
        shards.connect(data_mesh.get_group(), self.model)
        self.shards = shards

    def _penalty(self, gate: Tensor) -> Tensor:
        """One sharded tensor's share of the recipe's penalty (the shares sum to :meth:`regularizer`'s)."""
        if self.recipe.regularizer == "mean_sigmoid":
            return self.recipe.l1 * gate.sum() / self.num_eligible
        return -(self.recipe.l1 / self.recipe.lr) * (gate - 0.5).abs().sum()

    def _candidates(self, tau: Tensor) -> Tensor:
        """The pool: ascending flat positions of the top ``pool · k`` of ``|τ|``, plus small tensors whole."""
        assert self.pool is not None
        size = min(tau.numel(), math.ceil(self.pool * self.k))
        parts = [topk_positions(tau.abs(), size)]
        parts += [torch.arange(start, start + n, device=tau.device) for _, start, n in self._layout if n <= self.pool_small]
        return torch.unique(torch.cat(parts)) if len(parts) > 1 else parts[0]

    def _starts_of(self, positions: Tensor) -> Tensor:
        """For each ascending flat position, the start of the tensor it falls in."""
        starts = torch.tensor([start for _, start, _ in self._layout], device=positions.device)
        return starts[torch.searchsorted(starts, positions, right=True) - 1]

    def _per_tensor_counts(self, positions: Tensor) -> list[int]:
        """How many of the ascending flat ``positions`` fall in each tensor of the layout."""
        bounds = torch.tensor([start for _, start, _ in self._layout] + [self.num_eligible], device=positions.device)
        return torch.searchsorted(positions, bounds).diff().tolist()

    def _per_tensor(self, positions: Tensor) -> dict[str, Tensor]:
        """Ascending flat positions as ``{base name: local indices}`` over the layout."""
        parts = torch.split(positions, self._per_tensor_counts(positions))
        return {b: part - start for (b, start, _), part in zip(self._layout, parts)}

    def _context_state(self, context: Sequence[Skill], tv: TaskVector) -> tuple[Tensor, Tensor]:
        """The rule's accumulators and the cover count of the earlier skills, flat over the scored entries."""
        # a rule without a differentiable form fails here, before any work
        zero = torch.zeros(1, device="cpu")
        self.rule.relaxed(torch.zeros(1, self.rule.columns, device="cpu"), zero, zero, zero)
        if self.exclude:
            raise SkillbankError("context= with exclude= is not supported: learn in context over every shared tensor.")
        starts = {b: start for b, start, _ in self._layout}
        device = self.tau.device
        acc = torch.zeros(self.tau.numel(), self.rule.columns, dtype=torch.float64, device=device)
        count = torch.zeros(self.tau.numel(), dtype=torch.float64, device=device)
        for skill in context:
            if skill.metadata.base_fingerprint != tv.base_fingerprint:
                raise BaseMismatchError(f"context skill {skill.name!r} was localized on another base than this finetune.")
            for b, region in skill.regions.items():
                if not len(region):
                    continue
                if b not in starts or skill.metadata.shapes.get(b) != list(tv.shared[b].shape):
                    raise TaskVectorError(f"context skill {skill.name!r} covers {b!r}, which this task vector does not share.")
                positions = region.indices.to(device, torch.int64) + starts[b]
                rows = acc.index_select(0, positions)
                self.rule.update(rows, region.values.to(device, torch.float64), 1)
                acc.index_copy_(0, positions, rows)
                count.index_add_(0, positions, torch.ones(positions.numel(), dtype=torch.float64, device=device))
        return acc.float(), count.float()

    def _initial_scores(self, tau: Tensor) -> Tensor:
        start = self.recipe.init_sparsity or self.sparsity
        # the start's size counts every eligible entry; a pool holds the top of |τ|, so its top is the global top
        chosen = topk_positions(tau.abs(), min(tau.numel(), num_selected(start, self.num_eligible)))
        scores = torch.full_like(tau, -self.recipe.init_scale)
        scores[chosen] = self.recipe.init_scale
        return scores

    def _default_metric(self, num_labels: int | None) -> Metric:
        if self.causal_lm:
            return NextTokenAccuracy()
        num_labels = num_labels or getattr(getattr(self.model, "config", None), "num_labels", None)
        if not num_labels:
            raise SkillbankError("cannot tell the number of classes: pass num_labels= or metric=.")
        return MulticlassAccuracy(num_classes=num_labels, average="micro")

    def train(self, mode: bool = True) -> MaskLearner:
        """Switch the learner; the wrapped model stays in eval mode (no dropout)."""
        super().train(mode)
        self.model.eval()
        return self

    # ---- the masked model ---------------------------------------------------------------------

    def masked_weights(self, gate: Tensor) -> dict[str, Tensor]:
        """``{model name: θ_pre + gate ⊙ τ}`` for every scored tensor (``gate`` is flat)."""
        # torch.split, not slicing: its backward writes one flat gradient, where each
        # slice's backward would allocate and fill a full-length zero tensor (10x slower).
        if self.context_names:
            delta = self.rule.relaxed(self.context_acc, self.context_count, gate, self.tau)
        else:
            delta = gate * self.tau
        params = dict(self.model.named_parameters())
        out = {}
        if self.pooled:  # τ only at the pool's entries: added where they are, the rest stays at the base
            parts = torch.split(delta, self._pool_counts)
            locals_ = torch.split(self._pool_local, self._pool_counts)
            for (b, _, _), part, local in zip(self._layout, parts, locals_):
                if part.numel():
                    p = params[self._names[b]]
                    out[self._names[b]] = p.float().reshape(-1).index_add(0, local, part).view(p.shape).to(p.dtype)
            return out
        parts = torch.split(delta, [numel for _, _, numel in self._layout])
        for (b, _, _), part in zip(self._layout, parts):
            p = params[self._names[b]]
            out[self._names[b]] = (p.float() + part.view(p.shape)).to(p.dtype)
        return out

    def forward(self, batch: Any, gate: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(loss, logits, target)`` of the model at ``θ_pre + gate ⊙ τ`` (default gate ``σ(S)``; sharded, the gate
        is the parametrizations': ``σ(S)``, or the binary mask within ``shards.binary_gates()``)."""
        if self.shards is None:
            weights = self.masked_weights(torch.sigmoid(self.scores) if gate is None else gate)
        else:
            self.shards.state.penalties.clear()  # this forward's shares only (regularizer() sums them)

        def run(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if self.shards is not None:  # the scored tensors' parametrizations give θ_pre + gate ⊙ τ
                return self.model(*args, **kwargs)
            return functional_call(self.model, weights, args=args, kwargs=kwargs, strict=False)

        if isinstance(batch, Mapping):
            if self.causal_lm:
                batch = with_lm_labels(batch)  # input_ids as labels, padding ignored, unless the batch has its own
            target = batch.get("labels")
            inputs = dict(batch) if self.loss_fn is None else {k: v for k, v in batch.items() if k != "labels"}
            out = run((), inputs)
        else:
            *inputs, target = batch
            out = run(tuple(inputs), {})
        logits = getattr(out, "logits", out)
        logits = logits[0] if isinstance(logits, (tuple, list)) else logits
        if self.loss_fn is not None:
            loss = self.loss_fn(logits, target)
        else:
            own_loss = getattr(out, "loss", None)
            if own_loss is None:
                raise SkillbankError(
                    "the model returned no loss: put the target under 'labels' in the batch of a Hugging Face "
                    "model, or pass loss_fn= (e.g. torch.nn.CrossEntropyLoss())."
                )
            loss = own_loss
        return loss, logits, target

    def context_loss(self) -> Tensor:
        """The earlier skills' loss on the examples they keep, in the model holding them and this skill's mask.

        The loss is taken at the binary mask the scores give now (their top k, or ``S > 0``), what the skill will
        stitch, with the soft mask's gradient (a straight-through estimate): at the soft mask a smaller ``σ(S)``
        everywhere would lower it without changing which k entries are chosen."""
        assert self.context_examples is not None
        soft = torch.sigmoid(self.scores)
        gate = self._gate_of(self.binary_mask()) + soft - soft.detach()
        return self.context_examples.loss(
            self.model, self.masked_weights(gate), lambda: self.masked_weights(torch.zeros_like(gate))
        )

    def regularizer(self) -> Tensor:
        """The recipe's penalty on the scores (sharded: the sum of the shares the last training forward recorded)."""
        if self.shards is not None:
            return self.shards.penalty()
        gate = torch.sigmoid(self.scores)
        owned: Tensor | float = 0.0
        if self.owned_penalty and self.context_names:
            owned = self.owned_penalty * (gate * (self.context_count > 0)).mean()
        if self.recipe.regularizer == "mean_sigmoid":
            # the mean over every eligible entry: a pool's entries feel the pull they would feel in full scoring
            mean = gate.sum() / self.num_eligible if self.pooled else gate.mean()
            return self.recipe.l1 * mean + owned
        # d/dS |σ(S) - ½| = sign(S)·σ'(S): one plain step of lr on this term is the paper's S += λ·sign(S)·σ'(S).
        return -(self.recipe.l1 / self.recipe.lr) * (gate - 0.5).abs().sum() + owned

    def binary_mask(self) -> dict[str, Tensor]:
        """Sorted flat indices per base name of the final mask (top-k of ``S``, or ``S > 0``)."""
        if self.shards is not None:
            raise SkillbankError("the scores are sharded: take the mask with to_skill(), which gathers it.")
        scores = self.scores.detach()
        if self.pooled:
            chosen = topk_positions(scores, self.k) if self.recipe.binarize == "topk" else torch.nonzero(scores > 0).squeeze(1)
            return self._per_tensor(self.scored[chosen])
        views = {b: scores[s : s + n] for b, s, n in self._layout}
        if self.recipe.binarize == "topk":
            return global_topk(views, self.k)
        return {b: torch.nonzero(v > 0).squeeze(1) for b, v in views.items()}

    def _gate_of(self, indices: Mapping[str, Tensor]) -> Tensor:
        gate = torch.zeros_like(self.tau)
        flat = torch.cat([indices[b] + start for b, start, _ in self._layout])
        gate[torch.searchsorted(self.scored, flat) if self.pooled else flat] = 1.0
        return gate

    # ---- training -----------------------------------------------------------------------------

    def configure_optimizers(self) -> torch.optim.Optimizer:
        scores = [self.scores] if self.shards is None else list(self.shards.scores())
        if self.recipe.optimizer == "adam":
            return torch.optim.Adam(scores, lr=self.recipe.lr)
        return torch.optim.SGD(scores, lr=self.recipe.lr)

    def _group_size(self, batch_idx: int, total: float) -> tuple[int, bool]:
        """How many batches the current update averages, and whether this batch closes it."""
        if not self.recipe.full_batch:
            return 1, True
        if total == float("inf"):
            raise SkillbankError("the full-batch recipe needs a few-shot loader with a length (a map-style dataset).")
        return int(total), batch_idx + 1 == int(total)

    def _step(self, batch: Any, batch_idx: int, total: float, optimizer: Any, backward: Callable[[Tensor], None]) -> Tensor:
        """Loss and backward of one batch; an optimizer step when it closes the update's group."""
        task_loss, _, _ = self(batch)
        size, last = self._group_size(batch_idx, total)
        loss = (task_loss + self.regularizer()) / size
        if last and self.context_examples is not None:  # once an update: the earlier skills' kept examples
            context_loss = self.context_loss()
            self.last_context_loss = float(context_loss.detach())
            loss = loss + self.context_weight * context_loss
        backward(loss)
        if last:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            self._updates += 1
        return task_loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        task_loss = self._step(batch, batch_idx, self.trainer.num_training_batches, self.optimizers(), self.manual_backward)
        self.log("train_loss", task_loss, prog_bar=True)
        if self.last_context_loss is not None:
            self.log("context_loss", self.last_context_loss)
        return task_loss

    def learn(
        self, loader: Iterable[Any], epochs: int | None = None, name: str | None = None, *, time_limit: float | None = None
    ) -> Skill:
        """Fit in this process without a Trainer (e.g. inside another run's callback) and return the skill.

        Same updates as under a Trainer, on the learner's current device; no
        validation, no logging. Use a Trainer for multi-device runs.
        ``time_limit`` (seconds): stop with an error, as early as it can be told,
        when the whole fit would take longer (the time so far, projected over every
        step when the loader has a length): for callers that others wait on.
        """
        if self.shards is not None:
            raise SkillbankError("a sharded learner trains under its Trainer (ModelParallelStrategy), not learn().")
        optimizer = self.configure_optimizers()
        device = self.scores.device
        total = len(loader) if isinstance(loader, Sized) else float("inf")
        num_epochs = self.recipe.epochs if epochs is None else epochs
        started, steps = time.perf_counter(), 0
        self.train()
        for _ in range(num_epochs):
            for batch_idx, batch in enumerate(loader):
                batch = move_data_to_device(batch, device)
                self._step(batch, batch_idx, total, optimizer, lambda loss: loss.backward())
                steps += 1
                if time_limit is not None:
                    self._check_time(time.perf_counter() - started, steps, total * num_epochs, time_limit)
        if self._updates == 0:
            raise SkillbankError(_NO_UPDATES)
        self.skill = self.to_skill(name or self.skill_name or "learned")
        return self.skill

    @staticmethod
    def _check_time(elapsed: float, steps: int, all_steps: float, limit: float) -> None:
        projected = elapsed / steps * all_steps if math.isfinite(all_steps) else elapsed
        if projected > limit:
            raise TimeLimitError(
                f"learning this mask would take about {projected / 60:.1f} min ({steps} of "
                f"{all_steps if math.isfinite(all_steps) else 'an unknown number of'} steps took {elapsed:.1f} s), "
                f"more than the {limit / 60:.1f} min allowed."
            )

    def _top_k(self) -> int | None:
        """The binary mask's size: ``k`` for the top-k binarization, None for ``S > 0``."""
        return self.k if self.recipe.binarize == "topk" else None

    def on_validation_epoch_start(self) -> None:
        if self.shards is not None:
            self._chosen, self._chosen_size = self.shards.choose(self._top_k())
            return
        self._binary_indices = self.binary_mask()
        self._binary = self._gate_of(self._binary_indices)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            _, soft_logits, target = self(batch)
            if self.shards is not None:
                with self.shards.binary_gates():
                    _, logits, _ = self(batch)
            else:
                _, logits, _ = self(batch, gate=self._binary)
        self.val_acc_soft(soft_logits, target)
        self.val_acc(logits, target)
        self.log("val_acc_soft", self.val_acc_soft, prog_bar=True)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        if self.shards is not None:
            size, positive = self._chosen_size, self.shards.count_positive()
        else:
            assert self._binary is not None  # made at the epoch's start
            size, positive = int(self._binary.sum()), int((self.scores.detach() > 0).sum())
        self.log("mask_density", size / self.num_eligible, rank_zero_only=True)
        self.log("mask_density_round", positive / self.num_eligible, rank_zero_only=True)
        if not self.trainer.sanity_checking:
            value = float(self.val_acc.compute())  # synced over ranks, so every rank keeps the same mask
            if self._best is None or value >= self._best[0]:
                self._best = (value, self.current_epoch, {b: i.clone() for b, i in self._binary_indices.items()})
                if self.shards is not None and self.keep_best:
                    self.shards.remember_best(self._chosen)  # each rank its part, saved with the scores
        self._binary, self._binary_indices, self._chosen = None, {}, []

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep what the scores alone do not hold: the update count and the best-validating mask so far."""
        best = None
        if self._best is not None:
            indices = None if self.shards is not None else {b: i.cpu() for b, i in self._best[2].items()}
            best = {"val_acc": self._best[0], "epoch": self._best[1], "indices": indices}
        checkpoint["mask_learner"] = {"updates": self._updates, "best": best}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore them, so a resumed run keeps the best mask found before the interruption."""
        state = checkpoint.get("mask_learner")
        if state is None:
            return
        self._updates = int(state["updates"])
        best = state["best"]
        self._best = (
            None
            if best is None
            else (float(best["val_acc"]), int(best["epoch"]), {b: i.to(self.device) for b, i in (best["indices"] or {}).items()})
        )

    def setup(self, stage: str) -> None:
        """Before any training: the skill's name must be free in the bank (not found out after the last epoch)."""
        if stage != "fit" or self.bank is None:
            return
        error = None
        if self.trainer.is_global_zero:
            try:
                bank = SkillBank.if_exists(self.bank)
                if bank is not None and self.skill_name in bank:
                    raise SkillNameError(
                        f"bank {self.bank} already has a skill {self.skill_name!r}; pick another "
                        "skill_name (or remove that skill) before training."
                    )
            except SkillbankError as exc:
                error = exc
        raise_everywhere(self.trainer.strategy, error, "MaskLearner")

    # ---- result -------------------------------------------------------------------------------

    def on_fit_end(self) -> None:
        if self._updates == 0:
            raise SkillbankError(_NO_UPDATES)
        skill = self.skill = self.to_skill(self.skill_name or "learned")  # every rank holds the same mask
        if self.bank is not None:
            bank_on_rank_zero(self.trainer, self.bank, lambda: skill, "MaskLearner")

    def to_skill(self, name: str, **skill_fields: Any) -> Skill:
        """The learned mask as a :class:`Skill`, with the recipe and the validation metrics (sharded: a collective,
        called on every rank, each of which gets the skill)."""
        best = self._best if self.keep_best else None
        if self.shards is not None:  # each rank's part of the mask, gathered tensor by tensor
            local = self.shards.best_chosen() if best is not None else self.shards.choose(self._top_k())[0]
            gathered = self.shards.regions(local)
            empty = Region(torch.empty(0, dtype=torch.int64, device="cpu"), torch.empty(0, device="cpu"))
            regions = {b: gathered.get(b, empty) for b in self._tv.shared}  # the flat learner's order
        else:
            regions = self._regions(best[2] if best is not None else self.binary_mask())
        chosen = sum(len(r) for r in regions.values())
        if chosen == 0:
            raise SkillbankError("the learned mask is empty (every score is below 0); use the 'topk' binarization.")
        metrics = {}
        if self._trainer is not None:
            metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith(("val_", "mask_"))}
        settings = {
            "spec": self.spec.to_dict(),
            **self.recipe.to_dict(),
            "k": chosen,
            "exclude": list(self.exclude),
            "updates": self._updates,
            "target_sparsity": self.sparsity,
            "selected_epoch": best[1] if best is not None else "last",
        }
        if self.context_names:
            settings.update(context=self.context_names, rule=self.rule.name, owned_penalty=self.owned_penalty)
            if self.context_examples is not None:
                settings.update(context_weight=self.context_weight, context_loss=self.context_examples.loss_kind)
        if best is not None:
            metrics["val_acc"] = best[0]
        if self.pooled:
            settings.update(pool=self.pool, pool_small=self.pool_small, pool_entries=self.pool_entries)
        fields = {"task": self.task, "metrics": metrics, "value_dtype": self.value_dtype, **skill_fields}
        sparsity = self.sparsity if self.recipe.binarize == "topk" else chosen / self.num_eligible
        return skill_from_task_vector(
            self._tv, regions, name=name, sparsity=sparsity, method="learned", settings=settings, **fields
        )

    def _regions(self, indices: Mapping[str, Tensor]) -> dict[str, Region]:
        """Each shared tensor's chosen local indices and their ``τ`` (from the flat ``τ``: at the entry's flat
        position, or at its place in the pool, which holds every chosen entry)."""
        tau, starts = self.tau.detach(), {b: start for b, start, _ in self._layout}
        regions = {}
        for b in self._tv.shared:
            idx = indices.get(b, torch.empty(0, dtype=torch.int64, device="cpu")).to("cpu", torch.int64)
            values = torch.empty(0, device="cpu")
            if idx.numel():
                flat = idx.to(tau.device) + starts[b]
                values = tau[torch.searchsorted(self.scored, flat) if self.pooled else flat]
            regions[b] = Region(idx, values.to("cpu", torch.float32))
        return regions


def _learned_spec(spec: LocalizationSpec | Mapping[str, Any] | None) -> LocalizationSpec:
    """``spec`` as the spec of a learned mask of one size (the learner always learns: its method is ``"learned"``,
    whatever the spec's default said, as a config that gives only a size and learner options means)."""
    if spec is None or isinstance(spec, Mapping):
        spec = LocalizationSpec.from_dict({**(spec or {}), "method": "learned"})
    if spec.auto:
        raise SkillbankError(
            "MaskLearner learns a mask of one size; for sparsity='auto' call localize_finetune (or skillbank localize "
            "--method learned --sparsity auto), which searches the sizes."
        )
    return spec if spec.method == "learned" else replace(spec, method="learned")
