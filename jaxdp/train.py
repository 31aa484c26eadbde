"""The study's training loop: DP-SGD (or non-private training through the same plan), per-group evaluation, resume.

``train_and_evaluate(config, workdir)`` trains one run described by a config (schema: :mod:`jaxdp.config`) and
writes into ``workdir``:

- ``config.json`` — the resolved run config (including a calibrated noise multiplier, if one was calibrated);
- ``history.jsonl`` — one JSON object per evaluation: step, epoch, epsilon so far, every metric of
  :func:`jaxdp.fairness.group_metrics` on the test set and — unless ``config.train.nonprivate_diagnostics`` is
  False — statistics of the training data computed without noise since the previous evaluation
  (:mod:`jaxdp.diagnostics`: training loss, per-group example counts, fraction clipped, mean pre-clip gradient
  norm, and, for private runs, the gradient misalignment cosines), every one under a key starting with
  ``nonprivate_``: they are not covered by the run's epsilon. A run with a DP-fairness method (``config.dp.method``)
  also writes the method's state, which is post-processing of its noisy releases and so covered by epsilon:
  ``method_clip_norm_0/1`` (DPSGD-F's per-group bounds) or ``method_threshold`` (Global-Adapt's Z), as they are
  after the window's last step;
- ``final.json`` — written last and atomically, so its presence means the run finished: final metrics, epsilon
  under every accountant, steps, the padded widths its batches ran at (``chunk_widths``: public, a function of
  the public training-set size and q), the method and its noise multipliers, the groups' names
  (``group_names``, after ``config.data.group_attribute``), one example's shape (``input_shape``: ``[H, W, C]``
  images or ``[D]`` features), where the wall time went (``time_split_s``,
  :class:`jaxdp.clock.RunClock`), and ``privacy_note`` when the epsilon is not a guarantee
  (``config.dp.reproducible``);
- ``checkpoints/`` — orbax checkpoints (parameters, optimiser and noise state, sampler position, privacy ledger,
  diagnostics, metric history, and the run's secret seed). Calling ``train_and_evaluate`` again on the same workdir
  resumes from the newest good checkpoint and ends exactly where an uninterrupted run ends. Checkpoints hold the
  secret that protects the run's privacy: keep them as private as the training data.

Privacy: the mechanism — sampler, clipped gradient and its sensitivity, noise, privacy events — is one
:class:`jaxdp.DPPlan` (:func:`jaxdp.steps.plan_from_config`); the loop runs its step
(:func:`jaxdp.steps.train_step`, one compiled program per step) and records each step's event in a
:class:`jaxdp.accounting.PrivacyLedger`, so the reported epsilon describes what ran.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxdp import accounting, checks, diagnostics, fairness, parallel, runlog, steps
from jaxdp.audit_sets import AuditSets, check_audit_capacity, gather
from jaxdp.checkpoint import Checkpointer
from jaxdp.clock import RunClock
from jaxdp.config import differing_keys, resolve, validate_run_config
from jaxdp.plan import DPPlan, TrainState, new_run_secret
from jaxdp.runlog import RunProgress, json_safe, write_atomic, write_json, write_jsonl

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, dict], None]
PARAMS_FILE, MODEL_CARD = "params.msgpack", "model.json"
# Folders that hold the run's secret (its seed, and the noise key inside the optimiser state).
SECRET_FOLDERS = ("checkpoints", "checkpoints-corrupt")
KEEP_CHECKPOINTS_WARNING = (
    "config.train.keep_checkpoints=True: {path} holds the run's secret (its seed and the noise key); whoever reads "
    "it can replay the run and undo its privacy. Keep it as private as the training data, or delete it; publish "
    "only params.msgpack and model.json.")


def check_runnable(config: ml_collections.ConfigDict) -> None:
    """Everything about a run that can be checked before it starts, without training: the config's values, that
    its data is on this machine (:func:`jaxdp.data.check_available`) and that its audit fits the data.

    Raises ValueError, or :class:`jaxdp.data.DataUnavailable` (whose message says which files to put where), with
    a message that names the value and what would work. ``launch/sweep.py`` calls it for every run of a sweep
    before the first run starts.
    """
    from jaxdp import data

    validate_run_config(config)
    checks.check_model(config)
    checks.check_batch_fits(config)
    data.check_available(config.data)
    if config.audit.enabled:
        check_audit_capacity(config, data.holdout_capacity(config.data), data.group_names(config.data))


class _Run:
    """A run's setup: its data, model, plan, compiled steps and the state restored from its checkpoints (the
    loop in :func:`train_and_evaluate` drives it)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: Path, datasets: tuple | None) -> None:
        from jaxdp import data, models

        self.config, self.workdir, self.clock = config, workdir, RunClock()
        private = bool(config.dp.enabled)
        with self.clock.phase("data"):
            self.train_set, self.test_set, holdout = self._load(datasets)
        self.mesh = parallel.make_mesh(config.train.num_devices)
        self.model = models.create_model(config.model, private=private)
        self.checkpointer = Checkpointer(workdir / "checkpoints")
        # An "rbg" key for initialisation only: with the default threefry key, XLA takes several times longer to
        # compile model.init on CPU.
        self.input_shape = tuple(steps.inputs_of(self.train_set).shape[1:])
        with self.clock.phase("init"):
            self.variables = models.init_variables(self.model, jax.random.key(int(config.train.seed), impl="rbg"),
                                                   pretrained_path=config.model.pretrained_path,
                                                   input_shape=self.input_shape)
        self.secret, fresh_secret = None, False
        if private and not config.dp.reproducible:
            with self.clock.phase("checkpoints"):
                record = self.checkpointer.latest_record() or {}
            if "run_secret" in record:
                self.secret = int(record["run_secret"], 16)
            else:
                self.secret, fresh_secret = new_run_secret(), True
        self.public_size = len(self.train_set.label)
        self.group_names = data.group_names(config.data)
        self.audit_sets = None
        if config.audit.enabled:
            self.audit_sets = AuditSets.build(config, self.train_set, holdout, self.secret)
            self.train_set = self.audit_sets.training_pool(self.train_set)
        self.data_fingerprint = data_fingerprint(self.train_set)
        with self.clock.phase("accounting"):  # calibrates the noise multiplier when dp.target_epsilon asks for it
            num_params = sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(self.variables["params"]))
            self.plan = steps.plan_from_config(config, self.model, len(self.train_set.label), secret=self.secret,
                                               mesh=self.mesh, public_size=self.public_size, num_params=num_params)
        self._write_config()
        self._restore(fresh_secret)
        self._compile()

    def _load(self, datasets: tuple | None) -> tuple:
        from jaxdp import data

        if datasets is not None:
            return (*datasets, None)[:3]
        holdout_per_group = 0
        if self.config.audit.enabled:
            holdout_per_group = check_audit_capacity(self.config, data.holdout_capacity(self.config.data),
                                                     data.group_names(self.config.data))
        return data.load_splits(self.config.data, holdout_per_group=holdout_per_group)

    def _write_config(self) -> None:
        resolved = resolve(self.config)
        if self.plan.noise_multiplier is not None:
            resolved["dp"]["noise_multiplier"] = self.plan.noise_multiplier
        path = self.workdir / "config.json"
        diff = differing_keys(json.loads(path.read_text()), json_safe(resolved)) if path.exists() else []
        if diff:
            raise ValueError(
                f"{path} holds a different config than this run's; a workdir belongs to one config "
                f"({'; '.join(diff[:4])}{'; ...' if len(diff) > 4 else ''}). "
                "Use another workdir, or delete this one to start over.")
        if jax.process_index() == 0:
            write_json(path, resolved)

    def _restore(self, fresh_secret: bool) -> None:
        plan, diagnostics_on = self.plan, bool(self.config.train.nonprivate_diagnostics)
        self.state = plan.init(self.variables["params"], {k: v for k, v in self.variables.items() if k != "params"})
        self.ledger, self.history = accounting.PrivacyLedger(), []
        self.stats, self.start_step = diagnostics.zero_stats(diagnostics_on), 0
        with self.clock.phase("checkpoints"):
            restored = self.checkpointer.restore_latest(jax.tree_util.tree_map(np.asarray, self.state))
        if restored is not None:
            self.start_step, self.state, record = restored
            self._check_fingerprint(record)
            self.ledger = accounting.PrivacyLedger.from_json(record["ledger"])
            self.history = record["history"]
            self.stats = ({k: jnp.asarray(v, self.stats[k].dtype) for k, v in record["stats"].items()}
                          if diagnostics_on else {})
            log.info("Resumed %s from step %d.", self.workdir, self.start_step)
        if fresh_secret or (restored is None and self.secret is not None):
            # The secret is kept before any step runs (again when every checkpoint holding it was quarantined): a
            # run killed before its first regular checkpoint restarts with the same secret, so it replays the same
            # batches and noise instead of releasing a second, differently randomised run of the mechanism.
            self.save_checkpoint(0)
        # Everything the step carries from call to call lives on the mesh from the start, so that the first call
        # and the later ones (fed the previous call's outputs) share one compiled program.
        self.state = parallel.replicate(self.mesh, self.state)
        self.stats = parallel.replicate(self.mesh, self.stats)
        if jax.process_index() == 0:
            write_jsonl(self.workdir / "history.jsonl", self.history)

    def _check_fingerprint(self, record: dict) -> None:
        """Refuses to resume checkpoints written for another training set (their secret and noise would be reused
        on different data: a second, differently randomised release)."""
        stored = record.get("data_fingerprint")
        if stored is None:
            log.warning("The checkpoints in %s record no training-set fingerprint (written by an older jaxdp); "
                        "resuming without checking that the training set is the same.", self.checkpointer.directory)
        elif stored != self.data_fingerprint:
            raise ValueError(
                f"The checkpoints in {self.checkpointer.directory} were written for another training set "
                f"(n={stored.get('n')}, sha256 {str(stored.get('sha256'))[:12]}...; this run's: "
                f"n={self.data_fingerprint['n']}, sha256 {self.data_fingerprint['sha256'][:12]}...). Resuming would "
                "reuse their secret noise on different data. Use another workdir, or delete that folder to start "
                "over.")

    def _compile(self) -> None:
        config, plan = self.config, self.plan
        self.flip_key = steps.flip_key(config)
        # Gradient misalignment, once per evaluation window (private runs with non-private diagnostics).
        self.misaligned = None
        if steps.measures_misalignment(config, plan):
            self.misaligned = diagnostics.MisalignmentSample(config, self.train_set, self.mesh,
                                                             plan.sampler.physical_batch_size)
            self.unclipped_sum = jax.jit(functools.partial(steps.unclipped_sum_step, plan=plan,
                                                           flip_key=self.flip_key))
            self.cosines = jax.jit(diagnostics.misalignment_cosines)
        # The one compiled step of the run, which the benchmark times too (jaxdp.steps.jit_train_step).
        self.step_fn = steps.jit_train_step(config, plan)
        self.predict = jax.jit(functools.partial(steps.eval_step, model=self.model))

    def prepare(self, step: int) -> list[steps.StepBatch] | None:
        """Step ``step``'s chunks on the mesh (None past the last step)."""
        if step >= self.plan.num_steps:
            return None
        batch = self.plan.batch(step)
        return steps.step_batches(self.mesh, self.train_set, batch.indices, batch.mask)

    def save_checkpoint(self, step: int) -> None:
        with self.clock.phase("checkpoints"):
            record = {"ledger": self.ledger.to_json(), "history": self.history,
                      "stats": {k: np.asarray(v).item() for k, v in self.stats.items()}, "sampler_step": step,
                      "data_fingerprint": self.data_fingerprint}
            if self.secret is not None:
                record["run_secret"] = f"{self.secret:032x}"
            self.checkpointer.save(step, jax.tree_util.tree_map(np.asarray, jax.device_get(self.state)), record)

    def evaluate(self, done: int, started: float, misalignment: dict | None) -> dict:
        """The history row after step ``done``; resets the diagnostics' sums."""
        plan, config = self.plan, self.config
        row: dict[str, Any] = {"step": done, "epoch": done / plan.sampler.steps_per_epoch,
                               "wall_time_s": time.time() - started}
        row.update(diagnostics.finalize_stats(self.stats, plan.private))
        if misalignment is not None:
            row.update({diagnostics.NONPRIVATE_PREFIX + k: v for k, v in misalignment.items()})
        if plan.private:
            row.update(plan.method.public_state(self.state.method_state))
        with self.clock.phase("accounting"):
            delta = float(config.dp.delta)
            row["epsilon"] = float(self.ledger.epsilon(delta, accountant=config.dp.accountant)) if plan.private \
                else None
        if plan.privacy_note:
            row["epsilon_note"] = plan.privacy_note
        with self.clock.phase("evaluation"):
            row.update(_evaluate(self.predict, self.state, self.mesh, self.test_set,
                                 int(config.train.eval_batch_size)))
        self.history.append(json_safe(row))
        self.stats = parallel.replicate(self.mesh, diagnostics.zero_stats(bool(config.train.nonprivate_diagnostics)))
        if jax.process_index() == 0:
            write_jsonl(self.workdir / "history.jsonl", self.history)
        return row

    def final(self, started: float) -> dict:
        """``final.json``'s content (after the audit, if the run has one)."""
        plan, config = self.plan, self.config
        delta = float(config.dp.delta)
        with self.clock.phase("accounting"):
            epsilons = _epsilons(plan, self.ledger, delta)
        final = {
            "metrics": self.history[-1], "epsilon": epsilons, "delta": delta,
            "noise_multiplier": plan.noise_multiplier, "method": plan.method.name if plan.private else None,
            # How the noise was drawn and over how many coordinates a step: the accountant's sampler terms.
            **({"noise_mechanism": plan.sampler_terms["mechanism"],
                "noised_coordinates": plan.sampler_terms["num_params"]} if plan.private else {}),
            "clipping_strategy": self.strategy[0], "clipping_strategy_reason": self.strategy[1],
            "extra_noise_multipliers": list(plan.extra_noise_multipliers),
            "group_names": list(self.group_names), "input_shape": list(self.input_shape),
            "steps": plan.num_steps,
            "sampling": plan.sampler.scheme, "sampling_prob": plan.sampler.sampling_prob,
            "chunk_widths": list(plan.sampler.chunk_widths), "train_size": self.public_size,
            "test_size": int(len(self.test_set.label)), "devices": int(self.mesh.size),
            "reproducible": bool(config.dp.reproducible), "privacy_note": plan.privacy_note,
        }
        if self.audit_sets is not None:
            with self.clock.phase("evaluation"):
                initial = plan.init(self.variables["params"],
                                    {k: v for k, v in self.variables.items() if k != "params"})
                final["audit"] = self.audit_sets.run(config, jax.jit(functools.partial(steps.loss_step,
                                                                                       model=self.model)),
                                                     self.state, initial, self.mesh, delta)
        final.update(wall_time_s=time.time() - started,
                     time_split_s={k: round(v, 3) for k, v in self.clock.split.items()})
        return final

    def publish(self, final: dict) -> None:
        """Writes the trained model alone, the thing to publish: ``params.msgpack`` (the Flax variables; load with
        ``flax.serialization.msgpack_restore(open(path, "rb").read())``) and ``model.json`` (how it was trained and
        its epsilon; none of the run's non-private statistics, no secret)."""
        variables = jax.tree_util.tree_map(np.asarray, jax.device_get(
            {"params": self.state.params, **self.state.model_state}))
        write_atomic(self.workdir / PARAMS_FILE, flax.serialization.msgpack_serialize(variables))
        inputs = steps.inputs_of(self.test_set)
        card = {
            "params": PARAMS_FILE,
            "load": f"flax.serialization.msgpack_restore(open({PARAMS_FILE!r}, 'rb').read())",
            "model": self.config.model.to_dict(),
            "inputs": {"shape": list(inputs.shape[1:]), "dtype": str(inputs.dtype),
                       "preprocessing": ("uint8 images as (x / 255 - 0.5) / 0.5" if inputs.dtype == np.uint8
                                         else "float features as given")},
            "group_names": final["group_names"],
            "privacy": {k: final[k] for k in ("epsilon", "delta", "noise_multiplier", "method",
                                              "extra_noise_multipliers", "sampling", "sampling_prob", "steps",
                                              "reproducible", "privacy_note")},
            "test_metrics": {k: v for k, v in final["metrics"].items()
                             if not k.startswith(diagnostics.NONPRIVATE_PREFIX)
                             and k not in ("wall_time_s",) and not k.startswith("method_")},
            "data": {"source": self.config.data.source, "label_attribute": self.config.data.get("label_attribute"),
                     "group_attribute": self.config.data.get("group_attribute"), "train_size": final["train_size"],
                     "test_size": final["test_size"]},
        }
        write_json(self.workdir / MODEL_CARD, card)

    @functools.cached_property
    def strategy(self) -> tuple[str | None, str | None]:
        """The clipping strategy that runs, and why (``"auto"`` resolved for this model and data)."""
        example = {"inputs": jax.ShapeDtypeStruct((1, *steps.inputs_of(self.train_set).shape[1:]), jnp.float32),
                   "labels": jax.ShapeDtypeStruct((1,), jnp.int32)}
        return self.plan.resolve_strategy(self.variables["params"], example)


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
      on_progress: called as ``on_progress(step, total_steps, info)`` after every step; ``info`` holds
        ``epsilon``, after evaluations ``accuracy_0/1``, with non-private diagnostics on the training loss as
        ``loss`` (``loss_label`` names it as non-private), and ``note`` when the epsilon is not a guarantee.
      datasets: ``(train, test)`` to use instead of ``config.data`` — any objects with arrays ``inputs`` (or
        ``images``: uint8 ``[N, H, W, C]`` images or float features ``[N, D]``), ``label`` (0/1) and ``group``
        (0/1), e.g. your own data. ``config.data`` is then only recorded, not loaded.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    if "sweep" in config:
        del config["sweep"]
    check_runnable(config) if datasets is None else validate_run_config(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    final_path = workdir / "final.json"
    if final_path.exists():
        remove_secret_files(workdir, keep=bool(config.train.keep_checkpoints))
        return json.loads(final_path.read_text())
    started = time.time()
    run = _Run(config, workdir, datasets)
    plan, clock, total = run.plan, run.clock, run.plan.num_steps
    eval_every = max(1, int(config.train.eval_every_steps))
    ckpt_every = max(1, int(config.train.checkpoint_every_steps))
    progress = RunProgress(workdir.name) if bool(config.train.progress) and jax.process_index() == 0 else None
    note = "reproducible seed: eps is no guarantee" if plan.privacy_note else None
    info: dict = {"note": note}
    try:
        # A stop signal (Ctrl-C, SLURM's SIGTERM) waits for the end of the step: the run saves a checkpoint, then
        # stops with runlog.Stopped (launch/sweep.py prints how to resume, exit 130 / 143).
        with runlog.deferred_stops():
            with clock.phase("data"):
                next_batch = run.prepare(run.start_step)
            for step in range(run.start_step, total):
                batch, done = next_batch, step + 1
                evaluating = done % eval_every == 0 or done == total
                measuring = run.misaligned is not None and evaluating
                if measuring:
                    with clock.phase("evaluation"):  # waited for here, so that its time is not the step's
                        zeros = plan.zero_accumulator(run.state.params).grad_sum
                        sums = jax.block_until_ready(run.misaligned.sums(run.unclipped_sum, zeros, run.state, batch,
                                                                         step))
                with clock.phase("train_steps"):  # more than one chunk: a Poisson batch wider than the chunk width
                    run.state, run.stats, update = steps.run_step(run.step_fn, plan, run.state, run.stats, batch, step)
                # The step runs asynchronously: the host prepares the next step's batch meanwhile, then waits, so that
                # each step's device time is counted in train_steps.
                with clock.phase("data"):
                    next_batch = run.prepare(done)
                with clock.phase("train_steps"):
                    jax.block_until_ready(run.state)
                misalignment = None
                if measuring:
                    with clock.phase("evaluation"):
                        misalignment = run.misaligned.cosines(run.cosines, sums, update)
                plan.record_step(run.ledger)
                if evaluating:
                    row = run.evaluate(done, started, misalignment)
                    info = {k: row.get(k) for k in ("accuracy", "accuracy_0", "accuracy_1", "epsilon")} | {
                        "note": note, "group_names": run.group_names}
                    if config.train.nonprivate_diagnostics:
                        info.update(loss=row["nonprivate_train_loss"], loss_label="nonprivate loss")
                if done % ckpt_every == 0 or done == total:
                    run.save_checkpoint(done)
                for callback in (progress, on_progress):
                    if callback is not None:
                        callback(done, total, info)
                if (signum := runlog.stop_requested()) is not None:
                    if done % ckpt_every and done != total:  # else just saved
                        run.save_checkpoint(done)
                    raise runlog.Stopped(signum)
    finally:
        run.checkpointer.close()
    final = run.final(started)
    if jax.process_index() == 0:
        run.publish(final)
        write_json(final_path, final)  # last: its presence means the run finished
        remove_secret_files(workdir, keep=bool(config.train.keep_checkpoints))
    return json.loads(json.dumps(json_safe(final)))


def data_fingerprint(split: Any) -> dict:
    """What identifies a training set for resuming: its size, label and group counts and a SHA-256 of its inputs,
    labels and groups (kept only in the run's private checkpoints)."""
    digest = hashlib.sha256()
    arrays = (steps.inputs_of(split), np.asarray(split.label, np.int32), np.asarray(split.group, np.int32))
    for array in arrays:
        digest.update(str((array.dtype.str, array.shape)).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return {"n": int(len(split.label)), "labels_1": int(np.sum(arrays[1] == 1)),
            "groups_1": int(np.sum(arrays[2] == 1)), "sha256": digest.hexdigest()}


def remove_secret_files(workdir: Path, *, keep: bool) -> None:
    """Deletes a finished run's secret-bearing folders (:data:`SECRET_FOLDERS`), or, with ``keep``, warns that they
    hold the secret. Call only once ``final.json`` is written: a run that lost its checkpoints before finishing would
    start over with a new secret."""
    for name in SECRET_FOLDERS:
        path = Path(workdir) / name
        if not path.exists():
            continue
        if keep:
            log.warning(KEEP_CHECKPOINTS_WARNING.format(path=path))
            print(f"warning: {KEEP_CHECKPOINTS_WARNING.format(path=path)}")
        else:
            shutil.rmtree(path)


# --------------------------------------------------------------------------------------------------------------
# Host side.


def _evaluate(predict: Callable, state: TrainState, mesh: Any, test: Any, batch_size: int) -> dict:
    batch_size = parallel.round_up_to_devices(batch_size, mesh)
    preds = []
    inputs = steps.inputs_of(test)
    n = len(test.label)
    for start in range(0, n, batch_size):
        chunk = inputs[start : start + batch_size]
        real = len(chunk)
        if real < batch_size:  # pad to the fixed shape so predict compiles once
            chunk = np.concatenate([chunk, np.zeros((batch_size - real,) + chunk.shape[1:], chunk.dtype)])
        out = predict(state, parallel.shard_batch(mesh, chunk))
        preds.append(np.asarray(jax.device_get(gather(out)))[:real])
    y_pred = np.concatenate(preds) if preds else np.zeros(0, np.int32)
    return fairness.group_metrics(test.label, y_pred, test.group)


def _epsilons(plan: DPPlan, ledger: accounting.PrivacyLedger, delta: float) -> dict:
    out: dict[str, float | None] = {}
    for name in accounting.ACCOUNTANTS:
        if not plan.private:
            out[name] = None
            continue
        try:
            out[name] = float(ledger.epsilon(delta, accountant=name))
        except (ValueError, NotImplementedError) as error:  # e.g. an accountant that cannot count this sampling
            log.info("epsilon under %s not available: %s", name, error)
            out[name] = None
    return out
