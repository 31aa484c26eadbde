"""The privacy audit's data: members, non-members and canaries of a run, and the audit at the end of training.

:class:`AuditSets` selects the examples (:mod:`jaxdp.audit` has the attacks and the bounds): members are training
examples, non-members and canaries are held out; each canary joins the training pool by a fair coin drawn from the
run's secret. The results are statistics of the training data computed without noise (``final.json``'s
``audit.nonprivate``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxdp import fairness, parallel
from jaxdp.plan import AUDIT_STREAM, child_seed
from jaxdp.runlog import json_safe
from jaxdp.steps import inputs_of


def gather(array: jax.Array) -> jax.Array:
    """``array`` from every process (multi-host runs), concatenated along its leading axis."""
    if jax.process_count() == 1:
        return array
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(array, tiled=True)


def check_audit_capacity(config, capacity: dict[int, int], names: tuple[str, str]) -> int:
    """Held-out examples per group the audit needs (non-members + canaries); refuses, with the numbers that would
    work, when the data has fewer."""
    a = config.audit
    need = int(a.mia_examples_per_group) + int(a.canaries_per_group)
    have = min(capacity.values())
    if need > have:
        raise ValueError(
            f"config.audit needs {a.mia_examples_per_group} non-members + {a.canaries_per_group} canaries = {need} "
            f"held-out examples per group, but config.data leaves {capacity[0]} ({names[0]}) and {capacity[1]} "
            f"({names[1]}) outside its training and test sets: set config.audit.mia_examples_per_group + "
            f"config.audit.canaries_per_group <= {have}, or enlarge the pool (e.g. config.data.synthetic_num_images)."
        )
    return need


@dataclasses.dataclass
class AuditSets:
    """The examples of a run's privacy audit: members (training examples), non-members and canaries (held out).

    Canaries join the training pool by fair coins drawn from the run's secret (from ``train.seed`` when
    ``dp.reproducible``); the coins are never written anywhere (they follow from the secret in the checkpoints).
    Which training examples serve as members is public (``train.seed``): it is part of the evaluation, not of
    training.
    """

    members: Any  # split (inputs, label, group): training examples
    nonmembers: Any
    canaries: Any
    coins: np.ndarray  # bool per canary: included in training

    @classmethod
    def build(cls, config, train_set, holdout, secret: int | None) -> AuditSets:
        from jaxdp import audit

        if holdout is None:
            raise ValueError("config.audit.enabled=True needs held-out examples: let train_and_evaluate load "
                             "config.data, or pass datasets=(train, test, holdout).")
        a = config.audit
        m, c = int(a.mia_examples_per_group), int(a.canaries_per_group)
        public = np.random.default_rng(np.random.SeedSequence([int(config.train.seed), AUDIT_STREAM]))
        members, nonmembers, canaries = [], [], []
        for g in fairness.GROUPS:
            in_train = np.flatnonzero(np.asarray(train_set.group) == g)
            in_holdout = public.permutation(np.flatnonzero(np.asarray(holdout.group) == g))
            if m > len(in_train) or m + c > len(in_holdout):
                raise ValueError(
                    f"config.audit needs {m} members of group {g} (the training set has {len(in_train)}) and "
                    f"{m} + {c} held-out examples (there are {len(in_holdout)}): lower "
                    f"config.audit.mia_examples_per_group / canaries_per_group.")
            members.append(public.choice(in_train, m, replace=False))
            nonmembers.append(in_holdout[:m])
            canaries.append(in_holdout[m:m + c])
        rng = (np.random.default_rng(child_seed(secret, AUDIT_STREAM)) if secret is not None
               else np.random.default_rng(np.random.SeedSequence([int(config.train.seed), AUDIT_STREAM, 1])))
        canary_idx = np.concatenate(canaries)
        canary_set = _take(holdout, canary_idx)
        if a.canary_labels == "flipped":  # mislabelled canaries: what a memorising model gives away most clearly
            canary_set = canary_set._replace(label=1 - canary_set.label)
        return cls(_take(train_set, np.concatenate(members)), _take(holdout, np.concatenate(nonmembers)),
                   canary_set, audit.draw_canary_coins(len(canary_idx), rng))

    def training_pool(self, train_set) -> Any:
        """The training set followed by the canaries whose coin came up "in"."""
        included = _take(self.canaries, np.flatnonzero(self.coins))
        return _concat(_take(train_set, np.arange(len(train_set.label))), included)

    def run(self, config, losses_fn, state, initial, mesh, delta: float) -> dict:
        """The audit's results: ``settings`` and, computed from training data without noise, ``nonprivate``."""
        from jaxdp import audit

        a = config.audit
        batch = int(config.train.eval_batch_size)
        result: dict[str, Any] = {}
        if int(a.mia_examples_per_group):
            candidates = _concat(self.members, self.nonmembers)
            is_member = np.arange(len(candidates.label)) < len(self.members.label)
            loss = _losses(losses_fn, state, mesh, candidates, batch)
            reference = _losses(losses_fn, initial, mesh, candidates, batch)
            result.update(audit.membership_inference_metrics(loss, candidates.group, is_member,
                                                             reference_loss=reference,
                                                             confidence=float(a.confidence)))
        if int(a.canaries_per_group):
            loss = _losses(losses_fn, state, mesh, self.canaries, batch)
            reference = _losses(losses_fn, initial, mesh, self.canaries, batch)
            result.update(audit.one_run_audit(audit.calibrated_scores(loss, reference), self.coins,
                                              self.canaries.group, delta=delta, num_guess_in=a.num_guess_in,
                                              num_guess_out=a.num_guess_out, confidence=float(a.confidence)))
        settings = {"mia_examples_per_group": int(a.mia_examples_per_group),
                    "canaries_per_group": int(a.canaries_per_group), "canary_labels": a.canary_labels,
                    "confidence": float(a.confidence),
                    "attack": "loss threshold; calibrated by the initial model's loss (mia_cal_, one-run audit)"}
        return {"settings": settings, "nonprivate": json_safe(result)}


class _Split(NamedTuple):
    inputs: np.ndarray
    label: np.ndarray
    group: np.ndarray


def _take(split, idx: np.ndarray) -> _Split:
    return _Split(inputs_of(split)[idx], np.asarray(split.label)[idx], np.asarray(split.group)[idx])


def _concat(a, b) -> _Split:
    return _Split(*(np.concatenate([getattr(a, f), getattr(b, f)]) for f in ("inputs", "label", "group")))


def _losses(losses_fn, state, mesh, split, batch_size: int) -> np.ndarray:
    """Per-example losses of ``split`` under ``state``, in fixed-shape padded batches."""
    batch_size = parallel.round_up_to_devices(batch_size, mesh)
    state = parallel.replicate(mesh, jax.device_get(state))
    out = []
    n = len(split.label)
    for start in range(0, n, batch_size):
        images = np.asarray(split.inputs[start:start + batch_size])
        labels = np.asarray(split.label[start:start + batch_size]).astype(np.int32)
        real = len(labels)
        if real < batch_size:
            images = np.concatenate([images, np.zeros((batch_size - real,) + images.shape[1:], images.dtype)])
            labels = np.concatenate([labels, np.zeros(batch_size - real, np.int32)])
        loss = losses_fn(state, parallel.shard_batch(mesh, images), parallel.shard_batch(mesh, labels))
        out.append(np.asarray(jax.device_get(gather(loss)))[:real])
    return np.concatenate(out) if out else np.zeros(0, np.float32)
