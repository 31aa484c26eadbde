"""Speed benchmark of a full DP-SGD training step: jaxdp's clipping strategies, side by side with Opacus.

One *step* is what a training loop does per batch: gradients (per-example clipped and summed under DP),
Gaussian noise (:func:`jaxdp.dp_noise`) and an Adam update. The model is the paper's GroupNorm ResNet18 with a
2-way head (:func:`jaxdp.models.ResNet18`; smaller family members via ``stage_sizes``/``width``) on random
images. Entries:

* ``jax nonprivate (flax conv)``: ``jax.grad`` of the plain Flax model, Adam.
* ``jax nonprivate (matmul conv)``: the same with small-map convolutions as patches x matmul
  (:func:`jaxdp.clipping.matmul_convs`), what jaxdp's own non-private runs use. The faster of the two
  non-private entries is the baseline of "vs JAX non-private": the honest measure of DP's cost.
* ``jax dp <strategy>``: ``jaxdp.clipped_grad(..., strategy=...)`` + ``dp_noise`` + Adam, per strategy.
* ``jax dp noise+adam only``: ``dp_noise`` + Adam on zero gradients: the part of a DP step's time that no
  clipping strategy can remove (one Gaussian draw per parameter).
* ``jax dp <strategy> <method>`` (with ``methods=``, e.g. ``("dpsgd_f", "dpsgd_global", "dpsgd_global_adapt")``):
  the step of a DP-fairness method of :mod:`jaxdp.methods` as training runs it — the method's clip rule and
  per-example arguments (each example's group: 30% of the random batch is group 1), its exact counts, the
  gradient noise scaled to its sensitivity, the noisy release of its counts and its state update — with the
  methods' reference parameters. ``vs_dpsgd`` compares it with the same strategy's plain DP-SGD step.
* ``... (legacy noise)``: the first strategy's step and the noise-only entry again, with the noise drawn as before
  issue 11 (``jax.random.normal``, tails cut at about 5.2 sigma; bench-local, not private enough to use), so that
  the cost of tail-correct noise is measured side by side.
* with ``compare_opacus=True``: ``torch nonprivate`` and ``opacus <mode>`` for each Opacus grad-sample mode
  (``hooks``, ``ghost`` = fast gradient clipping, ``functorch``, ``ew``), the same architecture written in
  PyTorch (torchvision's resnet18 layout, GroupNorm replacing BatchNorm), batch, loss and optimiser.

:func:`run_loop_benchmark` (``launch/bench.py --config CONFIG --loop``) measures the rest of a run against this
step: it trains a config's run in each round and times the step of what the run ran right after it.

How it is measured (every figure in the output is one of these):

* ``examples_per_s``: batch size / the median wall time of the timed steps (each ended with
  ``block_until_ready`` / a synchronous torch step), after a warm-up step. Timed steps are taken in
  *rounds* that visit every entry in turn (JAX and torch interleaved), so slow phases of a noisy machine
  hit all entries alike. In each round, an entry gets a pause of ``settle_s`` (default 1 s: XLA's and
  PyTorch's CPU thread pools keep spinning for a while after a step, and without the pause each entry
  competes with the previous entry's idle threads),
  then one untimed step (which measures the memory, below), then ``steps_per_round`` timed steps back to
  back, as a training loop runs them. (Until this untimed step was added, every timed step came right after
  the heap was trimmed for the memory measurement, so it also paid for faulting its temporaries back in.)
* ``compile_s``: wall time of ``jit(step).lower(...).compile()`` (JAX only).
* ``peak_memory_bytes``: the largest growth of the process's resident memory during one step, over the
  rounds' untimed steps: before each such step free heap memory is returned to the OS (``malloc_trim``), the kernel's
  peak-RSS counter is reset (``/proc/self/clear_refs``) and ``VmHWM - VmRSS(before)`` is read afterwards.
  So it counts the step's temporaries (activations, per-example quantities, patches), not the parameters
  and optimiser state that persist between steps (JAX donates them). Same method for JAX and torch; Linux
  only (``None`` elsewhere). On CPU XLA's ``compiled.memory_analysis()`` is not used: it reports no
  temporaries there. On a GPU/TPU the JAX entries instead report device memory from that analysis:
  ``temp + argument + output - alias`` bytes of the compiled step (this includes parameters and optimiser
  state, so ratios there are not comparable with the CPU ones).
* ratios: ``vs_jax_nonprivate`` = examples/s over the fastest JAX non-private entry's; ``vs_dpsgd`` (method
  entries) = examples/s over the plain DP-SGD entry of the same strategy;
  ``vs_fastest_opacus`` = examples/s over the fastest Opacus mode's; ``memory_vs_nonprivate`` = peak memory
  over the same framework's plain non-private step's (plain Flax; plain torch).
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import jaxdp
from jaxdp import clipping, methods
from jaxdp.models import ResNet18, random_params

OPACUS_MODES = ("hooks", "ghost", "functorch", "ew")
METHOD_NAMES = methods.METHODS[1:]  # the DP-fairness methods (plain DP-SGD is every strategy's "jax dp" entry)
TORCH_INSTALL = "pip install torch==2.13.0 opacus"  # or: pip install 'jaxdp[bench]'


@dataclasses.dataclass
class Entry:
    """One benchmarked training step and its measurements."""

    name: str
    framework: str  # "jax" | "torch"
    private: bool
    step_s: list[float] = dataclasses.field(default_factory=list)
    compile_s: float | None = None
    peak_memory_bytes: int | None = None
    error: str | None = None
    examples_per_s: float | None = None
    vs_jax_nonprivate: float | None = None
    vs_fastest_opacus: float | None = None
    memory_vs_nonprivate: float | None = None
    vs_dpsgd: float | None = None
    _baseline: str | None = dataclasses.field(default=None, repr=False)  # the entry vs_dpsgd compares with
    _run: Callable[[], None] | None = dataclasses.field(default=None, repr=False)


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _legacy_dp_noise(noise_multiplier: float, l2_clip_norm: float, expected_batch_size: int,
                     key: jax.Array) -> optax.GradientTransformation:
    """``dp_noise`` as it was before issue 11, for timing only: ``jax.random.normal`` (float32 tails cut at about
    5.2 sigma, which breaks delta), a key folded with the step and split per leaf."""
    stddev = noise_multiplier * jaxdp.clipping.sensitivity(l2_clip_norm)

    def update(updates, state, params=None):
        key_data, count = state
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        keys = jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(key_data), count), len(leaves))
        noised = [(g + stddev * jax.random.normal(k, g.shape, jnp.float32)) / expected_batch_size
                  for g, k in zip(leaves, keys, strict=True)]
        return jax.tree_util.tree_unflatten(treedef, noised), (key_data, count + 1)

    return optax.GradientTransformation(lambda _: (jax.random.key_data(key), jnp.zeros((), jnp.int32)), update)


def _method_of(name: str, l2_clip_norm: float, batch_size: int) -> methods.Method:
    """A method of jaxdp.methods with its reference parameters (DPSGD-F's C0 = the clip bound)."""
    from jaxdp.config import base_config

    dp = base_config().dp
    dp.method, dp.l2_clip_norm = name, l2_clip_norm
    return methods.from_config(dp, batch_size)


def _jax_entries(image_size: int, batch_size: int, strategies: Sequence[str], *, stage_sizes, width: int,
                 num_groups: int, l2_clip_norm: float, noise_multiplier: float, learning_rate: float,
                 seed: int, max_pixels: int, include_noise_only: bool,
                 method_names: Sequence[str] = (), nonprivate: Sequence[str] = ("flax conv", "matmul conv"),
                 secure_noise: bool = False) -> list[Entry]:
    model = ResNet18(num_classes=2, stage_sizes=stage_sizes, width=width, num_groups=num_groups)
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.standard_normal((batch_size, image_size, image_size, 3), dtype=np.float32))
    labels = jnp.asarray(rng.integers(0, 2, batch_size), dtype=jnp.int32)
    groups = jnp.asarray(rng.random(batch_size) < 0.3, dtype=jnp.int32)
    mask = jnp.ones(batch_size, bool)
    init_params = random_params(model, images[:1], seed)

    def loss_fn(params, x, y):
        return _cross_entropy(model.apply({"params": params}, x), y)

    entries = []

    def add(name: str, private: bool, build: Callable[[], tuple[optax.GradientTransformation, Callable]]):
        entry = Entry(name, "jax", private)
        try:
            optimizer, grads_of = build()

            def step(params, opt_state, x, y, m):
                updates, opt_state = optimizer.update(grads_of(params, x, y, m), opt_state, params)
                return optax.apply_updates(params, updates), opt_state

            params = jax.tree_util.tree_map(jnp.copy, init_params)
            opt_state = optimizer.init(params)
            start = time.perf_counter()
            compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, images, labels, mask).compile()
            entry.compile_s = time.perf_counter() - start
            if jax.default_backend() != "cpu":  # accelerator memory: XLA's buffer assignment (see docstring)
                stats = compiled.memory_analysis()
                entry.peak_memory_bytes = int(stats.temp_size_in_bytes + stats.argument_size_in_bytes
                                              + stats.output_size_in_bytes - stats.alias_size_in_bytes)
            state = {"params": params, "opt_state": opt_state}

            def run():
                state["params"], state["opt_state"] = compiled(state["params"], state["opt_state"], images,
                                                               labels, mask)
                jax.block_until_ready(state["params"])

            run()  # warm-up
            entry._run = run
        except Exception as error:  # noqa: BLE001 - a failing entry is reported, the others still run
            entry.error = f"{type(error).__name__}: {error}"
        entries.append(entry)

    def plain(loss):
        return lambda: (optax.adam(learning_rate), lambda p, x, y, m: jax.grad(loss)(p, x, y))

    def make_noise(legacy: bool):
        if legacy:
            return _legacy_dp_noise(noise_multiplier, l2_clip_norm, batch_size, jax.random.key(seed + 1))
        return jaxdp.dp_noise(noise_multiplier, l2_clip_norm, batch_size, jax.random.key(seed + 1),
                              secure=secure_noise)

    def private(strategy, legacy=False):
        def build():
            grad_fn = jaxdp.clipped_grad(loss_fn, l2_clip_norm, strategy=strategy)
            return optax.chain(make_noise(legacy), optax.adam(learning_rate)), lambda p, x, y, m: grad_fn(p, x, y, m)[0]

        return build

    def noise_only(legacy=False):
        # The DP step's cost that is not clipping: noise for every parameter plus the update (zero gradients).
        return lambda: (optax.chain(make_noise(legacy), optax.adam(learning_rate)),
                        lambda p, x, y, m: jax.tree_util.tree_map(jnp.zeros_like, p))

    def add_method(strategy: str, name: str):
        # One training step of the method: its clip rule and arguments, its counts, the gradient noise scaled to
        # its sensitivity, the release of its noisy counts and its state update (jaxdp.train.update_step's order).
        entry = Entry(f"jax dp {strategy} {name}", "jax", True, _baseline=f"jax dp {strategy}")
        try:
            method = _method_of(name, l2_clip_norm, batch_size)
            grad_fn = jaxdp.clipped_grad(loss_fn, l2_clip_norm, strategy=strategy, clip_rule=method.clip_rule)
            sensitivity = (l2_clip_norm if method.noise_sensitivity(method.init_state()) is None
                           else float(method.noise_sensitivity(method.init_state())))
            noise = jaxdp.dp_noise(noise_multiplier, sensitivity, batch_size, jax.random.key(seed + 1),
                                   secure=secure_noise)
            adam = optax.adam(learning_rate)
            release_key = jax.random.fold_in(jax.random.key(seed + 1), 1)

            def step(params, opt_state, method_state, x, y, g, m):
                clipped, norms = grad_fn(params, x, y, m, method.clip_args(method_state, g))
                counts = method.counts(norms, m, g, method_state)
                noise_state, adam_state = opt_state
                s = method.noise_sensitivity(method_state)
                noised, new_noise_state = noise.update(clipped, noise_state, params,
                                                       **({} if s is None else {"l2_clip_norm": s}))
                updates, adam_state = adam.update(noised, adam_state, params)
                method_state = methods.release(method, method_state, counts,
                                               jax.random.fold_in(release_key, noise_state.count))
                return optax.apply_updates(params, updates), (new_noise_state, adam_state), method_state

            params = jax.tree_util.tree_map(jnp.copy, init_params)
            state = {"params": params, "opt_state": (noise.init(params), adam.init(params)),
                     "method_state": method.init_state()}
            start = time.perf_counter()
            compiled = jax.jit(step, donate_argnums=(0, 1, 2)).lower(
                state["params"], state["opt_state"], state["method_state"], images, labels, groups, mask).compile()
            entry.compile_s = time.perf_counter() - start
            if jax.default_backend() != "cpu":
                stats = compiled.memory_analysis()
                entry.peak_memory_bytes = int(stats.temp_size_in_bytes + stats.argument_size_in_bytes
                                              + stats.output_size_in_bytes - stats.alias_size_in_bytes)

            def run():
                state["params"], state["opt_state"], state["method_state"] = compiled(
                    state["params"], state["opt_state"], state["method_state"], images, labels, groups, mask)
                jax.block_until_ready(state["params"])

            run()  # warm-up
            entry._run = run
        except Exception as error:  # noqa: BLE001 - a failing entry is reported, the others still run
            entry.error = f"{type(error).__name__}: {error}"
        entries.append(entry)

    if "flax conv" in nonprivate:
        add("jax nonprivate (flax conv)", False, plain(loss_fn))
    if "matmul conv" in nonprivate:
        add("jax nonprivate (matmul conv)", False, plain(clipping.matmul_convs(loss_fn, max_pixels)))
    for strategy in strategies:
        if strategy == "auto":  # the name says what ran
            strategy = clipping.resolve_strategy(loss_fn, init_params, images, labels)[0]
        add(f"jax dp {strategy}", True, private(strategy))
        for name in method_names:
            add_method(strategy, name)
    if include_noise_only:
        if strategies:
            add(f"jax dp {strategies[0]} (legacy noise)", True, private(strategies[0], legacy=True))
        add("jax dp noise+adam only", True, noise_only())
        add("jax dp noise+adam only (legacy noise)", True, noise_only(legacy=True))
    return entries


def _torch_resnet18(stage_sizes, width: int, num_groups: int, num_classes: int = 2):
    """torchvision's resnet18 layout with GroupNorm(min(num_groups, C), C) in place of BatchNorm."""
    import torch.nn as tnn

    def norm(c):
        return tnn.GroupNorm(min(num_groups, c), c, eps=1e-5)

    class Block(tnn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.norm1 = norm(cout)
            self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.norm2 = norm(cout)
            self.relu1, self.relu2 = tnn.ReLU(), tnn.ReLU()
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

        def forward(self, x):
            out = self.norm2(self.conv2(self.relu1(self.norm1(self.conv1(x)))))
            return self.relu2(out + (x if self.downsample is None else self.downsample(x)))

    layers = [tnn.Conv2d(3, width, 7, 2, 3, bias=False), norm(width), tnn.ReLU(), tnn.MaxPool2d(3, 2, 1)]
    cin = width
    for k, blocks in enumerate(stage_sizes):
        cout = width * 2**k
        for j in range(blocks):
            layers.append(Block(cin, cout, 2 if (k > 0 and j == 0) else 1))
            cin = cout
    layers += [tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(cin, num_classes)]
    return tnn.Sequential(*layers)


def _require_torch():
    try:
        import opacus  # noqa: F401
        import torch
    except ImportError as error:
        raise ImportError(
            f"--compare-opacus needs PyTorch and Opacus, which are not installed ({error}). Install them with "
            f"`{TORCH_INSTALL}` (the optional 'bench' extra), or run without --compare-opacus."
        ) from error
    return torch


def _torch_entries(image_size: int, batch_size: int, modes: Sequence[str], *, stage_sizes, width: int,
                   num_groups: int, l2_clip_norm: float, noise_multiplier: float, learning_rate: float,
                   seed: int) -> list[Entry]:
    torch = _require_torch()
    import warnings

    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.standard_normal((batch_size, 3, image_size, image_size), dtype=np.float32))
    labels = torch.from_numpy(rng.integers(0, 2, batch_size))
    entries = []

    def add(name: str, mode: str | None):
        entry = Entry(name, "torch", mode is not None)
        try:
            model = _torch_resnet18(stage_sizes, width, num_groups)
            optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
            criterion = torch.nn.CrossEntropyLoss()
            if mode is not None:
                loader = DataLoader(TensorDataset(images, labels), batch_size=batch_size)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    made = PrivacyEngine().make_private(
                        module=model, optimizer=optimizer, criterion=criterion, data_loader=loader,
                        noise_multiplier=noise_multiplier, max_grad_norm=l2_clip_norm, poisson_sampling=False,
                        grad_sample_mode=mode)
                if mode == "ghost":
                    model, optimizer, criterion, _ = made
                else:
                    model, optimizer, _ = made

            def run():
                optimizer.zero_grad(set_to_none=True)
                loss = criterion(model(images), labels)
                loss.backward()
                optimizer.step()

            run()  # warm-up
            entry._run = run
        except Exception as error:  # noqa: BLE001
            entry.error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        entries.append(entry)

    add("torch nonprivate", None)
    for mode in modes:
        add(f"opacus {mode}", mode)
    return entries


def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _start_peak_rss() -> int | None:
    """Returns the current RSS after trimming the heap and resetting the peak-RSS counter (Linux)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _proc_status_bytes("VmRSS")


def _peak_rss_growth(before: int | None) -> int | None:
    peak = _proc_status_bytes("VmHWM")
    return None if before is None or peak is None else max(peak - before, 0)


def settings_from_config(config: Any) -> dict[str, Any]:
    """The :func:`run_benchmark` arguments an experiment config (``configs/*.py``'s ``get_config()``) fixes.

    The model (``model.stage_sizes``, ``width``, ``num_groups``), ``data.image_size``, ``train.batch_size``, the
    clipping strategy (``dp.clipping_strategy``, the only DP entry), ``dp.l2_clip_norm``, ``dp.noise_multiplier``
    and ``optim.learning_rate``; the sweep's axes are ignored (the config's own values are benchmarked). Raises
    ValueError for a model the benchmark cannot build (it builds the GroupNorm ResNet family).

    >>> from jaxdp.config import base_config
    >>> settings_from_config(base_config())["strategies"]
    ['vmap']
    """
    from jaxdp.models.factory import MODEL_NAMES

    model, dp = config.model, config.dp
    if str(model.name).lower() not in MODEL_NAMES or model.norm != "group":
        raise ValueError(f"the benchmark builds GroupNorm ResNets (config.model.name in {MODEL_NAMES}, norm 'group'); "
                         f"this config asks for name={model.name!r}, norm={model.norm!r}")
    return dict(image_size=int(config.data.image_size), batch_size=int(config.train.batch_size),
                strategies=[str(dp.clipping_strategy)], stage_sizes=tuple(int(s) for s in model.stage_sizes),
                width=int(model.width), num_groups=int(model.num_groups), l2_clip_norm=float(dp.l2_clip_norm),
                noise_multiplier=float(dp.noise_multiplier), learning_rate=float(config.optim.learning_rate))


def run_benchmark(
    image_size: int = 64,
    batch_size: int = 32,
    *,
    strategies: Sequence[str] | None = None,
    compare_opacus: bool = False,
    opacus_modes: Sequence[str] = OPACUS_MODES,
    rounds: int = 3,
    steps_per_round: int = 1,
    stage_sizes: Sequence[int] = (2, 2, 2, 2),
    width: int = 64,
    num_groups: int = 32,
    l2_clip_norm: float = 5.0,
    noise_multiplier: float = 0.7,
    learning_rate: float = 5e-5,
    max_pixels: int = clipping.DEFAULT_MATMUL_MAX_PIXELS,
    include_noise_only: bool = True,
    settle_s: float = 1.0,
    seed: int = 0,
    methods: Sequence[str] = (),
) -> dict[str, Any]:
    """Benchmarks full training steps (see the module docstring); returns a JSON-ready dict.

    ``strategies`` defaults to every strategy of :func:`jaxdp.clipping.available_strategies` but "auto";
    ``methods`` adds, after each strategy's DP-SGD entry, one entry per DP-fairness method of :mod:`jaxdp.methods`
    named. Each entry is timed ``rounds * steps_per_round`` times, round-robin across entries. An entry that fails
    to build or run (e.g. an Opacus mode that does not support a layer) is reported with its ``error`` and no
    speed.

    >>> result = run_benchmark(image_size=16, batch_size=4, stage_sizes=(1,), width=8, rounds=1)
    >>> sorted(result)
    ['config', 'environment', 'results']
    """
    if image_size < 8 or batch_size < 1 or rounds < 1 or steps_per_round < 1 or not settle_s >= 0:
        raise ValueError(
            f"Need image_size >= 8, batch_size >= 1, rounds >= 1, steps_per_round >= 1, settle_s >= 0; got "
            f"image_size={image_size}, batch_size={batch_size}, rounds={rounds}, steps_per_round="
            f"{steps_per_round}, settle_s={settle_s}.")
    if strategies is None:  # every strategy ("auto" is one of them under another name)
        strategies = [s for s in jaxdp.clipping.available_strategies() if s != "auto"]
    unknown = [s for s in strategies if s not in jaxdp.clipping.available_strategies()]
    if unknown:
        raise ValueError(f"Unknown strategies {unknown}; choose from {list(jaxdp.clipping.available_strategies())}.")
    unknown = [m for m in opacus_modes if m not in OPACUS_MODES]
    if unknown:
        raise ValueError(f"Unknown Opacus modes {unknown}; choose from {list(OPACUS_MODES)}.")
    method_names = list(methods)
    unknown = [m for m in method_names if m not in METHOD_NAMES]
    if unknown:
        raise ValueError(f"Unknown methods {unknown}; choose from {list(METHOD_NAMES)} (plain DP-SGD is every "
                         f"strategy's 'jax dp <strategy>' entry).")
    common = dict(stage_sizes=tuple(stage_sizes), width=width, num_groups=num_groups, l2_clip_norm=l2_clip_norm,
                  noise_multiplier=noise_multiplier, learning_rate=learning_rate, seed=seed)
    torch_entries = []
    if compare_opacus:
        _require_torch()  # fail before the long JAX compiles
    entries = _jax_entries(image_size, batch_size, strategies, max_pixels=max_pixels,
                           include_noise_only=include_noise_only, method_names=method_names, **common)
    if compare_opacus:
        torch_entries = _torch_entries(image_size, batch_size, opacus_modes, **common)
        entries += torch_entries

    for _ in range(rounds):
        for entry in entries:
            if entry._run is not None:
                entry.step_s += _timed_round(entry, steps_per_round, settle_s)

    for entry in entries:
        if entry.step_s:
            entry.examples_per_s = batch_size / statistics.median(entry.step_s)

    def best(predicate):
        speeds = [e.examples_per_s for e in entries if predicate(e) and e.examples_per_s]
        return max(speeds) if speeds else None

    jax_nonprivate = best(lambda e: e.framework == "jax" and not e.private)
    # The noise-only entry is a cost breakdown, not a training step; it is not compared as one.
    fastest_opacus = best(lambda e: e.framework == "torch" and e.private)
    baseline_memory = {  # per framework: the first non-private entry (plain Flax; plain torch)
        framework: next((e.peak_memory_bytes for e in entries if e.framework == framework and not e.private), None)
        for framework in ("jax", "torch")
    }
    for entry in entries:
        if entry.examples_per_s and jax_nonprivate:
            entry.vs_jax_nonprivate = entry.examples_per_s / jax_nonprivate
        if entry.examples_per_s and fastest_opacus:
            entry.vs_fastest_opacus = entry.examples_per_s / fastest_opacus
        if entry.peak_memory_bytes and baseline_memory[entry.framework]:
            entry.memory_vs_nonprivate = entry.peak_memory_bytes / baseline_memory[entry.framework]
        baseline = next((e for e in entries if e.name == entry._baseline), None)
        if entry.examples_per_s and baseline is not None and baseline.examples_per_s:
            entry.vs_dpsgd = entry.examples_per_s / baseline.examples_per_s

    environment = _environment()
    if compare_opacus:
        import opacus
        import torch

        environment.update(torch=torch.__version__, opacus=opacus.__version__, torch_threads=torch.get_num_threads())
    config = dict(image_size=image_size, batch_size=batch_size, strategies=list(strategies), rounds=rounds,
                  steps_per_round=steps_per_round, settle_s=settle_s, max_pixels=max_pixels,
                  compare_opacus=compare_opacus,
                  opacus_modes=list(opacus_modes) if compare_opacus else [], **common)
    if method_names:
        config["methods"] = method_names
    config["stage_sizes"] = list(config["stage_sizes"])
    results = [{k: v for k, v in dataclasses.asdict(e).items() if not k.startswith("_")} for e in entries]
    return {"config": config, "environment": environment, "results": results}


def _timed_round(entry: Entry, steps: int, settle_s: float) -> list[float]:
    """One round of ``entry`` (module docstring): a pause of ``settle_s``, one untimed step that measures the
    memory, then ``steps`` timed steps back to back; returns their wall times."""
    time.sleep(settle_s)  # let the previous entry's thread pools go idle (module docstring)
    # The untimed step measures the memory (from a trimmed heap) and brings the heap, caches and thread pools back
    # to the state of a training loop; the timed steps then follow it back to back.
    before = _start_peak_rss()
    entry._run()
    growth = _peak_rss_growth(before)
    if growth is not None and (entry.framework == "torch" or jax.default_backend() == "cpu"):
        entry.peak_memory_bytes = max(entry.peak_memory_bytes or 0, growth)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        entry._run()
        times.append(time.perf_counter() - start)
    return times


def _environment() -> dict[str, Any]:
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "cpu": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
        "memory_method": ("rss growth per step" if jax.default_backend() == "cpu"
                          else "xla memory_analysis temp+argument+output-alias (jax); rss growth (torch)"),
    }


# --------------------------------------------------------------------------------------------------------------
# The training loop around the step, against the step.


def loop_run_config(config: Any, run: str | None = None) -> tuple[Any, str]:
    """The run the loop benchmark trains, and its name: ``config`` itself (its sweep ignored), or with ``run``
    (a regular expression) the first run of ``config``'s sweep (:func:`jaxdp_study.grid.expand`) whose name
    matches. Raises ValueError naming the runs when none matches."""
    import re

    from jaxdp_study import grid

    if run is None:
        config = ml_collections.ConfigDict(config.to_dict())
        if "sweep" in config:
            del config["sweep"]
        return config, str(config.get("name", "run"))
    runs = grid.expand(config)
    match = next((r for r in runs if re.search(run, r.name)), None)
    if match is None:
        raise ValueError(f"run {run!r} matches none of the config's runs: {', '.join(r.name for r in runs)}")
    return match.config, match.name


def _loop_step_entry(run_config: Any, final: dict, seed: int) -> Entry:
    """The benchmark's step for what ``final`` (a run's ``final.json``) says ran: its clipping strategy and
    method (plain DP-SGD: ``jax dp <strategy>``) or, without DP, the non-private matmul-conv step that
    :func:`jaxdp.plan.make_plan` uses; at the run's widest chunk width, with its noise."""
    settings = settings_from_config(run_config)
    private = final["method"] is not None
    strategy, method = final["clipping_strategy"], final["method"]
    if private and final["noise_multiplier"] is not None:
        settings["noise_multiplier"] = float(final["noise_multiplier"])
    width = int(final["chunk_widths"][-1])
    entries = _jax_entries(
        settings["image_size"], width, [strategy] if private else [], stage_sizes=settings["stage_sizes"],
        width=settings["width"], num_groups=settings["num_groups"], l2_clip_norm=settings["l2_clip_norm"],
        noise_multiplier=settings["noise_multiplier"], learning_rate=settings["learning_rate"], seed=seed,
        max_pixels=clipping.DEFAULT_MATMUL_MAX_PIXELS, include_noise_only=False,
        method_names=[method] if private and method != methods.METHODS[0] else [],
        nonprivate=() if private else ("matmul conv",), secure_noise=bool(run_config.dp.secure_noise))
    entry = entries[-1]
    if entry.error:
        raise RuntimeError(f"the benchmark's step for this run failed to build: {entry.error}")
    return entry


def run_loop_benchmark(config: Any, *, run: str | None = None, epochs: float | None = None, rounds: int = 3,
                       steps_per_round: int = 10, settle_s: float = 1.0, seed: int = 0,
                       datasets: tuple[Any, Any] | None = None) -> dict[str, Any]:
    """How much slower a training run's steps are than the benchmark's step for the same config, side by side.

    Each round trains the run (:func:`loop_run_config`; ``epochs`` overrides ``config.train.epochs``) from
    scratch in a temporary directory with :func:`jaxdp.train.train_and_evaluate` — its own data (or
    ``datasets``), sampling, flips, diagnostics, evaluations and checkpoints — and then times the benchmark's
    step for what the run's ``final.json`` says ran (:func:`_loop_step_entry`: its strategy and method, at its
    widest chunk width) as :func:`run_benchmark` does: ``settle_s`` pause, one untimed step, ``steps_per_round``
    timed steps back to back. Each round's pair is close in time, so the machine's drifts hit both alike.

    Per round: ``run_step_s`` = the run's ``time_split_s.train_steps / steps`` (its steps, compiles excluded;
    a Poisson batch wider than the chunk counts as its several chunks), ``run_all_s`` = everything but
    compiling, initialising and loading data, per step (adds evaluation, checkpoints, accounting and the rest),
    ``bench_step_s`` = the median timed step; ``ratio`` = ``run_step_s / bench_step_s``,
    ``ratio_all`` = ``run_all_s / bench_step_s``. ``summary`` holds their medians over the rounds.

    The runs' outputs are deleted with the directory; only timings are returned. Before any training, raises
    ValueError for a config the benchmark cannot build or a run that is not runnable, and
    :class:`jaxdp.data.DataUnavailable` (which says which files to put where) when the run's data is missing
    (:func:`jaxdp.train.check_runnable`).
    """
    import tempfile
    from pathlib import Path

    from jaxdp import train

    if rounds < 1 or steps_per_round < 1 or not settle_s >= 0 or (epochs is not None and not epochs > 0):
        raise ValueError(f"Need rounds >= 1, steps_per_round >= 1, settle_s >= 0, epochs > 0; got rounds={rounds}, "
                         f"steps_per_round={steps_per_round}, settle_s={settle_s}, epochs={epochs}.")
    run_config, name = loop_run_config(config, run)
    if epochs is not None:
        run_config.train.epochs = float(epochs)
    run_config.train.progress = False
    settings_from_config(run_config)  # refuses a model the benchmark cannot build, before any training
    if datasets is None:
        train.check_runnable(run_config)
    entry, rows, final = None, [], {}
    with tempfile.TemporaryDirectory(prefix="jaxdp-loop-bench-") as tmp:
        for r in range(rounds):
            final = train.train_and_evaluate(run_config, Path(tmp) / f"round{r}", datasets=datasets)
            if entry is None:
                entry = _loop_step_entry(run_config, final, seed)
            bench_s = statistics.median(_timed_round(entry, steps_per_round, settle_s))
            split, steps = final["time_split_s"], final["steps"]
            run_s = split["train_steps"] / steps
            run_all = (split["train_steps"] + split["evaluation"] + split["checkpoints"] + split["accounting"]
                       + split["other"]) / steps
            rows.append({"round": r, "run_steps": steps, "run_step_s": run_s, "run_all_s": run_all,
                         "bench_step_s": bench_s, "ratio": run_s / bench_s, "ratio_all": run_all / bench_s,
                         "run_time_split_s": split})
    summary = {key: statistics.median(row[key] for row in rows)
               for key in ("run_step_s", "run_all_s", "bench_step_s", "ratio", "ratio_all")}
    return {
        "config": {"run": name, "epochs": float(run_config.train.epochs), "rounds": rounds,
                   "steps_per_round": steps_per_round, "settle_s": settle_s, "seed": seed,
                   "image_size": int(run_config.data.image_size), "chunk_widths": final["chunk_widths"],
                   "clipping_strategy": final["clipping_strategy"], "method": final["method"],
                   "bench_entry": entry.name, "bench_compile_s": entry.compile_s},
        "environment": _environment(),
        "rounds": rows,
        "summary": summary,
    }


def format_loop_table(result: dict[str, Any]) -> str:
    """A markdown table of a :func:`run_loop_benchmark` result."""
    config = result["config"]
    lines = [
        f"{config['run']}: the run's steps against the benchmark's '{config['bench_entry']}' at width "
        f"{config['chunk_widths'][-1]}, {result['environment']['device']}, {result['environment']['date']}",
        "",
        "| round | run ms/step | run ms/step with eval+ckpt | bench ms/step | ratio | ratio with eval+ckpt |",
        "|---|---|---|---|---|---|",
    ]
    for row in [*result["rounds"], {"round": "median", **result["summary"]}]:
        lines.append(f"| {row['round']} | {1000 * row['run_step_s']:.1f} | {1000 * row['run_all_s']:.1f} | "
                     f"{1000 * row['bench_step_s']:.1f} | {row['ratio']:.2f} | {row['ratio_all']:.2f} |")
    return "\n".join(lines)


def format_table(result: dict[str, Any]) -> str:
    """A markdown table of a :func:`run_benchmark` result."""

    def num(v, fmt):
        return "" if v is None else format(v, fmt)

    config = result["config"]
    lines = [
        f"{config['image_size']}x{config['image_size']}, batch {config['batch_size']}, "
        f"{result['environment']['device']}, {result['environment']['date']}",
        "",
        "| step | examples/s | vs JAX non-private | vs fastest Opacus | vs DP-SGD | compile s | peak memory MB "
        "| memory vs non-private |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        if r["error"]:
            lines.append(f"| {r['name']} | failed: {r['error'][:80]} | | | | | | |")
            continue
        memory = None if r["peak_memory_bytes"] is None else r["peak_memory_bytes"] / 2**20
        lines.append(
            f"| {r['name']} | {num(r['examples_per_s'], '.1f')} | {num(r['vs_jax_nonprivate'], '.2f')} | "
            f"{num(r['vs_fastest_opacus'], '.2f')} | {num(r.get('vs_dpsgd'), '.3f')} | {num(r['compile_s'], '.1f')} | "
            f"{num(memory, '.1f')} | {num(r['memory_vs_nonprivate'], '.2f')} |"
        )
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
