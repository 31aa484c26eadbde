"""The DP plan: everything DP-SGD does to a batch, built once from the config.

A :class:`DPPlan` is the analogue of jax_privacy's ``DPExecutionPlan``. It holds, side by side, the four pieces
whose agreement *is* the privacy guarantee, so that no training loop can pair them wrongly:

* ``sampler`` — which examples each step sees (:mod:`jaxdp.sampling`), seeded from the run's secret;
* ``grad_fn`` — the per-example clipped gradient sum of a chunk (:func:`jaxdp.clipped_grad`), and
  ``sensitivity``, the L2 bound on one example's contribution to that sum that the clipping guarantees;
* ``noise`` — the optax transformation that adds ``N(0, (z * sensitivity)^2)`` to the summed gradient and divides
  by the public expected batch size (:func:`jaxdp.dp_noise`), keyed from the run's secret;
* ``record_step`` — the privacy event each step adds to a :class:`jaxdp.accounting.PrivacyLedger`, read from the
  same sampler and noise multiplier.

A non-private plan (``config.dp.enabled = False``) has the same interface: its ``grad_fn`` is the plain gradient
sum (no clipping), its ``noise`` only divides by the batch size and ``record_step`` records nothing; the training
loop never branches on privacy.

Secret randomness
-----------------
The randomness that protects privacy — which examples are sampled, and the Gaussian noise — comes from a secret
128-bit seed (:func:`jaxdp.noise.secret_seed`, the operating system's entropy) drawn when a run first starts
(:func:`new_run_secret`). The training loop stores it only in the run's checkpoints, so that a resumed run continues
exactly; it is never written to ``config.json``, ``history.jsonl``, ``final.json``, logs or run names. The
config's ``train.seed`` seeds only what may be public: the initial parameters, the random flips and the data subset.
With ``config.dp.reproducible = True`` sampling and noise are derived from ``train.seed`` instead (for tests and
exact replication); then anyone who knows the config can regenerate every batch and every noise draw, and the
reported epsilon is no guarantee against them (:data:`REPRODUCIBLE_NOTE` says so in the run's outputs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxdp import accounting, clipping, noise, sampling

REPRODUCIBLE_NOTE = (
    "dp.reproducible=True: batch sampling and noise were derived from the public train.seed, so this epsilon is "
    "not a guarantee against anyone who knows the seed (use the default secret randomness for a private model)"
)

# Tags that make the sampler's and the noise's streams independent children of one run secret.
_SAMPLER_STREAM, _NOISE_STREAM, AUDIT_STREAM = 0, 1, 2


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy."""
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]


def normalize_images(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 with mean 0.5 / std 0.5 normalisation, as the paper."""
    return (images.astype(jnp.float32) / 255.0 - 0.5) / 0.5


def new_run_secret() -> int:
    """A fresh secret for a new run: 128 bits from the operating system (:func:`jaxdp.noise.secret_seed`).

    In a multi-process run every process must use the same secret: process 0 draws it and sends it to the others.
    """
    secret = noise.secret_seed()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        words = np.array([(secret >> (32 * i)) & 0xFFFFFFFF for i in range(4)], np.uint32)
        words = np.asarray(multihost_utils.broadcast_one_to_all(words))
        secret = sum(int(w) << (32 * i) for i, w in enumerate(words))
    return secret


def child_seed(secret: int, stream: int) -> int:
    """An independent 128-bit seed for one consumer of the run secret (NumPy's SeedSequence mixing)."""
    words = np.random.SeedSequence([secret, stream]).generate_state(4, np.uint32)
    return sum(int(w) << (32 * i) for i, w in enumerate(words))


@dataclasses.dataclass(frozen=True, eq=False)
class DPPlan:
    """The mechanism of one training run (see the module docstring). Hashable by identity, so it can be a
    static argument of jitted step functions.

    Attributes:
      private: whether the plan is DP-SGD (False: plain training through the same interface).
      sampler: the batch sampler (:class:`jaxdp.sampling.PoissonSampler` or :class:`~jaxdp.sampling.ShuffledSampler`).
      grad_fn: ``grad_fn(params, model_state, inputs, labels, mask) -> (grad_sum, norms, losses, model_state)``
        for one chunk of examples: ``grad_sum`` the (clipped, under DP) sum over the real examples, ``norms`` each
        example's pre-clip gradient norm (NaN without DP), ``losses`` each example's loss.
      sensitivity: the L2 bound on one example's contribution to ``grad_sum`` (None without DP).
      noise_multiplier: z (None without DP): the noise std on the sum is ``z * sensitivity``.
      noise: the first link of the optimiser chain: noise and division by ``expected_batch_size``.
      expected_batch_size: the public normaliser of the summed gradient.
      total_steps: steps the run takes.
      reproducible: sampling and noise come from the public ``train.seed`` (see the module docstring).
    """

    private: bool
    sampler: Any
    grad_fn: Callable[..., tuple]
    sensitivity: float | None
    noise_multiplier: float | None
    noise: optax.GradientTransformation
    expected_batch_size: float
    total_steps: int
    reproducible: bool

    def record_step(self, ledger: accounting.PrivacyLedger) -> None:
        """Adds one step's privacy event (the sampler's scheme and rate, the noise multiplier) to ``ledger``."""
        if self.private:
            ledger.record(self.sampler, self.noise_multiplier)

    @property
    def privacy_note(self) -> str | None:
        """What the reported epsilon does not cover, for the run's outputs (None when it is a guarantee)."""
        return REPRODUCIBLE_NOTE if self.private and self.reproducible else None


def make_plan(
    config: ml_collections.ConfigDict,
    model: Any,
    dataset_size: int,
    *,
    secret: int | None,
    num_devices: int = 1,
    public_size: int | None = None,
) -> DPPlan:
    """Builds the plan of a run from its config.

    Args:
      config: a validated run config (:mod:`jaxdp.config`).
      model: the Flax model (applied as ``model.apply({"params": params, **model_state}, x, train=...)``).
      dataset_size: number of training examples (public, see the README's threat model).
      secret: the run's secret (:func:`new_run_secret`, restored from a checkpoint on resume); ignored, and may
        be None, when ``config.dp.reproducible`` (sampling and noise then come from ``config.train.seed``).
      num_devices: data-parallel devices; chunks are padded to a multiple of it.
      public_size: the dataset size that sets the sampling rate q = batch_size / public_size (default
        ``dataset_size``). An audited run samples from its training set plus the canaries its secret coins
        included, at the q of the training set alone, so that neither q, the step count nor epsilon depends on
        the coins.
    """
    private = bool(config.dp.enabled)
    reproducible = bool(config.dp.reproducible)
    if reproducible or not private:
        # Non-private runs have nothing to protect: their batches follow train.seed, reproducibly.
        sampler_seed = int(config.train.seed)
        noise_key = jax.random.fold_in(jax.random.key(int(config.train.seed)), 1)
    else:
        if secret is None:
            raise ValueError("A private, non-reproducible plan needs the run's secret (jaxdp.plan.new_run_secret()).")
        sampler_seed = child_seed(secret, _SAMPLER_STREAM)
        noise_key = noise.key_from_seed(child_seed(secret, _NOISE_STREAM))
    batch_size = int(config.train.batch_size)
    q = None if public_size is None or public_size == dataset_size else batch_size / public_size
    sampler = sampling.make_sampler(config.dp.sampling, dataset_size, batch_size, seed=sampler_seed,
                                    chunk_multiple=num_devices, sampling_prob=q)
    total_steps = max(1, int(round(float(config.train.epochs) * sampler.steps_per_epoch)))
    mutable = ["batch_stats"] if config.model.norm == "batch" else []

    def apply(params, model_state, x, train):
        variables = {"params": params, **model_state}
        if mutable and train:
            return model.apply(variables, x, train=True, mutable=mutable)
        return model.apply(variables, x, train=train), model_state

    if not private:

        def plain_grads(params, model_state, x, y, mask):
            def summed_loss(p):
                logits, new_state = apply(p, model_state, x, True)
                losses = cross_entropy(logits, y)
                return jnp.sum(jnp.where(mask, losses, 0.0)), (losses, new_state)

            grad_sum, (losses, new_state) = jax.grad(summed_loss, has_aux=True)(params)
            return grad_sum, jnp.full(mask.shape, jnp.nan, jnp.float32), losses, new_state

        return DPPlan(False, sampler, plain_grads, None, None, optax.scale(1.0 / batch_size), float(batch_size),
                      total_steps, reproducible)

    noise_multiplier = float(config.dp.noise_multiplier)
    if config.dp.target_epsilon is not None:
        noise_multiplier = accounting.calibrate_noise(
            float(config.dp.target_epsilon), sampler.sampling_prob, total_steps, float(config.dp.delta),
            accountant=config.dp.accountant, sampling=sampler.scheme, dataset_size=public_size or dataset_size,
        )
    l2_clip_norm = float(config.dp.l2_clip_norm)

    def mean_loss(params, x, y):  # the loss_fn of clipped_grad: examples are independent (BatchNorm is refused)
        logits, _ = apply(params, {}, x, True)
        return jnp.mean(cross_entropy(logits, y))

    clipped = clipping.clipped_grad(mean_loss, l2_clip_norm=l2_clip_norm, microbatch_size=config.dp.microbatch_size,
                                    strategy=config.dp.clipping_strategy, return_loss=True)

    def clipped_grads(params, model_state, x, y, mask):
        grad_sum, norms, losses = clipped(params, x, y, mask)
        return grad_sum, norms, losses, model_state

    sensitivity = clipping.sensitivity(l2_clip_norm)
    tx = noise.dp_noise(noise_multiplier, sensitivity, batch_size, noise_key, secure=bool(config.dp.secure_noise))
    return DPPlan(True, sampler, clipped_grads, sensitivity, noise_multiplier, tx, float(batch_size), total_steps,
                  reproducible)
