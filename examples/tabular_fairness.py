"""An MLP on tabular data with a minority group: DP-SGD, the DP-fairness method DPSGD-F, per-group accuracy.

Shows a DP-fairness method as one ``DPConfig`` setting (``method="dpsgd_f"``, Xu, Du & Wu 2021: per-group clip
bounds adapted from privately counted clip fractions), each example's group handed to the training step, both
runs calibrated to the same epsilon (the method's noisy counts are accounted with the gradient's), the
non-private baseline through the same interface (``dp=None``), and ``jaxdp.group_metrics`` for per-group test
accuracy with 95% confidence intervals.

The data are generated here (numpy): 20% of the examples belong to group 1, whose label depends on the features
differently from the majority's, which is the setting where DP-SGD's clipping and noise hurt the minority most.

    pip install -e '.[examples]'
    python examples/tabular_fairness.py
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxdp

TARGET_EPSILON, DELTA = 2.0, 1e-5
L2_CLIP_NORM = 1.0
BATCH_SIZE, EPOCHS, LEARNING_RATE = 256, 8, 0.01
NUM_FEATURES, MINORITY_FRACTION = 12, 0.2


def generate(num_examples: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Features N(0, I), a 0/1 group (1 = the minority) and a 0/1 label from a logistic model whose weights differ
    between the groups in half of the features."""
    majority_weights = np.linspace(1.0, -1.0, NUM_FEATURES)
    minority_weights = majority_weights * np.where(np.arange(NUM_FEATURES) % 2 == 0, 1.0, -1.0)
    group = (rng.random(num_examples) < MINORITY_FRACTION).astype(np.int32)
    features = rng.normal(size=(num_examples, NUM_FEATURES)).astype(np.float32)
    logits = np.where(group == 1, features @ minority_weights, features @ majority_weights)
    label = (rng.random(num_examples) < 1 / (1 + np.exp(-1.5 * logits))).astype(np.int32)
    # The group is also a feature, as a sensitive attribute often is in tabular data.
    x = np.concatenate([features, group[:, None].astype(np.float32)], axis=1)
    return {"x": x, "y": label, "group": group}


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(2)(nn.relu(nn.Dense(32)(x)))


def train(method: str | None, train_data: dict, test_data: dict) -> None:
    """Trains and evaluates with DP-SGD or a DP-fairness ``method``, or without privacy (``method=None``)."""
    model = MLP()
    params = model.init(jax.random.key(0), train_data["x"][:1])["params"]

    def loss_fn(params, batch):
        logits = model.apply({"params": params}, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

    # Same target for both methods: DPSGD-F's noisy per-group counts are released from the same batches, so the
    # calibration gives its gradient a little more noise to pay for them.
    dp = None if method is None else jaxdp.DPConfig(l2_clip_norm=L2_CLIP_NORM, target_epsilon=TARGET_EPSILON,
                                                    delta=DELTA, method=method)
    plan = jaxdp.make_plan(dp, loss_fn, dataset_size=len(train_data["y"]), batch_size=BATCH_SIZE, epochs=EPOCHS,
                           optimizer=optax.adam(LEARNING_RATE))
    state = plan.init(params)
    for step in range(plan.num_steps):
        batch, mask = plan.gather(train_data, plan.batch(step))
        # Each example's group: DPSGD-F clips and counts per group (for plain DP-SGD it changes nothing).
        state, _ = plan.train_step(state, batch, mask, batch["group"])

    predictions = np.asarray(jnp.argmax(model.apply({"params": state.params}, test_data["x"]), axis=-1))
    m = jaxdp.group_metrics(test_data["y"], predictions, test_data["group"])
    # The method's state (DPSGD-F's per-group bounds) is computed from its noisy counts only: public, covered by
    # epsilon.
    if plan.private:
        extra = "".join(f", {k} {v:.2f}" for k, v in plan.method.public_state(state.method_state).items())
        print(f"{method}: noise multiplier {plan.noise_multiplier:.3f}{extra}")
    else:
        print("non-private (the same plan interface with dp=None: plain gradients, no noise)")
    chance = 100 * max(np.mean(test_data["y"]), 1 - np.mean(test_data["y"]))
    print(f"  test accuracy = {m['accuracy']:.1f}%: group 0 {m['accuracy_0']:.1f}% "
          f"[{m['accuracy_0_ci_low']:.1f}, {m['accuracy_0_ci_high']:.1f}], group 1 {m['accuracy_1']:.1f}% "
          f"[{m['accuracy_1_ci_low']:.1f}, {m['accuracy_1_ci_high']:.1f}] ({m['n_0']} / {m['n_1']} test examples, "
          f"majority class {chance:.1f}%)")
    if plan.private:
        print(f"  epsilon = {plan.epsilon():.3f} (delta = {DELTA}, {plan.num_steps} steps, {dp.accountant} "
              "accountant)")


def main() -> None:
    rng = np.random.default_rng(0)
    train_data, test_data = generate(8000, rng), generate(4000, rng)
    for method in (None, "dpsgd", "dpsgd_f"):
        train(method, train_data, test_data)


if __name__ == "__main__":
    main()
