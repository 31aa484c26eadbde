r"""Time the noise transform, mechanism="gaussian" against mechanism="lattice", side by side in one process.

    python launch/bench_noise.py                      # the demo model (20,650 parameters) and ResNet18 (11.2M)
    python launch/bench_noise.py --calls 50 --json noise_cost.json

For each parameter tree (the real shapes of the demo's model and of the paper's GroupNorm ResNet18, from
``configs/demo.py`` and ``configs/paper.py``): ``dp_noise(...).update`` under ``jax.jit`` (the noise as a training
step runs it), and ``optax.chain(dp_noise, adam)`` under ``jax.jit`` (the whole optimiser update), each the median
of ``--calls`` timed calls after two untimed ones; and, on the small tree, both called eagerly (outside ``jit``,
as issue 25's digits script calls them: the chain's eager time is mostly Adam's own operations, dispatched one by
one by optax). Mechanisms alternate call by call, so a slow phase of a shared machine hits both.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxdp  # noqa: E402
from jaxdp.models import factory  # noqa: E402

MECHANISMS = ("gaussian", "lattice")


def model_gradient(config_name: str) -> dict:
    """A gradient-shaped pytree of the config's model (its real leaves), filled with small values."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "configs" / f"{config_name}.py"
    spec = importlib.util.spec_from_file_location(config_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    model = factory.create_model(config.model, private=True)
    size = int(config.data.image_size)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
    return jax.tree_util.tree_map(lambda s: jnp.full(s.shape, 0.01, s.dtype), shapes["params"])


def _median_ms(functions: dict, calls: int) -> dict:
    """Median wall time (ms) of each function, called in alternation."""
    for f in functions.values():
        jax.block_until_ready(f())
        jax.block_until_ready(f())
    times = {name: [] for name in functions}
    for _ in range(calls):
        for name, f in functions.items():
            start = time.perf_counter()
            jax.block_until_ready(f())
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


def measure(grads: dict, calls: int, eager: bool) -> dict:
    params = sum(x.size for x in jax.tree_util.tree_leaves(grads))
    rows: dict = {"params": int(params)}
    noise_fns, chain_fns, eager_fns, eager_chain_fns = {}, {}, {}, {}
    for mechanism in MECHANISMS:
        tx = jaxdp.dp_noise(0.7, 1.0, 256, jax.random.key(1), mechanism=mechanism)
        state = tx.init(grads)
        update = jax.jit(tx.update)
        noise_fns[mechanism] = lambda update=update, state=state: update(grads, state)
        chained = optax.chain(jaxdp.dp_noise(0.7, 1.0, 256, jax.random.key(1), mechanism=mechanism),
                              optax.adam(1e-3))
        chain_state = chained.init(grads)
        chain_update = jax.jit(chained.update)
        chain_fns[mechanism] = lambda u=chain_update, s=chain_state: u(grads, s, grads)
        eager_fns[mechanism] = lambda tx=tx, state=state: tx.update(grads, state)
        eager_chain_fns[mechanism] = lambda tx=chained, state=chain_state: tx.update(grads, state, grads)
    rows["noise_jit_ms"] = _median_ms(noise_fns, calls)
    rows["noise_and_adam_jit_ms"] = _median_ms(chain_fns, calls)
    if eager:
        rows["noise_eager_ms"] = _median_ms(eager_fns, calls)
        rows["noise_and_adam_eager_ms"] = _median_ms(eager_chain_fns, calls)
    for key in [k for k in rows if k.endswith("_ms")]:
        rows[key]["lattice_over_gaussian"] = rows[key]["lattice"] / rows[key]["gaussian"]
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20, help="timed calls per function (median reported)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    result = {
        "command": " ".join(["python", "launch/bench_noise.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
        "jax": jax.__version__, "python": platform.python_version(), "calls": args.calls,
        "trees": {},
    }
    for name, eager in (("demo", True), ("paper", False)):
        rows = measure(model_gradient(name), args.calls, eager)
        result["trees"][name] = rows
        print(f"{name} model, {rows['params']:,} parameters ({result['device']}):")
        for key in [k for k in rows if k.endswith("_ms")]:
            r = rows[key]
            print(f"  {key:22s} gaussian {r['gaussian']:9.3f}  lattice {r['lattice']:9.3f}  "
                  f"ratio {r['lattice_over_gaussian']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    assert all(math.isfinite(v) for rows in result["trees"].values() for k, r in rows.items() if k.endswith("_ms")
               for v in r.values())
    return result


if __name__ == "__main__":
    main()
