"""The DP plan: your loss, your model, your data — and everything DP-SGD does to a batch, built once.

A :class:`DPPlan` is the analogue of jax_privacy's ``DPExecutionPlan``. It is built by :func:`make_plan` from a
typed, frozen :class:`DPConfig` (the privacy settings: clip bound, noise multiplier or target epsilon, delta,
sampling, accountant, method), an :class:`ExecutionConfig` (settings that change only speed and memory), **your
loss function**, the dataset size, the batch size and your optax optimiser. It holds, side by side, the pieces
whose agreement *is* the privacy guarantee, so that no training loop can pair them wrongly:

* ``sampler`` — which examples each step sees (:mod:`jaxdp.sampling`), seeded from the run's secret;
* ``clipped_grad`` — the per-example clipped gradient sum of a chunk (:func:`jaxdp.clipped_grad`), which carries
  ``sensitivity``: the L2 bound on one example's contribution that its clipping (or the method's) guarantees;
* ``noise`` — the optax transformation adding ``N(0, (z * sensitivity)^2)`` to the summed gradient and dividing
  by the public expected batch size (:func:`jaxdp.dp_noise`), keyed from the run's secret;
* ``method`` — the DP-SGD variant (:mod:`jaxdp.methods`): its clip rule is ``clipped_grad``'s, its per-step
  releases are noised from the secret noise key and accounted with the gradient's;
* :meth:`DPPlan.record_step` / :meth:`DPPlan.epsilon` — the privacy events of the steps, read from the same
  sampler and noise multipliers.

The loss function
-----------------
``loss_fn(params, batch) -> per-example losses``: ``batch`` is any pytree of arrays whose leading axis is the
example axis (e.g. ``{"x": images, "y": labels}``), and the result is a vector with one loss per example
(``float[B]``). Under DP each example's gradient is computed with ``loss_fn`` applied to that example alone, as a
batch of one, so examples must not interact (no BatchNorm on batch statistics). A non-private plan may carry a
model state (BatchNorm's statistics): ``make_plan(None, loss_fn, ..., has_model_state=True)`` with
``loss_fn(params, batch, model_state) -> (per-example losses, new model state)``.

The training step
-----------------
``state, out = plan.train_step(state, batch, mask, groups=None)`` is one step of DP-SGD as one compiled program:
``batch`` holds a step's examples as ``[n_chunks, width, ...]`` (:meth:`DPPlan.gather` builds it from your arrays
and :meth:`DPPlan.batch`), ``mask`` is ``bool[n_chunks, width]`` (False for padding). Inside, the chunks' clipped
sums are accumulated (one compiled program per chunk, the same for every chunk; a Poisson batch wider than a
chunk is never truncated), noise is added once, the method releases its counts, and the optimiser updates the
parameters. The program is jitted (the state is donated); call ``plan.train_step`` as it is, or inside your own
``jax.jit``. A non-private plan has the same interface
(``clipped_grad`` is the plain gradient sum, ``noise`` only divides by the batch size, nothing is recorded).

Example::

    import jax, jax.numpy as jnp, optax, jaxdp

    def loss_fn(params, batch):
        logits = batch["x"] @ params["w"] + params["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

    dp = jaxdp.DPConfig(l2_clip_norm=1.0, noise_multiplier=1.0, delta=1e-5)
    plan = jaxdp.make_plan(dp, loss_fn, dataset_size=len(x), batch_size=64, epochs=10,
                           optimizer=optax.adam(1e-3))
    state = plan.init(params)
    for step in range(plan.num_steps):
        batch, mask = plan.gather({"x": x, "y": y}, plan.batch(step))
        state, out = plan.train_step(state, batch, mask)
    print(plan.epsilon())

Secret randomness
-----------------
The randomness that protects privacy — which examples are sampled, and the Gaussian noise — comes from a secret
128-bit seed (:func:`jaxdp.noise.secret_seed`, the operating system's entropy): :func:`make_plan` draws one unless
you pass ``secret=`` (e.g. restored from your checkpoint, so that a resumed run continues exactly; the study's
loop keeps it only in its checkpoints). ``plan.secret`` holds it; it is never part of ``repr(plan)``. With
``DPConfig(reproducible=True)`` sampling and noise are derived from the public ``public_seed`` instead (tests,
exact replication); then anyone who knows that seed can regenerate every batch and every noise draw, and the
reported epsilon is no guarantee against them (:data:`REPRODUCIBLE_NOTE`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdp import accounting, clipping, methods, noise, parallel, sampling
from jaxdp.settings import DPConfig, ExecutionConfig

PyTree = Any
LossFn = Callable[..., Any]

REPRODUCIBLE_NOTE = (
    "dp.reproducible=True: batch sampling and noise were derived from the public train.seed, so this epsilon is "
    "not a guarantee against anyone who knows the seed (use the default secret randomness for a private model)"
)

# Tags that make the sampler's and the noise's streams independent children of one run secret.
_SAMPLER_STREAM, _NOISE_STREAM, AUDIT_STREAM = 0, 1, 2
# The method's count noise: fold_in(noise key, _RELEASE_FOLD), then the step.
_RELEASE_FOLD = 1


# --------------------------------------------------------------------------------------------------------------
# Secrets.


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


# --------------------------------------------------------------------------------------------------------------
# State and outputs.


@flax.struct.dataclass
class TrainState:
    """What a training step changes: the model's parameters and state, the optimiser's state (a pair: the plan's
    noise transformation's state, holding the secret noise key and its step count, and the optimiser's), and the
    DP method's state (:mod:`jaxdp.methods`: DPSGD-F's last released counts, Global-Adapt's threshold; empty for
    DP-SGD). Checkpoint all of it to resume exactly; it holds the secret noise key (keep it private)."""

    params: Any
    model_state: Any
    opt_state: Any
    method_state: Any = flax.struct.field(default_factory=dict)

    @classmethod
    def create(cls, variables: dict, tx: optax.GradientTransformation, method_state: Any = None) -> TrainState:
        """From Flax ``variables`` (``params`` plus any collections) and the whole chain ``tx``."""
        params = variables["params"]
        model_state = {k: v for k, v in variables.items() if k != "params"}
        return cls(params=params, model_state=model_state, opt_state=tx.init(params),
                   method_state={} if method_state is None else method_state)


class StepOutput(NamedTuple):
    """What :meth:`DPPlan.train_step` returns besides the new state, each ``[n_chunks, width]`` like ``mask``.

    ``losses``: each example's loss (padding entries are meaningless); ``norms``: each example's pre-clip gradient
    norm (NaN without DP). Both are statistics of the training data computed without noise: not covered by epsilon.
    ``update`` (with ``return_update=True``): the pair ``(clipped sum, noised gradient)`` of the step.
    """

    losses: jax.Array
    norms: jax.Array
    update: tuple[Any, Any] | None = None


class Accumulator(NamedTuple):
    """What a step's chunks add up before the noise: the (clipped) gradient sum and the method's exact counts."""

    grad_sum: Any
    counts: jax.Array  # float32[num_counts] (empty for DP-SGD)


# --------------------------------------------------------------------------------------------------------------
# The plan.


@dataclasses.dataclass(frozen=True, eq=False)
class DPPlan:
    """The mechanism of one training run (see the module docstring); build it with :func:`make_plan`. Hashable by
    identity, so it can be a static argument of jitted functions.

    Attributes:
      dp: the :class:`DPConfig` (None for a non-private plan); ``execution`` the :class:`ExecutionConfig`.
      private: whether the plan is DP-SGD.
      sampler: the batch sampler (:class:`jaxdp.sampling.PoissonSampler` or :class:`~jaxdp.sampling.
        ShuffledSampler`).
      clipped_grad: ``clipped_grad(params, batch, None, mask, clip_args) -> (sum, norms, losses)`` for one chunk:
        the (clipped, under DP) sum over the real examples; ``clipped_grad.sensitivity`` its bound (None without DP).
      noise_multiplier: z (calibrated when ``dp.target_epsilon`` was given; None without DP).
      noise: the first link of the optimiser chain: noise and division by ``expected_batch_size``.
      optimizer: your optax optimiser, applied after the noise.
      expected_batch_size: the public normaliser of the summed gradient.
      num_steps: the steps the run takes (from ``epochs`` or ``steps``).
      method: the DP-SGD variant (:mod:`jaxdp.methods`; ``DPSGD`` without DP).
      secret: the run's secret seed (None for a reproducible or non-private plan). Never printed.
    """

    dp: DPConfig | None
    execution: ExecutionConfig
    sampler: Any
    clipped_grad: Any
    noise_multiplier: float | None
    noise: optax.GradientTransformation
    optimizer: optax.GradientTransformation
    expected_batch_size: float
    num_steps: int
    method: methods.Method
    loss_fn: LossFn
    has_model_state: bool = False
    mesh: Any = None
    num_params: int | None = None
    secret: int | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        chunk_step = jax.jit(self.chunk_fn, donate_argnums=(0,), static_argnames=("return_update",))
        object.__setattr__(self, "chunk_step", chunk_step)
        object.__setattr__(self, "_zeros", {})

    # -- what the plan is ------------------------------------------------------------------------------------

    @property
    def private(self) -> bool:
        return self.dp is not None

    @property
    def sensitivity(self) -> float | None:
        """The L2 bound on one example's contribution to a step's clipped sum (the largest, for DPSGD-F)."""
        return self.clipped_grad.sensitivity if self.private else None

    @property
    def total_steps(self) -> int:
        return self.num_steps

    @property
    def reproducible(self) -> bool:
        return bool(self.private and self.dp.reproducible)

    @property
    def privacy_note(self) -> str | None:
        """What the reported epsilon does not cover, for the run's outputs (None when it is a guarantee)."""
        return REPRODUCIBLE_NOTE if self.reproducible else None

    @property
    def tx(self) -> optax.GradientTransformation:
        """``optax.chain(noise, optimizer)``: the transformation whose state ``TrainState.opt_state`` holds."""
        return optax.chain(self.noise, self.optimizer)

    def __repr__(self) -> str:
        return (f"DPPlan(dp={self.dp!r}, sampler={self.sampler!r}, noise_multiplier={self.noise_multiplier!r}, "
                f"num_steps={self.num_steps}, method={self.method.name!r})")

    def resolve_strategy(self, params: PyTree, example_batch: PyTree) -> tuple[str, str]:
        """``(strategy, reason)``: the clipping strategy that runs for batches like ``example_batch`` (``"auto"``
        resolved by :func:`jaxdp.clipping.resolve_strategy`); ``(None, ...)`` without DP."""
        if not self.private:
            return None, "non-private: plain gradient sum"
        strategy = self.execution.clipping_strategy
        if strategy != "auto":
            return strategy, "set in the execution config"
        name, reason = clipping.resolve_strategy(_mean_loss(self.loss_fn), params, example_batch, None)
        return name, f"auto: {reason}"

    # -- state ------------------------------------------------------------------------------------------------

    def init(self, params: PyTree, model_state: PyTree = None) -> TrainState:
        """The state before the first step: your parameters (and, for ``has_model_state``, the model state), the
        noise's state (the secret key) and the optimiser's, and the method's initial state."""
        if model_state is None:
            model_state = {}
        if model_state and not self.has_model_state:
            raise ValueError("init(params, model_state) got a model state, but the plan was built without "
                             "has_model_state=True (and a loss_fn(params, batch, model_state)).")
        # The optimiser's state (zeros shaped like the parameters) from one compiled program, not one per leaf and
        # operation: eagerly, a first run compiled some twenty small programs here. The noise's state (the secret
        # key) is made outside it: a compiled program would hold the key as a constant, and JAX's persistent
        # compilation cache would write it to disk.
        opt_state = (self.noise.init(params), _jit_init(self.optimizer.init)(params))
        state = TrainState(params=params, model_state=model_state, opt_state=opt_state,
                           method_state=self.init_method_state())
        # Copies of every leaf (one program): train_step donates the state, which must delete neither the caller's
        # arrays nor those a later init returns again (the noise's init hands out the same key array every time).
        return _copy_tree(state)

    def init_method_state(self) -> Any:
        """The method's state before the first step (per-group bounds, a threshold; ``{}`` for DP-SGD)."""
        return self.method.init_state()

    # -- batches ----------------------------------------------------------------------------------------------

    def batch(self, step: int) -> sampling.Batch:
        """Which examples step ``step`` (0-based) takes: indices and mask, ``[n_chunks, width]`` (a pure function
        of the secret and the step)."""
        return self.sampler.batch(step)

    @staticmethod
    def gather(data: PyTree, batch: sampling.Batch) -> tuple[PyTree, np.ndarray]:
        """``(examples, mask)``: every leaf of ``data`` (arrays with the example axis first, on the host) indexed by
        ``batch.indices``, so ``[n_chunks, width, ...]``; padding entries are example 0, masked out."""
        taken = jax.tree_util.tree_map(lambda a: np.asarray(a)[batch.indices], data)
        return taken, batch.mask

    # -- the step ---------------------------------------------------------------------------------------------

    def train_step(self, state: TrainState, batch: PyTree, mask: Any, groups: Any = None, *,
                   return_update: bool = False) -> tuple[TrainState, StepOutput]:
        """One DP-SGD step (see the module docstring): ``batch`` ``[n_chunks, width, ...]`` (or ``[width, ...]`` for
        one chunk), ``mask`` bool of the same leading shape, ``groups`` int (needed by methods that use them).

        Each chunk goes through :attr:`chunk_step`, one compiled program whatever the number of chunks (a Poisson
        batch that overflows its chunk runs it twice instead of compiling a second program): it adds the chunk's
        clipped sum and counts to the step's, and on the last chunk adds the noise once, releases the method's
        counts and applies the optimiser. The state is donated. Works as it is (host arrays, e.g. from
        :meth:`gather`, are sliced on the host) and inside your own ``jax.jit`` (the chunks are then unrolled into
        your program: pass the data as arguments, never close over it, or it is compiled into the program).
        """
        chunks = _chunked_inputs(batch, mask, groups, self.method)
        n = len(chunks)
        acc, outs = self.zero_accumulator(state.params), []
        for c, (chunk, chunk_mask, chunk_groups) in enumerate(chunks):
            state, acc, out = self.chunk_step(state, acc, chunk, chunk_mask, chunk_groups, np.bool_(c == 0),
                                              np.bool_(c == n - 1), return_update=return_update)
            outs.append(out)
        if n == 1:
            return state, outs[0]
        stacked = [jnp.concatenate([getattr(o, f) for o in outs]) for f in ("losses", "norms")]
        return state, StepOutput(*stacked, outs[-1].update)

    def chunk_fn(self, state: TrainState, acc: Accumulator, batch: PyTree, mask: jax.Array, groups: jax.Array,
                 first: jax.Array, last: jax.Array, *, return_update: bool = False
                 ) -> tuple[TrainState, Accumulator, StepOutput]:
        """One chunk of a step, not jitted (:attr:`chunk_step` is this under ``jax.jit``, the state donated):
        ``acc`` plus the chunk's clipped sum and exact counts (``acc`` is ignored where ``first``); where ``last``,
        the noise, the method's release and the optimiser on the sum (else the state is kept and nothing of an
        update leaves the program). ``first`` and ``last`` are arguments, not constants, so that every chunk of
        every step runs one program. Outputs are ``[1, width]``.

        The update is computed on every chunk and selected (``jnp.where(last, ...)``), not branched to with
        ``lax.cond``: XLA's CPU runtime ran the conditional's branch without fusing it into the rest of the step, a
        visible part of a small model's step in one-off timings (CHANGELOG), where the select fuses into the
        optimiser's element-wise update. An earlier chunk of a step that overflows its chunk (about 1% of Poisson
        steps) therefore also draws the step's noise (with the same key and counter as its last chunk, since the
        state is kept) on a partial sum, and discards it inside the program: nothing of it leaves the program,
        and the step's released update is the last chunk's, as before."""
        acc = jax.tree_util.tree_map(lambda a: jnp.where(first, jnp.zeros_like(a), a), acc)
        chunk_sum, norms, losses, model_state = self.chunk_grads(state.params, state.model_state, batch, mask,
                                                                 groups, state.method_state)
        counts = acc.counts + self.release_counts(norms, mask, groups, state.method_state)
        acc = Accumulator(jax.tree_util.tree_map(jnp.add, acc.grad_sum, chunk_sum), counts)
        updated, noised = self.apply_update(state, acc.grad_sum, acc.counts, model_state)
        kept = state.replace(model_state=model_state)  # an earlier chunk: the step's update waits for its last
        state = jax.tree_util.tree_map(lambda new, old: jnp.where(last, new, old), updated, kept)  # keys too
        update = None
        if return_update:
            update = (acc.grad_sum, jax.tree_util.tree_map(lambda a: jnp.where(last, a, jnp.zeros_like(a)), noised))
        return state, acc, StepOutput(losses[None], norms[None], update)

    def zero_accumulator(self, params: PyTree) -> Accumulator:
        """The accumulator a step's first chunk starts from (its values are ignored; made once per parameter
        structure and placed like the parameters, on the mesh when there is one)."""
        leaves, structure = jax.tree_util.tree_flatten(params)
        if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
            return Accumulator(jax.tree_util.tree_map(jnp.zeros_like, params), self._zero_counts())
        # (shape, dtype) of each leaf: the attributes where a leaf has them (jnp.result_type costs a visible part
        # of a small model's step on the host).
        key = structure, tuple((x.shape, x.dtype) if hasattr(x, "dtype") else (jnp.shape(x), jnp.result_type(x))
                               for x in leaves)
        if key not in self._zeros:
            shardings = None if self.mesh is None else parallel.replicated(self.mesh)
            zeros = jax.jit(lambda p: Accumulator(jax.tree_util.tree_map(jnp.zeros_like, p), self._zero_counts()),
                            out_shardings=shardings)
            self._zeros[key] = zeros(params)
        return self._zeros[key]

    def _zero_counts(self) -> jax.Array:
        return jnp.zeros((self.method.num_counts if self.private else 0,), jnp.float32)

    def chunk_grads(self, params: PyTree, model_state: PyTree, batch: PyTree, mask: jax.Array, groups: jax.Array,
                    method_state: PyTree) -> tuple[PyTree, jax.Array, jax.Array, PyTree]:
        """One chunk's ``(gradient sum, norms, losses, model_state)``: clipped under DP, split over the mesh's
        devices when there is a mesh (each clips its share; the shares are added with one ``psum``)."""
        clip_args = self.clip_args(method_state, groups)
        if self.mesh is None:
            return self._local_grads(params, model_state, batch, mask, clip_args)

        def local(params, model_state, batch, mask, clip_args):
            grad_sum, norms, losses, model_state = self._local_grads(params, model_state, batch, mask, clip_args)
            grad_sum = jax.lax.psum(grad_sum, parallel.DATA_AXIS)
            model_state = jax.lax.pmean(model_state, parallel.DATA_AXIS)
            return grad_sum, norms, losses, model_state

        data, rep = jax.sharding.PartitionSpec(parallel.DATA_AXIS), jax.sharding.PartitionSpec()
        return jax.shard_map(local, mesh=self.mesh, in_specs=(rep, rep, data, data, data),
                             out_specs=(rep, data, data, rep), check_vma=False)(
            params, model_state, batch, mask, clip_args)

    def _local_grads(self, params, model_state, batch, mask, clip_args):
        if self.private:
            grad_sum, norms, losses = self.clipped_grad(params, batch, None, mask, clip_args)
            return grad_sum, norms, losses, model_state
        grad_sum, (losses, model_state) = self.plain_grads(params, model_state, batch, mask)
        return grad_sum, jnp.full(mask.shape, jnp.nan, jnp.float32), losses, model_state

    def plain_grads(self, params: PyTree, model_state: PyTree, batch: PyTree, mask: jax.Array):
        """``(sum of the real examples' unclipped gradients, (losses, model_state))``: the non-private gradient,
        and the misalignment diagnostics' reference (no privacy)."""

        # Small-map convolutions as patch matmuls (clipping.matmul_convs): the same gradient to float tolerance,
        # faster on CPU than XLA's convolution (launch/bench.py measures it).
        @clipping.matmul_convs
        def summed_loss(p):
            if self.has_model_state:
                losses, new_state = self.loss_fn(p, batch, model_state)
            else:
                losses, new_state = self.loss_fn(p, batch), model_state
            losses = _per_example(losses, mask.shape[0])
            return jnp.sum(jnp.where(mask, losses, 0.0)), (losses, new_state)

        return jax.grad(summed_loss, has_aux=True)(params)

    def apply_update(self, state: TrainState, grad_sum: PyTree, counts: jax.Array,
                     model_state: PyTree) -> tuple[TrainState, PyTree]:
        """Noise (once per step, scaled to the method's sensitivity), division by the expected batch size, the
        method's release of its noisy counts, and the optimiser; returns the new state and the noised gradient."""
        noise_state, optimizer_state = state.opt_state
        sensitivity = self.noise_sensitivity(state.method_state)
        extra = {} if sensitivity is None else {"l2_clip_norm": sensitivity}
        noised, new_noise_state = self.noise.update(grad_sum, noise_state, state.params, **extra)
        updates, optimizer_state = self.optimizer.update(noised, optimizer_state, state.params)
        params = optax.apply_updates(state.params, updates)
        method_state = state.method_state
        if self.private:
            method_state = self.release(state.method_state, counts, noise_state.count, noise_state)
        return TrainState(params=params, model_state=model_state, opt_state=(new_noise_state, optimizer_state),
                          method_state=method_state), noised

    # -- the method's part of a step ----------------------------------------------------------------------------

    def clip_args(self, method_state: Any, groups: jax.Array) -> Any:
        """Per-example arguments of the method's clip rule for a chunk with group ids ``groups``."""
        return self.method.clip_args(method_state, groups) if self.private else None

    def release_counts(self, norms: jax.Array, mask: jax.Array, groups: jax.Array, method_state: Any) -> jax.Array:
        """The exact counts of one chunk that the method releases (float32, possibly empty)."""
        if not self.private:
            return jnp.zeros((0,), jnp.float32)
        return self.method.counts(norms, mask, groups, method_state)

    def release(self, method_state: Any, counts: jax.Array, step: jax.Array, noise_state: Any) -> Any:
        """Noises a step's counts (``N(0, sigma^2)`` each, tail-correct) and returns the method's next state; the
        identity for methods that release nothing else (and without DP).

        The count noise is keyed by ``fold_in(fold_in(noise key, _RELEASE_FOLD), step)``, with the secret noise
        key read from ``noise_state`` (the :func:`jaxdp.dp_noise` state) — an argument of the compiled step, never
        a constant of it: a key closed over by a jitted function is compiled into the program, and so into the
        persistent compilation cache on disk.
        """
        if not self.private or self.method.num_counts == 0:
            return method_state
        noise_key = jax.random.wrap_key_data(noise_state.key, impl="rbg")
        key = jax.random.fold_in(jax.random.fold_in(noise_key, _RELEASE_FOLD), step)
        return methods.release(self.method, method_state, counts, key, mechanism=self.dp.noise_mechanism)

    def noise_sensitivity(self, method_state: Any) -> jax.Array | None:
        """This step's sensitivity for the gradient noise when the method's state sets it (DPSGD-F: max_k C_k),
        else None (the plan's ``sensitivity``)."""
        return self.method.noise_sensitivity(method_state) if self.private else None

    # -- accounting -------------------------------------------------------------------------------------------

    @property
    def extra_noise_multipliers(self) -> tuple[float, ...]:
        return tuple(self.method.extra_noise_multipliers) if self.private else ()

    def record_step(self, ledger: accounting.PrivacyLedger, steps: int = 1) -> None:
        """Adds ``steps`` steps' privacy events (the sampler's scheme and rate, the gradient's noise multiplier and
        those of the method's other releases on the same batch) to ``ledger``; nothing without DP."""
        if self.private:
            ledger.record(self.sampler, self.noise_multiplier, steps=steps,
                          extra_noise_multipliers=self.extra_noise_multipliers, **self.sampler_terms)

    @property
    def sampler_terms(self) -> dict:
        """What the accountant needs to charge the noise sampler's own delta: the mechanism, and every coordinate it
        noises per step (the parameters and the method's counts; unknown: a conservative 2^32 - 1)."""
        coordinates = None if self.num_params is None else self.num_params + self.method.num_counts
        return {"mechanism": self.dp.noise_mechanism, "num_params": coordinates}

    def epsilon(self, steps: int | None = None, *, delta: float | None = None,
                accountant: str | None = None) -> float | None:
        """The epsilon after ``steps`` steps (default: all ``num_steps``), at ``dp.delta`` under
        ``dp.accountant`` unless given; None without DP."""
        if not self.private:
            return None
        ledger = accounting.PrivacyLedger()
        steps = self.num_steps if steps is None else steps
        if steps:
            self.record_step(ledger, steps)
        return float(ledger.epsilon(self.dp.delta if delta is None else delta,
                                    accountant=accountant or self.dp.accountant))


# --------------------------------------------------------------------------------------------------------------
# Building a plan.


def _per_example(losses: Any, batch: int) -> jax.Array:
    losses = jnp.asarray(losses)
    if losses.shape != (batch,):
        raise ValueError(f"loss_fn must return one loss per example, shape ({batch},); got shape {losses.shape}. "
                         "Return the per-example losses (e.g. optax.softmax_cross_entropy_with_integer_labels), "
                         "not their mean.")
    return losses


def _mean_loss(loss_fn: LossFn) -> Callable[[PyTree, PyTree, Any], jax.Array]:
    """The ``(params, inputs, labels) -> mean loss`` form :func:`jaxdp.clipped_grad` takes (labels unused: the
    whole example is the ``batch`` pytree)."""

    def mean_loss(params, batch, _labels=None):
        leaves = jax.tree_util.tree_leaves(batch)
        return jnp.mean(_per_example(loss_fn(params, batch), leaves[0].shape[0]))

    return mean_loss


@functools.lru_cache(maxsize=64)
def _jit_init(init: Callable[[PyTree], PyTree]) -> Callable[[PyTree], PyTree]:
    """An optimiser's ``init`` compiled (cached per function: a plan's ``init`` is called again on restarts)."""
    return jax.jit(init)


@jax.jit
def _copy_tree(tree: PyTree) -> PyTree:
    """Fresh copies of every leaf, in one compiled program (the tree is an argument: no value is compiled in)."""
    return jax.tree_util.tree_map(jnp.copy, tree)


def _as_array(a: Any) -> Any:
    """Host arrays stay on the host (sliced there, each chunk transferred once); jax arrays as they are."""
    return a if isinstance(a, jax.Array) else np.asarray(a)


def _chunked_inputs(batch: PyTree, mask: Any, groups: Any, method: Any) -> list[tuple[PyTree, Any, Any]]:
    """``[(batch, mask, groups)]`` of each chunk, after checking their shapes agree. One chunk given without the
    chunk axis (``mask`` ``[width]``) is passed on as it is: a device array sliced here would cost an eager
    operation per leaf on the host at every step."""
    mask = _as_array(mask)
    if mask.dtype != np.bool_ or mask.ndim not in (1, 2):
        raise ValueError(f"mask must be bool[n_chunks, width] (or bool[width] for one chunk): True for real "
                         f"examples, False for padding; got {mask.dtype}{list(mask.shape)}.")
    one_chunk = mask.ndim == 1
    batch = jax.tree_util.tree_map(_as_array, batch)
    for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
        if tuple(np.shape(leaf)[:mask.ndim]) != mask.shape:
            raise ValueError(f"batch{jax.tree_util.keystr(path)} has shape {np.shape(leaf)}; every leaf must "
                             f"start with the mask's shape {tuple(mask.shape)} "
                             f"({'examples' if one_chunk else 'chunks, then examples'}).")
    if groups is None:
        if method.uses_groups:
            raise ValueError(f"method {method.name!r} needs each example's group: pass groups= "
                             "(int32, the mask's shape) to train_step.")
        groups = np.zeros(mask.shape, np.int32)
    else:
        groups = _as_array(groups)
        if groups.shape != mask.shape or not np.issubdtype(groups.dtype, np.integer):
            raise ValueError(f"groups must be integers of the mask's shape {tuple(mask.shape)}; got "
                             f"{groups.dtype}{list(groups.shape)}.")
        groups = groups.astype(np.int32) if groups.dtype != np.int32 else groups
    if one_chunk:
        return [(batch, mask, groups)]
    return [(jax.tree_util.tree_map(lambda a, c=c: a[c], batch), mask[c], groups[c]) for c in range(mask.shape[0])]


def _num_steps(epochs: float | None, steps: int | None, steps_per_epoch: int) -> int:
    if (epochs is None) == (steps is None):
        raise ValueError(f"make_plan needs exactly one of epochs and steps; got epochs={epochs!r}, steps={steps!r}.")
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1:
            raise ValueError(f"steps={steps!r} must be an integer >= 1.")
        return int(steps)
    if isinstance(epochs, bool) or not isinstance(epochs, int | float | np.number) or not (
            math.isfinite(epochs) and epochs > 0):
        raise ValueError(f"epochs={epochs!r} must be a finite number > 0.")
    return max(1, int(round(float(epochs) * steps_per_epoch)))


def _check_sizes(dataset_size: Any, batch_size: Any, public_size: Any) -> None:
    for name, value in (("dataset_size", dataset_size), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1.")
    size = dataset_size if public_size is None else public_size
    if batch_size > size:
        raise ValueError(f"batch_size={batch_size} is larger than the training set ({size} examples); use a "
                         f"batch_size <= {size}.")


def _run_randomness(dp: DPConfig | None, secret: int | None, public_seed: int) -> tuple[int | None, int, jax.Array]:
    """(secret, sampler seed, noise key) of a run: a private, non-reproducible run's come from its secret (a fresh
    one when None), every other run's from the public seed (and its secret is None)."""
    private, reproducible = dp is not None, dp is not None and dp.reproducible
    if private and not reproducible:
        secret = new_run_secret() if secret is None else secret
        sampler_seed = child_seed(secret, _SAMPLER_STREAM)
        noise_key = noise.key_from_seed(child_seed(secret, _NOISE_STREAM))
    else:  # non-private runs have nothing to protect: their batches follow the public seed, reproducibly
        secret = None
        sampler_seed = int(public_seed)
        noise_key = jax.random.fold_in(jax.random.key(int(public_seed)), 1)
    return secret, sampler_seed, noise_key


def make_plan(
    dp: DPConfig | None,
    loss_fn: LossFn,
    *,
    dataset_size: int,
    batch_size: int,
    optimizer: optax.GradientTransformation | Callable[[int], optax.GradientTransformation],
    epochs: float | None = None,
    steps: int | None = None,
    execution: ExecutionConfig | None = None,
    sampling_scheme: str = "poisson",
    public_seed: int = 0,
    secret: int | None = None,
    mesh: Any = None,
    public_size: int | None = None,
    has_model_state: bool = False,
    num_params: int | None = None,
) -> DPPlan:
    """Builds the plan of a run (see the module docstring).

    Args:
      dp: the privacy settings, or None for non-private training through the same interface.
      loss_fn: ``loss_fn(params, batch) -> per-example losses`` (with ``has_model_state``, non-private only:
        ``loss_fn(params, batch, model_state) -> (losses, new model state)``).
      dataset_size: the number of training examples (public, see docs/threat-model.md).
      batch_size: the expected batch size under Poisson sampling (q = batch_size / dataset_size), the exact one
        for fixed-size batches; the public normaliser of the summed gradient.
      optimizer: the optax optimiser applied to the noised average gradient (post-processing), or a function of
        the run's step count returning one (to size a schedule: ``lambda num_steps: optax.adam(
        optax.cosine_decay_schedule(1e-3, num_steps))``).
      epochs: the run's length in epochs of ``round(1 / q)`` steps each (give exactly one of epochs and steps).
      steps: the run's length in steps.
      execution: performance-only settings (:class:`ExecutionConfig`).
      sampling_scheme: the batches of a non-private plan (``dp.sampling`` sets them under DP).
      public_seed: seeds a non-private plan's batches, and a ``reproducible`` plan's batches and noise.
      secret: the run's secret (e.g. restored from a checkpoint); None draws a fresh one
        (:func:`new_run_secret`) for a private, non-reproducible plan.
      mesh: a 1-D device mesh (:func:`jaxdp.parallel.make_mesh`) to split each chunk over (data parallelism);
        chunks are padded to a multiple of its size.
      public_size: the dataset size that sets q = batch_size / public_size and the chunk widths (default
        ``dataset_size``): a run whose pool holds examples whose number must stay secret (an audit's canaries)
        keeps the q, steps, epsilon and compiled shapes of its public training set.
      has_model_state: the loss carries a model state (BatchNorm statistics); refused under DP.
      num_params: the number of parameters (noised coordinates per step): the accountant charges the noise
        sampler's own delta per coordinate (:func:`jaxdp.accounting.epsilon`); None counts 2^32 - 1, an upper
        bound that makes epsilon very slightly larger.
    """
    execution = execution or ExecutionConfig()
    _check_sizes(dataset_size, batch_size, public_size)
    if not isinstance(optimizer, optax.GradientTransformation) and not callable(optimizer):
        raise TypeError(f"optimizer must be an optax.GradientTransformation (e.g. optax.adam(1e-3)) or a function "
                        f"of the step count returning one; got {type(optimizer).__name__}.")
    if dp is not None and not isinstance(dp, DPConfig):
        raise TypeError(f"dp must be a jaxdp.DPConfig or None (non-private); got {type(dp).__name__}.")
    if dp is not None and has_model_state:
        raise ValueError("has_model_state=True under DP: a model state updated from the batch (BatchNorm on batch "
                         "statistics) makes each example's gradient depend on the others, which voids the "
                         "per-example sensitivity bound; use GroupNorm/LayerNorm, or train without DP.")
    private = dp is not None
    secret, sampler_seed, noise_key = _run_randomness(dp, secret, public_seed)
    num_devices = 1 if mesh is None else int(mesh.size)
    q = None if public_size is None or public_size == dataset_size else batch_size / public_size
    sampler = sampling.make_sampler(dp.sampling if private else sampling_scheme, dataset_size, batch_size,
                                    seed=sampler_seed, chunk_multiple=num_devices, sampling_prob=q,
                                    num_chunk_widths=execution.num_chunk_widths, public_size=public_size,
                                    physical_batch_size=execution.physical_batch_size)
    num_steps = _num_steps(epochs, steps, sampler.steps_per_epoch)
    if not isinstance(optimizer, optax.GradientTransformation):
        optimizer = optimizer(num_steps)
        if not isinstance(optimizer, optax.GradientTransformation):
            raise TypeError(f"optimizer(num_steps={num_steps}) must return an optax.GradientTransformation; got "
                            f"{type(optimizer).__name__}.")
    common = dict(dp=dp, execution=execution, sampler=sampler, optimizer=optimizer,
                  expected_batch_size=float(batch_size), num_steps=num_steps, loss_fn=loss_fn,
                  has_model_state=has_model_state, mesh=mesh, num_params=num_params, secret=secret)
    if not private:
        return DPPlan(clipped_grad=None, noise_multiplier=None, noise=optax.scale(1.0 / batch_size),
                      method=methods.DPSGD(), **common)

    # The public expected batch size (never the pool's, which may hold secret canaries).
    method = methods.from_params(dp.method, float(jax.tree_util.tree_leaves(dp.l2_clip_norm)[0]),
                                 dp.method_params, float(batch_size))
    noise_multiplier = dp.noise_multiplier
    coordinates = None if num_params is None else num_params + method.num_counts
    if dp.target_epsilon is not None:
        noise_multiplier = _calibrate(dp, sampler, num_steps, public_size or dataset_size,
                                      method.extra_noise_multipliers, coordinates)
    sensitivity = method.sensitivity if method.clip_rule is not None else None
    clipped = clipping.clipped_grad(_mean_loss(loss_fn), l2_clip_norm=dp.l2_clip_norm,
                                    microbatch_size=execution.microbatch_size, strategy=execution.clipping_strategy,
                                    return_loss=True, clip_rule=method.clip_rule, rule_sensitivity=sensitivity,
                                    strategy_options=execution.strategy_options)
    tx = noise.dp_noise(noise_multiplier, clipped.sensitivity, batch_size, noise_key, secure=dp.secure_noise,
                        mechanism=dp.noise_mechanism)
    plan = DPPlan(clipped_grad=clipped, noise_multiplier=float(noise_multiplier), noise=tx, method=method, **common)
    plan.epsilon()  # refuses now, not at the end of the run, a noise the sampler's own delta cannot afford
    return plan


def _calibrate(dp: DPConfig, sampler: Any, num_steps: int, dataset_size: int,
               extra_noise_multipliers: tuple[float, ...], num_params: int | None) -> float:
    """The gradient noise multiplier z meeting ``dp.target_epsilon`` for steps that also release the method's
    counts: the combined multiplier (z^-2 + sum sigma^-2)^-1/2 is calibrated, then solved for z."""
    target = float(dp.target_epsilon)
    z_eff = accounting.calibrate_noise(target, sampler.sampling_prob, num_steps, float(dp.delta),
                                       accountant=dp.accountant, sampling=sampler.scheme, dataset_size=dataset_size,
                                       mechanism=dp.noise_mechanism, num_params=num_params)
    rest = z_eff**-2 - sum(s**-2 for s in extra_noise_multipliers)
    if rest <= 0:
        raise ValueError(
            f"target_epsilon={target} cannot be met: the method's own releases (noise multipliers "
            f"{list(extra_noise_multipliers)}) already spend more than it allows with no gradient at all; raise the "
            f"target, or the method's count_noise_multiplier.")
    # A hair more noise than the exact solution, so that rounding never puts the combined epsilon above the target.
    return rest**-0.5 * (1 + 1e-9)
