"""Your own training loop around jaxdp's DP step, with a Flax NNX model and an optax optimiser of your choice.

Shows:

* a Flax NNX model turned into the functional ``loss_fn(params, batch)`` the plan takes (``nnx.split`` outside,
  ``nnx.merge`` inside the loss);
* any optax optimiser (here AdamW on a warmup-cosine schedule): it receives the noised, averaged gradient, so
  what it does is post-processing and costs no privacy;
* the loop is yours: evaluation and logging every ``LOG_EVERY`` steps, with epsilon so far
  (``plan.epsilon(steps=...)``);
* checkpoint and resume: the state and the plan's secret are saved half-way, everything is dropped, and training
  resumes from the file exactly where it stopped.

    pip install -e '.[examples]'
    python examples/custom_loop_nnx.py
"""

import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import jaxdp

DELTA = 1e-5
NUM_STEPS, BATCH_SIZE, LOG_EVERY = 200, 128, 50


class MLP(nnx.Module):
    """LayerNorm normalises each example on its own, so examples stay independent, as per-example clipping needs."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.hidden = nnx.Linear(64, 128, rngs=rngs)
        self.norm = nnx.LayerNorm(128, rngs=rngs)
        self.out = nnx.Linear(128, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(nnx.relu(self.norm(self.hidden(x))))


def load_data() -> tuple[dict, dict]:
    digits = load_digits()
    features = (digits.data / 16.0).astype(np.float32)  # [N, 64] in [0, 1]
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(features))
    test, train = order[:360], order[360:]
    return {"x": features[train], "y": labels[train]}, {"x": features[test], "y": labels[test]}


def build_plan(graphdef: nnx.GraphDef, num_train: int, secret: int | None = None) -> jaxdp.DPPlan:
    def loss_fn(params, batch):
        # One loss per example: the plan clips each example's gradient of this loss on its own.
        logits = nnx.merge(graphdef, params)(batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

    # The schedule counts optimiser updates, one per DP step, so the plan is given a number of steps, not epochs.
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak_value=5e-3, warmup_steps=20, decay_steps=NUM_STEPS)
    dp = jaxdp.DPConfig(l2_clip_norm=1.0, noise_multiplier=1.5, delta=DELTA)
    # secret=None draws a fresh secret from the operating system; a resumed run passes the saved one, so that its
    # batches and noise continue the interrupted run's instead of starting new random streams.
    return jaxdp.make_plan(dp, loss_fn, dataset_size=num_train, batch_size=BATCH_SIZE, steps=NUM_STEPS,
                           optimizer=optax.adamw(schedule, weight_decay=1e-4), secret=secret)


def save_checkpoint(path: Path, state: jaxdp.TrainState, step: int, secret: int) -> None:
    """The state's arrays (parameters, optimiser state, the noise's key) plus the step and the run's secret.

    Both the noise key in the state and the secret are as sensitive as the training data: with them anyone can
    regenerate every batch and every noise draw and subtract the noise from the released model, and epsilon no
    longer means anything. Keep checkpoints where only the training data's owners can read them.
    """
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(state)]
    np.savez(path, *leaves, step=step, secret=f"{secret:032x}")


def load_checkpoint(path: Path) -> tuple[list[np.ndarray], int, int]:
    """``(the state's arrays, step, secret)``; the arrays go back into a state with ``jax.tree.unflatten``."""
    with np.load(path) as saved:
        leaves = [saved[f"arr_{i}"] for i in range(len(saved.files) - 2)]
        return leaves, int(saved["step"]), int(str(saved["secret"]), 16)


def train(plan: jaxdp.DPPlan, state: jaxdp.TrainState, train_data: dict, start: int, stop: int,
          evaluate) -> jaxdp.TrainState:
    loss_sum, loss_count = 0.0, 0
    for step in range(start, stop):
        batch, mask = plan.gather(train_data, plan.batch(step))
        state, out = plan.train_step(state, batch, mask)
        # out.losses are the batch's exact losses: a statistic of the training data without noise, which epsilon
        # does not cover. Fine for watching your own run; don't publish them as part of the private model.
        loss_sum += jnp.sum(jnp.where(mask, out.losses, 0.0))
        loss_count += int(mask.sum())
        if (step + 1) % LOG_EVERY == 0 or step + 1 == plan.num_steps:
            print(f"step {step + 1:4d}  nonprivate_train_loss {float(loss_sum) / max(loss_count, 1):.3f}  "
                  f"test accuracy {100 * evaluate(state.params):.1f}%  "
                  f"epsilon so far {plan.epsilon(steps=step + 1):.3f}", flush=True)
            loss_sum, loss_count = 0.0, 0
    return state


def main() -> None:
    train_data, test_data = load_data()
    graphdef, params = nnx.split(MLP(nnx.Rngs(0)))  # the model holds parameters only (no batch statistics)

    @jax.jit
    def evaluate(params) -> jax.Array:
        logits = nnx.merge(graphdef, params)(test_data["x"])
        return jnp.mean(jnp.argmax(logits, axis=-1) == test_data["y"])

    plan = build_plan(graphdef, len(train_data["y"]))
    print(f"DP-SGD: noise multiplier {plan.noise_multiplier}, q = {plan.sampler.sampling_prob:.3f}, "
          f"{plan.num_steps} steps")
    half = plan.num_steps // 2
    state = train(plan, plan.init(params), train_data, 0, half, evaluate)

    with tempfile.TemporaryDirectory() as workdir:  # created readable by this user only
        path = Path(workdir) / "checkpoint.npz"
        save_checkpoint(path, state, half, plan.secret)
        del plan, state  # as if the job had been preempted here

        # Resume: the same settings and the saved secret give the same plan (the same calibration, batches and
        # noise streams), so the resumed run ends exactly where an uninterrupted one would.
        leaves, step, secret = load_checkpoint(path)
    plan = build_plan(graphdef, len(train_data["y"]), secret=secret)
    state = jax.tree.unflatten(jax.tree.structure(plan.init(params)), leaves)  # plan.init: only the structure
    print(f"resumed at step {step} from the checkpoint")
    state = train(plan, state, train_data, step, plan.num_steps, evaluate)

    print(f"test accuracy = {100 * float(evaluate(state.params)):.1f}% ({len(test_data['y'])} images, 10 "
          f"classes: chance is 10%)")
    print(f"epsilon = {plan.epsilon():.3f} (delta = {DELTA}, {plan.num_steps} steps, {plan.dp.accountant} "
          "accountant)")


if __name__ == "__main__":
    main()
