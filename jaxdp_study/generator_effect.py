"""Checks that the generated data shows the paper's effect: trained on few men, a model does worse on men.

Trains a small non-private CNN on 32x32 images of generated data at several female fractions, using the
"official" split scheme (balanced test set: 100 images per gender x smiling cell at the defaults), and prints
per-gender test accuracy. Rerun it after changing :mod:`jaxdp.data.synthetic`'s drawing.

    python -m jaxdp_study.generator_effect --data-dir /tmp/generated-4000 --female-fractions 0.7,0.99

The effect is there when male accuracy is clearly lower at 0.99 than at 0.7 while female accuracy is not; what
each generator version measured is in CHANGELOG.md.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def run(data_dir: str, female_fraction: float, seed: int, steps: int, total: int) -> dict[str, float]:
    """Trains once; returns {"female": accuracy, "male": accuracy} on the balanced test set."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import optax

    from jaxdp.data import celeba
    from jaxdp.data.core import DEFAULT_GROUP_ATTRIBUTE, group_names_of
    from jaxdp.fairness import GROUPS

    class SmallCNN(nn.Module):
        @nn.compact
        def __call__(self, x: jax.Array) -> jax.Array:
            for width in (16, 32, 64):
                x = nn.max_pool(nn.relu(nn.Conv(width, (3, 3))(x)), (2, 2), (2, 2))
            return nn.Dense(2)(nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1))))

    train, test = celeba.build_imbalanced(female_fraction=female_fraction, total=total, split_scheme="official",
                                          image_size=32, seed=seed, data_dir=data_dir, source="synthetic")
    images = train.images.astype(np.float32) / 127.5 - 1
    test_images = test.images.astype(np.float32) / 127.5 - 1
    model = SmallCNN()
    params = model.init(jax.random.key(seed), images[:1])
    optimizer = optax.adam(1e-3)
    state = optimizer.init(params)

    @jax.jit
    def step(params, state, x, y):
        def loss(p):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()

        grads = jax.grad(loss)(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(images), 64)
        x = images[idx]
        x = np.where(rng.random((64, 1, 1, 1)) < 0.5, x[:, :, ::-1], x)  # random horizontal flip
        params, state = step(params, state, x, train.label[idx])
    predicted = np.asarray(jnp.argmax(model.apply(params, test_images), -1))
    return {name: float(np.mean(predicted[test.group == g] == test.label[test.group == g]))
            for g, name in zip(GROUPS, group_names_of(DEFAULT_GROUP_ATTRIBUTE), strict=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="where to generate (once) and prepare the data")
    parser.add_argument("--num-images", type=int, default=4000)
    parser.add_argument("--total", type=int, default=2000)
    parser.add_argument("--female-fractions", default="0.7,0.99")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()

    from pathlib import Path

    from jaxdp.data import celeba

    celeba.ensure_generated(Path(args.data_dir) / "downloads" / "manual", args.num_images, seed=0)
    for female_fraction in (float(v) for v in args.female_fractions.split(",")):
        for seed in (int(v) for v in args.seeds.split(",")):
            started = time.time()
            accuracy = run(args.data_dir, female_fraction, seed, args.steps, args.total)
            print(f"female_fraction={female_fraction} seed={seed}: female accuracy {accuracy['female']:.3f}, "
                  f"male accuracy {accuracy['male']:.3f} ({time.time() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
