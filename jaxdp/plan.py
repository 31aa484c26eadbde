"""The DP plan: everything DP-SGD does to a batch, built once from the config.

A :class:`DPPlan` is the analogue of jax_privacy's ``DPExecutionPlan``. It holds, side by side, the four pieces
whose agreement *is* the privacy guarantee, so that no training loop can pair them wrongly:

* ``sampler`` — which examples each step sees (:mod:`jaxdp.sampling`), seeded from the run's secret;
* ``grad_fn`` — the per-example clipped gradient sum of a chunk (:func:`jaxdp.clipped_grad`), and
  ``sensitivity``, the L2 bound on one example's contribution to that sum that the clipping guarantees;
* ``noise`` — the optax transformation that adds ``N(0, (z * sensitivity)^2)`` to the summed gradient and divides
  by the public expected batch size (:func:`jaxdp.dp_noise`), keyed from the run's secret;
* ``record_step`` — the privacy event each step adds to a :class:`jaxdp.accounting.PrivacyLedger`, read from the
  same sampler and noise multiplier;
* ``method`` — the DP-SGD variant (:mod:`jaxdp.methods`: DPSGD-F, global clipping, ...): its clip rule is the
  clipping of ``grad_fn``, its per-step releases are noised by :meth:`DPPlan.release` from the secret noise
  key (a ``fold_in`` of it, taken from the noise state) and recorded by ``record_step``, its state changes the
  gradient noise's scale through :meth:`DPPlan.noise_sensitivity`. Plain DP-SGD is the method ``"dpsgd"``,
  which releases nothing else.

A non-private plan (``config.dp.enabled = False``) has the same interface: its ``grad_fn`` is the plain gradient
sum (no clipping), its ``noise`` only divides by the batch size and ``record_step`` records nothing; the training
step is the same function for both (the loop branches on privacy only for what it writes: epsilon, the secret,
the diagnostics of clipping).

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

from jaxdp import accounting, clipping, methods, noise, sampling

REPRODUCIBLE_NOTE = (
    "dp.reproducible=True: batch sampling and noise were derived from the public train.seed, so this epsilon is "
    "not a guarantee against anyone who knows the seed (use the default secret randomness for a private model)"
)

# Tags that make the sampler's and the noise's streams independent children of one run secret.
_SAMPLER_STREAM, _NOISE_STREAM, AUDIT_STREAM = 0, 1, 2
# The method's count noise: fold_in(noise key, _RELEASE_FOLD), then the step.
_RELEASE_FOLD = 1


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
      grad_fn: ``grad_fn(params, model_state, inputs, labels, mask, clip_args) -> (grad_sum, norms, losses,
        model_state)`` for one chunk of examples: ``grad_sum`` the (clipped, under DP) sum over the real examples,
        ``norms`` each example's pre-clip gradient norm (NaN without DP), ``losses`` each example's loss;
        ``clip_args`` the method's per-example arguments (:meth:`DPPlan.clip_args`).
      sensitivity: the L2 bound on one example's contribution to ``grad_sum`` (None without DP); for a method
        whose bound changes with its state (DPSGD-F), the largest it can be, and each step's own bound is
        :meth:`noise_sensitivity`.
      noise_multiplier: z (None without DP): the noise std on the sum is ``z * sensitivity``.
      noise: the first link of the optimiser chain: noise and division by ``expected_batch_size``.
      expected_batch_size: the public normaliser of the summed gradient.
      total_steps: steps the run takes.
      reproducible: sampling and noise come from the public ``train.seed`` (see the module docstring).
      method: the DP-SGD variant (:mod:`jaxdp.methods`; ``DPSGD`` without DP).
      unclipped_grad_fn: ``(params, model_state, inputs, labels, mask) -> sum of the real examples' unclipped
        gradients`` (diagnostics only: no privacy).
      clipping_strategy: the clipping strategy that runs (``"auto"`` resolved when the input shape was given to
        :func:`make_plan`), and why it was picked; None without DP.
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
    method: methods.Method = methods.DPSGD()
    unclipped_grad_fn: Callable[..., Any] | None = None
    clipping_strategy: str | None = None
    clipping_strategy_reason: str | None = None

    def record_step(self, ledger: accounting.PrivacyLedger) -> None:
        """Adds one step's privacy event (the sampler's scheme and rate, the gradient's noise multiplier and those
        of the method's other releases on the same batch) to ``ledger``."""
        if self.private:
            ledger.record(self.sampler, self.noise_multiplier,
                          extra_noise_multipliers=self.method.extra_noise_multipliers)

    # The method's part of a step (jit-friendly; the training loop calls these, never the method directly).

    def init_method_state(self) -> Any:
        """The method's state before the first step (per-group bounds, a threshold; ``{}`` for DP-SGD)."""
        return self.method.init_state()

    def clip_args(self, method_state: Any, groups: jax.Array) -> Any:
        """Per-example arguments of the method's clip rule for a chunk with group ids ``groups``."""
        return self.method.clip_args(method_state, groups) if self.private else None

    def release_counts(self, norms: jax.Array, mask: jax.Array, groups: jax.Array, method_state: Any) -> jax.Array:
        """The exact counts of one chunk that the method releases (float32, possibly empty): add them over the
        step's chunks, then :meth:`release` once."""
        if not self.private:
            return jnp.zeros((0,), jnp.float32)
        return self.method.counts(norms, mask, groups, method_state)

    def release(self, method_state: Any, counts: jax.Array, step: jax.Array, noise_state: Any) -> Any:
        """Noises a step's counts (``N(0, sigma^2)`` each, tail-correct) and returns the method's next state; the
        identity for methods that release nothing else (and without DP).

        The count noise is keyed by ``fold_in(fold_in(noise key, _RELEASE_FOLD), step)``, with the secret noise
        key read from ``noise_state`` (the :func:`jaxdp.dp_noise` state, ``DPNoiseState.key``) — an argument of
        the compiled step, like the rest of the state, never a constant of it: a key closed over by a jitted
        function is compiled into the program, and so into the persistent compilation cache on disk.
        """
        if not self.private or self.method.num_counts == 0:
            return method_state
        noise_key = jax.random.wrap_key_data(noise_state.key, impl="rbg")
        key = jax.random.fold_in(jax.random.fold_in(noise_key, _RELEASE_FOLD), step)
        return methods.release(self.method, method_state, counts, key)

    def noise_sensitivity(self, method_state: Any) -> jax.Array | None:
        """This step's sensitivity for the gradient noise when the method's state sets it (DPSGD-F: max_k C_k),
        else None (the plan's ``sensitivity``)."""
        return self.method.noise_sensitivity(method_state) if self.private else None

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
    input_shape: tuple[int, ...] | None = None,
) -> DPPlan:
    """Builds the plan of a run from its config.

    Args:
      config: a validated run config (:mod:`jaxdp.config`).
      model: the Flax model (applied as ``model.apply({"params": params, **model_state}, x, train=...)``).
      dataset_size: number of training examples (public, see docs/threat-model.md).
      secret: the run's secret (:func:`new_run_secret`, restored from a checkpoint on resume); ignored, and may
        be None, when ``config.dp.reproducible`` (sampling and noise then come from ``config.train.seed``).
      num_devices: data-parallel devices; chunks are padded to a multiple of it.
      public_size: the dataset size that sets the sampling rate q = batch_size / public_size (default
        ``dataset_size``). An audited run samples from its training set plus the canaries its secret coins
        included, at the q of the training set alone, so that neither q, the step count, epsilon nor the chunk
        widths (the compiled steps' shapes) depend on the coins.
      input_shape: one example's input shape (e.g. ``(32, 32, 3)``): resolves ``clipping_strategy="auto"`` now,
        so that the plan records which strategy runs (otherwise it is resolved when the step is traced).
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
                                    chunk_multiple=num_devices, sampling_prob=q,
                                    num_chunk_widths=int(config.train.num_chunk_widths), public_size=public_size)
    total_steps = max(1, int(round(float(config.train.epochs) * sampler.steps_per_epoch)))
    mutable = ["batch_stats"] if config.model.norm == "batch" else []

    def apply(params, model_state, x, train):
        variables = {"params": params, **model_state}
        if mutable and train:
            return model.apply(variables, x, train=True, mutable=mutable)
        return model.apply(variables, x, train=train), model_state

    def plain_grads_and_state(params, model_state, x, y, mask):
        # Small-map convolutions as patch matmuls (clipping.matmul_convs): the same gradient to float tolerance,
        # faster on CPU than XLA's convolution (launch/bench.py's "matmul conv" entry measures it).
        @clipping.matmul_convs
        def summed_loss(p):
            logits, new_state = apply(p, model_state, x, True)
            losses = cross_entropy(logits, y)
            return jnp.sum(jnp.where(mask, losses, 0.0)), (losses, new_state)

        return jax.grad(summed_loss, has_aux=True)(params)

    def unclipped_grads(params, model_state, x, y, mask):
        return plain_grads_and_state(params, model_state, x, y, mask)[0]

    if not private:

        def plain_grads(params, model_state, x, y, mask, clip_args=None):
            grad_sum, (losses, new_state) = plain_grads_and_state(params, model_state, x, y, mask)
            return grad_sum, jnp.full(mask.shape, jnp.nan, jnp.float32), losses, new_state

        return DPPlan(False, sampler, plain_grads, None, None, optax.scale(1.0 / batch_size), float(batch_size),
                      total_steps, reproducible, unclipped_grad_fn=unclipped_grads)

    method = methods.from_config(config.dp, sampler.expected_batch_size)
    noise_multiplier = float(config.dp.noise_multiplier)
    if config.dp.target_epsilon is not None:
        noise_multiplier = _calibrate(config, sampler, total_steps, public_size or dataset_size,
                                      method.extra_noise_multipliers)
    l2_clip_norm = float(config.dp.l2_clip_norm)

    def mean_loss(params, x, y):  # the loss_fn of clipped_grad: examples are independent (BatchNorm is refused)
        logits, _ = apply(params, {}, x, True)
        return jnp.mean(cross_entropy(logits, y))

    strategy, reason = str(config.dp.clipping_strategy), "set in config.dp.clipping_strategy"
    if strategy == "auto" and input_shape is not None:
        inputs = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
        params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), inputs)["params"]
        strategy, reason = clipping.resolve_strategy(mean_loss, params, inputs,
                                                     jax.ShapeDtypeStruct((1,), jnp.int32))
        reason = f"auto: {reason}"
    clipped = clipping.clipped_grad(mean_loss, l2_clip_norm=l2_clip_norm, microbatch_size=config.dp.microbatch_size,
                                    strategy=strategy, return_loss=True, clip_rule=method.clip_rule)

    def clipped_grads(params, model_state, x, y, mask, clip_args=None):
        grad_sum, norms, losses = clipped(params, x, y, mask, clip_args)
        return grad_sum, norms, losses, model_state

    if isinstance(method, methods.DPSGDF):
        # Each step's noise is scaled to that step's max_k C_k (DPPlan.noise_sensitivity); this is its largest value.
        sensitivity = (1 + method.num_groups) * method.base_clip_norm
    else:
        sensitivity = clipping.sensitivity(l2_clip_norm)
    tx = noise.dp_noise(noise_multiplier, sensitivity, batch_size, noise_key, secure=bool(config.dp.secure_noise))
    return DPPlan(True, sampler, clipped_grads, sensitivity, noise_multiplier, tx, float(batch_size), total_steps,
                  reproducible, method=method, unclipped_grad_fn=unclipped_grads,
                  clipping_strategy=strategy, clipping_strategy_reason=reason)


def _calibrate(config: ml_collections.ConfigDict, sampler: Any, total_steps: int, dataset_size: int,
               extra_noise_multipliers: tuple[float, ...]) -> float:
    """The gradient noise multiplier z meeting ``config.dp.target_epsilon`` for steps that also release the method's
    counts: the combined multiplier (z^-2 + sum sigma^-2)^-1/2 is calibrated, then solved for z."""
    target = float(config.dp.target_epsilon)
    z_eff = accounting.calibrate_noise(target, sampler.sampling_prob, total_steps, float(config.dp.delta),
                                       accountant=config.dp.accountant, sampling=sampler.scheme,
                                       dataset_size=dataset_size)
    rest = z_eff**-2 - sum(s**-2 for s in extra_noise_multipliers)
    if rest <= 0:
        raise ValueError(
            f"config.dp.target_epsilon={target} cannot be met: the method's own releases (noise multipliers "
            f"{list(extra_noise_multipliers)}) already spend more than it allows with no gradient at all; raise the "
            f"target, or the method's count_noise_multiplier.")
    # A hair more noise than the exact solution, so that rounding never puts the combined epsilon above the target.
    return rest**-0.5 * (1 + 1e-9)
