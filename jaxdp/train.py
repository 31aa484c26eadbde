"""The training loop: DP-SGD (or non-private training on the same code path), per-group evaluation, resume.

``train_and_evaluate(config, workdir)`` trains one run described by a config (schema: :mod:`jaxdp.config`) and
writes into ``workdir``:

- ``config.json`` — the resolved run config (including a calibrated noise multiplier, if one was calibrated);
- ``history.jsonl`` — one JSON object per evaluation: step, epoch, train loss, epsilon so far, every metric of
  :func:`jaxdp.fairness.group_metrics` on the test set, and the per-group clipping diagnostics accumulated since
  the previous evaluation (fraction of examples clipped, mean pre-clip gradient norm);
- ``final.json`` — written last and atomically, so its presence means the run finished: final metrics, epsilon
  under every accountant, steps, wall time;
- ``checkpoints/`` — orbax checkpoints (parameters, optimiser and noise state, sampler position, privacy ledger,
  diagnostics, metric history). Calling ``train_and_evaluate`` again on the same workdir resumes from the newest
  good checkpoint and ends exactly where an uninterrupted run ends.

Privacy: each step clips per-example gradients (:func:`jaxdp.clipped_grad`), adds Gaussian noise once
(:func:`jaxdp.dp_noise`) and records the step's sampling and noise in a :class:`jaxdp.accounting.PrivacyLedger`
built from the very sampler that chose the batch, so the reported epsilon describes what ran.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from jaxdp import accounting, clipping, fairness, parallel, sampling
from jaxdp.checkpoint import Checkpointer
from jaxdp.config import differing_keys, validate_run_config
from jaxdp.noise import dp_noise
from jaxdp.runlog import RunProgress, json_safe, write_json, write_jsonl

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, dict], None]
EPSILON_ACCOUNTANTS = ("pld", "rdp", "rdp_classic")


def normalize_images(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 with mean 0.5 / std 0.5 normalisation, as the paper."""
    return (images.astype(jnp.float32) / 255.0 - 0.5) / 0.5


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy."""
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The optax optimiser that follows the DP noise (or the averaging, without DP).

    ``config.optim.weight_decay`` is coupled L2 (added to the gradient before the optimiser), as
    ``torch.optim.Adam(weight_decay=...)`` in the paper's code. It touches only the parameters, never the
    data, so it is post-processing for privacy.
    """
    name = config.optim.name
    factory = getattr(optax, name, None)
    if factory is None or not callable(factory):
        raise ValueError(f"config.optim.name={name!r} is not an optax optimiser (e.g. 'adam', 'sgd', 'adamw').")
    parts = []
    if config.optim.weight_decay:
        parts.append(optax.add_decayed_weights(float(config.optim.weight_decay)))
    parts.append(factory(learning_rate=float(config.optim.learning_rate)))
    return optax.chain(*parts)


@dataclasses.dataclass
class _Setup:
    """Everything derived from the config and the data, shared by the step functions."""

    config: ml_collections.ConfigDict
    model: Any
    mesh: Any
    sampler: Any
    tx: optax.GradientTransformation
    total_steps: int
    noise_multiplier: float | None
    mutable: list[str]


def _build_sampler(config, dataset_size: int, mesh) -> Any:
    batch_size = int(config.train.batch_size)
    seed = int(config.train.seed)
    scheme = config.dp.sampling
    if scheme == "poisson":
        default = sampling.default_physical_batch_size(dataset_size, batch_size / dataset_size)
        physical = parallel.round_up_to_devices(default, mesh)
        return sampling.PoissonSampler(
            dataset_size, expected_batch_size=batch_size, physical_batch_size=physical, seed=seed
        )
    if scheme == "fixed":
        if batch_size % mesh.size:
            raise ValueError(
                f"config.train.batch_size={batch_size} must be a multiple of the device count ({mesh.size}) "
                "with config.dp.sampling='fixed'."
            )
        return sampling.ShuffledSampler(dataset_size, batch_size, seed=seed)
    raise ValueError(f"config.dp.sampling={scheme!r}; choose 'poisson' or 'fixed'.")


def _setup(config, train_size: int) -> _Setup:
    from jaxdp import models

    mesh = parallel.make_mesh(config.train.num_devices)
    model = models.create_model(config.model, private=bool(config.dp.enabled))
    sampler = _build_sampler(config, train_size, mesh)
    total_steps = max(1, int(round(float(config.train.epochs) * sampler.steps_per_epoch)))
    noise_multiplier = None
    key = jax.random.key(int(config.train.seed))
    noise_key = jax.random.fold_in(key, 1)
    if config.dp.enabled:
        noise_multiplier = float(config.dp.noise_multiplier)
        if config.dp.target_epsilon is not None:
            noise_multiplier = accounting.calibrate_noise(
                float(config.dp.target_epsilon),
                sampler.sampling_prob,
                total_steps,
                float(config.dp.delta),
                accountant=config.dp.accountant,
                sampling=sampler.scheme,
                dataset_size=train_size,
            )
        first = dp_noise(noise_multiplier, float(config.dp.l2_clip_norm), int(config.train.batch_size), noise_key)
    else:
        first = optax.scale(1.0 / float(config.train.batch_size))
    tx = optax.chain(first, make_optimizer(config))
    mutable = ["batch_stats"] if config.model.norm == "batch" else []
    return _Setup(config, model, mesh, sampler, tx, total_steps, noise_multiplier, mutable)


def _init_state(setup: _Setup) -> dict:
    from jaxdp import models

    config = setup.config
    # An "rbg" key for initialisation only: with the default threefry key, XLA takes several times longer to
    # compile model.init on CPU (measured 28 s vs 6 s of CPU time for a small ResNet).
    init_key = jax.random.key(int(config.train.seed), impl="rbg")
    variables = models.init_variables(setup.model, init_key, pretrained_path=config.model.pretrained_path)
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    return {"params": params, "model_state": model_state, "opt_state": setup.tx.init(params)}


def _make_step_fns(setup: _Setup):
    """The jitted functions of a step: gradient of one chunk (sharded), update, evaluation forward pass."""
    config = setup.config
    model, mesh, mutable = setup.model, setup.mesh, setup.mutable
    random_flip = bool(config.train.random_flip)
    flip_base = jax.random.fold_in(jax.random.key(int(config.train.seed)), 2)
    l2_clip_norm = float(config.dp.l2_clip_norm)

    def apply_model(params, model_state, x, train):
        variables = {"params": params, **model_state}
        if mutable and train:
            logits, new_state = model.apply(variables, x, train=True, mutable=mutable)
            return logits, new_state
        return model.apply(variables, x, train=train), model_state

    def mean_loss(params, x, y):  # the loss_fn of clipped_grad: independent examples (no BatchNorm here)
        logits, _ = apply_model(params, {}, x, True)
        return jnp.mean(cross_entropy(logits, y))

    if config.dp.enabled:
        grad_fn = clipping.clipped_grad(
            mean_loss,
            l2_clip_norm=l2_clip_norm,
            microbatch_size=config.dp.microbatch_size,
            strategy=config.dp.clipping_strategy,
            return_loss=True,
        )

    def local_grads(params, model_state, x, y, mask):
        """Runs on one device's share of the chunk; returns that share's gradient sum, norms and losses."""
        if config.dp.enabled:
            grad_sum, norms, losses = grad_fn(params, x, y, mask)
            new_state = model_state
        else:

            def summed_loss(p):
                logits, new_state = apply_model(p, model_state, x, True)
                losses = cross_entropy(logits, y)
                return jnp.sum(jnp.where(mask, losses, 0.0)), (losses, new_state)

            grad_sum, (losses, new_state) = jax.grad(summed_loss, has_aux=True)(params)
            norms = jnp.full(mask.shape, jnp.nan, jnp.float32)
            new_state = jax.lax.pmean(new_state, parallel.DATA_AXIS)
        grad_sum = jax.lax.psum(grad_sum, parallel.DATA_AXIS)
        return grad_sum, norms, losses, new_state

    sharded_grads = jax.shard_map(
        local_grads,
        mesh=mesh,
        in_specs=(P(), P(), P(parallel.DATA_AXIS), P(parallel.DATA_AXIS), P(parallel.DATA_AXIS)),
        out_specs=(P(), P(parallel.DATA_AXIS), P(parallel.DATA_AXIS), P()),
        check_vma=False,
    )

    @jax.jit
    def accumulate(params, model_state, grad_acc, stats, images, labels, groups, mask, indices, step):
        x = normalize_images(images)
        if random_flip:
            # Keyed by (step, example index): the same flips whatever the chunking, padding or device count.
            step_key = jax.random.fold_in(flip_base, step)
            flips = jax.vmap(lambda i: jax.random.bernoulli(jax.random.fold_in(step_key, i)))(indices)
            x = jnp.where(flips[:, None, None, None], x[:, :, ::-1, :], x)
        grad_sum, norms, losses, model_state = sharded_grads(params, model_state, x, labels, mask)
        grad_acc = jax.tree_util.tree_map(jnp.add, grad_acc, grad_sum)
        stats = _update_stats(stats, norms, losses, mask, groups, l2_clip_norm)
        return grad_acc, stats, model_state

    @jax.jit
    def apply_update(params, opt_state, grad_sum):
        updates, opt_state = setup.tx.update(grad_sum, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    @jax.jit
    def predict(params, model_state, images):
        logits, _ = apply_model(params, model_state, normalize_images(images), False)
        return jnp.argmax(logits, axis=-1)

    return accumulate, apply_update, predict


def _zero_stats() -> dict:
    """Running sums since the last evaluation: training loss and the per-group clipping diagnostics."""
    return {"loss_sum": jnp.zeros((), jnp.float32), "n": jnp.zeros((), jnp.float32), **fairness.zero_clip_diagnostics()}


def _update_stats(stats, norms, losses, mask, groups, l2_clip_norm):
    new = dict(stats)
    for key, value in fairness.clip_diagnostics(norms, mask, groups, l2_clip_norm).items():
        new[key] = stats[key] + value
    new["loss_sum"] = stats["loss_sum"] + jnp.sum(jnp.where(mask, losses, 0.0))
    new["n"] = stats["n"] + jnp.sum(mask, dtype=jnp.float32)
    return new


def _restore_stats(saved: dict) -> dict:
    zero = _zero_stats()
    return {k: jnp.asarray(saved[k], zero[k].dtype) for k in zero}


def _finalize_stats(stats: dict, private: bool) -> dict:
    n = float(stats["n"])
    out = {"train_loss": float(stats["loss_sum"]) / n if n else math.nan}
    diag = fairness.finalize_clip_diagnostics(stats)
    for g in (0, 1):
        out[f"clip_fraction_{g}"] = diag[f"clip_fraction_{g}"] if private else math.nan
        out[f"grad_norm_mean_{g}"] = diag[f"grad_norm_mean_{g}"] if private else math.nan
        out[f"train_examples_{g}"] = diag[f"n_{g}"]
        out[f"nonfinite_examples_{g}"] = diag[f"nonfinite_{g}"] if private else 0
    return out


def _evaluate(predict, state, mesh, test, batch_size: int) -> dict:
    batch_size = parallel.round_up_to_devices(batch_size, mesh)
    preds = []
    n = len(test.label)
    for start in range(0, n, batch_size):
        images = test.images[start : start + batch_size]
        real = len(images)
        if real < batch_size:  # pad to the fixed shape so predict compiles once
            images = np.concatenate([images, np.zeros((batch_size - real,) + images.shape[1:], images.dtype)])
        out = predict(state["params"], state["model_state"], parallel.shard_batch(mesh, images))
        preds.append(np.asarray(jax.device_get(_gather(out)))[:real])
    y_pred = np.concatenate(preds) if preds else np.zeros(0, np.int32)
    return fairness.group_metrics(test.label, y_pred, test.group)


def _gather(array: jax.Array) -> jax.Array:
    if jax.process_count() == 1:
        return array
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(array, tiled=True)


def _epsilons(ledger, delta: float) -> dict:
    out = {}
    for name in EPSILON_ACCOUNTANTS:
        try:
            out[name] = float(ledger.epsilon(delta, accountant=name))
        except (ValueError, NotImplementedError) as error:  # e.g. an accountant that cannot count this sampling
            log.info("epsilon under %s not available: %s", name, error)
            out[name] = None
    return out


def _check_workdir_config(workdir: Path, resolved: dict) -> None:
    path = workdir / "config.json"
    diff = differing_keys(json.loads(path.read_text()), json_safe(resolved)) if path.exists() else []
    if diff:
        raise ValueError(
            f"{path} holds a different config than this run's; a workdir belongs to one config "
            f"({'; '.join(diff[:4])}{'; ...' if len(diff) > 4 else ''}). "
            "Use another workdir, or delete this one to start over."
        )


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    on_progress: ProgressFn | None = None,
    datasets: tuple[Any, Any] | None = None,
) -> dict:
    """Trains and evaluates one run; resumable. Returns the content of ``final.json``.

    Args:
      config: a run config (schema :func:`jaxdp.config.base_config`; ``config.sweep`` is ignored).
      workdir: where the run's files go (see the module docstring).
      on_progress: called as ``on_progress(step, total_steps, info)`` every few steps and after each
        evaluation; ``info`` holds ``loss``, ``epsilon`` and, after evaluations, ``accuracy_0/1``.
      datasets: ``(train, test)`` to use instead of ``config.data`` — any objects with arrays ``images``
        (uint8 ``[N, H, W, C]``), ``label`` (0/1) and ``group`` (0/1), e.g. your own data. ``config.data`` is
        then only recorded, not loaded.
    """
    from jaxdp import data

    config = ml_collections.ConfigDict(config.to_dict())
    if "sweep" in config:
        del config["sweep"]
    validate_run_config(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    final_path = workdir / "final.json"
    if final_path.exists():
        return json.loads(final_path.read_text())
    started = time.time()

    train_set, test_set = datasets if datasets is not None else data.load(config.data)
    setup = _setup(config, len(train_set.label))
    resolved = config.to_dict()
    if setup.noise_multiplier is not None:
        resolved["dp"]["noise_multiplier"] = setup.noise_multiplier
    _check_workdir_config(workdir, resolved)
    if jax.process_index() == 0:
        write_json(workdir / "config.json", resolved)

    accumulate, apply_update, predict = _make_step_fns(setup)
    # One compiled call per step rather than one eager dispatch per parameter leaf.
    zeros_like_params = jax.jit(lambda params: jax.tree_util.tree_map(jnp.zeros_like, params))
    mesh = setup.mesh
    state = _init_state(setup)
    checkpointer = Checkpointer(workdir / "checkpoints")
    ledger = accounting.PrivacyLedger()
    history: list[dict] = []
    stats = _zero_stats()
    start_step = 0
    restored = checkpointer.restore_latest(jax.tree_util.tree_map(np.asarray, state))
    if restored is not None:
        start_step, state, record = restored
        ledger = accounting.PrivacyLedger.from_json(record["ledger"])
        history = record["history"]
        stats = _restore_stats(record["stats"])
        log.info("Resumed %s from step %d.", workdir, start_step)
    state = parallel.replicate(mesh, state)
    if jax.process_index() == 0:
        write_jsonl(workdir / "history.jsonl", history)

    private = bool(config.dp.enabled)
    delta = float(config.dp.delta)
    eval_every = max(1, int(config.train.eval_every_steps))
    ckpt_every = max(1, int(config.train.checkpoint_every_steps))
    total = setup.total_steps
    show_progress = bool(config.train.progress) and jax.process_index() == 0
    progress = RunProgress(workdir.name) if show_progress else None
    last_info: dict = {}
    try:
        for step in range(start_step, total):
            batch = setup.sampler.batch(step)
            grad_acc = zeros_like_params(state["params"])
            model_state = state["model_state"]
            for chunk in range(batch.indices.shape[0]):
                idx = batch.indices[chunk]
                grad_acc, stats, model_state = accumulate(
                    state["params"],
                    model_state,
                    grad_acc,
                    stats,
                    parallel.shard_batch(mesh, train_set.images[idx]),
                    parallel.shard_batch(mesh, train_set.label[idx].astype(np.int32)),
                    parallel.shard_batch(mesh, train_set.group[idx].astype(np.int32)),
                    parallel.shard_batch(mesh, batch.mask[chunk]),
                    parallel.shard_batch(mesh, idx.astype(np.int32)),
                    np.int32(step),
                )
            params, opt_state = apply_update(state["params"], state["opt_state"], grad_acc)
            state = {"params": params, "model_state": model_state, "opt_state": opt_state}
            if private:
                ledger.record(setup.sampler, setup.noise_multiplier)
            done = step + 1
            if done % eval_every == 0 or done == total:
                row = {
                    "step": done,
                    "epoch": done / setup.sampler.steps_per_epoch,
                    "wall_time_s": time.time() - started,
                }
                row.update(_finalize_stats(stats, private))
                row["epsilon"] = float(ledger.epsilon(delta, accountant=config.dp.accountant)) if private else None
                row.update(_evaluate(predict, state, mesh, test_set, int(config.train.eval_batch_size)))
                history.append(json_safe(row))
                stats = _zero_stats()
                if jax.process_index() == 0:
                    write_jsonl(workdir / "history.jsonl", history)
                last_info = {k: row.get(k) for k in ("accuracy", "accuracy_0", "accuracy_1", "epsilon")}
            if done % ckpt_every == 0 or done == total:
                record = {
                    "ledger": ledger.to_json(),
                    "history": history,
                    "stats": {k: np.asarray(v).item() for k, v in stats.items()},
                    "sampler_step": done,
                }
                checkpointer.save(done, jax.tree_util.tree_map(np.asarray, jax.device_get(state)), record)
            info = dict(last_info, loss=history[-1]["train_loss"] if history else None)
            if progress is not None:
                progress(done, total, info)
            if on_progress is not None:
                on_progress(done, total, info)
    finally:
        checkpointer.close()

    final = {
        "metrics": history[-1],
        "epsilon": _epsilons(ledger, delta) if private else {name: None for name in EPSILON_ACCOUNTANTS},
        "delta": delta,
        "noise_multiplier": setup.noise_multiplier,
        "steps": total,
        "sampling": setup.sampler.scheme,
        "sampling_prob": setup.sampler.sampling_prob,
        "train_size": int(len(train_set.label)),
        "test_size": int(len(test_set.label)),
        "devices": int(mesh.size),
        "wall_time_s": time.time() - started,
    }
    if jax.process_index() == 0:
        write_json(final_path, final)
    return json.loads(json.dumps(json_safe(final)))
