"""A small CNN on scikit-learn's handwritten digits, trained with DP-SGD to a target epsilon.

Shows the shortest path from your own model and arrays to a private model: a ``DPConfig`` with an epsilon target
(the noise multiplier is calibrated to it), a plan built from your per-example loss, Poisson-sampled batches and
the plan's jitted training step. The digits (1,797 8x8 images, 10 classes) ship with scikit-learn, so nothing is
downloaded.

    pip install -e '.[examples]'
    python examples/digits_cnn.py
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import jaxdp

TARGET_EPSILON, DELTA = 3.0, 1e-5  # delta well below 1 / (number of training examples)
L2_CLIP_NORM = 1.0
BATCH_SIZE, EPOCHS, LEARNING_RATE = 256, 15, 0.02


class CNN(nn.Module):
    """GroupNorm, not BatchNorm: BatchNorm's batch statistics mix examples, so one example's gradient would depend
    on the others and clipping would no longer bound its contribution (the plan refuses a model state under DP)."""

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = nn.relu(nn.GroupNorm(num_groups=4)(nn.Conv(16, (3, 3))(images)))
        x = nn.relu(nn.GroupNorm(num_groups=4)(nn.Conv(32, (3, 3), strides=2)(x)))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def main() -> None:
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]  # [N, 8, 8, 1] in [0, 1]
    labels = digits.target.astype(np.int32)
    # The split is data preparation, before the mechanism: epsilon protects whichever examples end up in `train`.
    order = np.random.default_rng(0).permutation(len(images))
    test, train = order[:360], order[360:]
    train_data = {"x": images[train], "y": labels[train]}  # any pytree whose leaves share the example axis

    model = CNN()
    params = model.init(jax.random.key(0), images[:1])["params"]

    def loss_fn(params, batch):
        # One loss per example, not the mean: the plan differentiates each example's loss on its own to clip it.
        logits = model.apply({"params": params}, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

    dp = jaxdp.DPConfig(l2_clip_norm=L2_CLIP_NORM, target_epsilon=TARGET_EPSILON, delta=DELTA)
    # Poisson sampling (DPConfig's default) is what the accountant assumes: each example joins each step's batch
    # independently with probability q = BATCH_SIZE / len(train), so batch sizes vary around BATCH_SIZE.
    plan = jaxdp.make_plan(dp, loss_fn, dataset_size=len(train), batch_size=BATCH_SIZE, epochs=EPOCHS,
                           optimizer=optax.adam(LEARNING_RATE))
    print(f"DP-SGD: noise multiplier {plan.noise_multiplier:.3f} (calibrated to epsilon <= {TARGET_EPSILON} at "
          f"delta = {DELTA}), q = {plan.sampler.sampling_prob:.3f}, {plan.num_steps} steps, clip norm "
          f"{plan.sensitivity}")

    state = plan.init(params)
    for step in range(plan.num_steps):
        # Which examples a step takes comes from the plan's secret seed; an attacker who could predict it would
        # know who was (not) in each batch, which the accounting assumes they cannot.
        batch, mask = plan.gather(train_data, plan.batch(step))
        state, _ = plan.train_step(state, batch, mask)

    predictions = jnp.argmax(model.apply({"params": state.params}, images[test]), axis=-1)
    accuracy = float(jnp.mean(predictions == labels[test]))
    # The test set is not training data, so its accuracy costs no privacy. Trying hyperparameters on the private
    # training data does, and epsilon does not count it: these were picked by hand on this public dataset.
    print(f"test accuracy = {100 * accuracy:.1f}% ({len(test)} images, 10 classes: chance is 10%)")
    print(f"epsilon = {plan.epsilon():.3f} (delta = {DELTA}, {plan.num_steps} steps, {dp.accountant} accountant)")


if __name__ == "__main__":
    main()
