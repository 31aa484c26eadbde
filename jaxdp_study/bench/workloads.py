"""What the benchmark times: a workload (a model, its data's shape, its DP settings) and its jaxdp training steps.

Every jaxdp entry of the benchmark is the plan's step as training runs it; no step is written here:

* a :class:`ConfigWorkload` (a run config, ``configs/*.py``; the named ``resnet18`` and ``demo``) builds its model
  with :func:`jaxdp.models.create_model`, its plan with :func:`jaxdp.steps.plan_from_config` and its step with
  :func:`jaxdp.steps.jit_train_step`: exactly what :func:`jaxdp.train.train_and_evaluate` compiles for that config
  (flips, diagnostics, misalignment outputs and all), fed a :class:`jaxdp.steps.StepBatch` of the run's chunk width;
* a :class:`PlanWorkload` (a user's model and loss: the named ``digits`` and ``adult-mlp``) builds its plan with
  :func:`jaxdp.plan.make_plan` and times ``plan.train_step``, the public jitted step a user calls.

The non-private entry is the same with DP disabled (``config.dp.enabled = False``; ``make_plan(None, ...)``); the
clipping strategies are compared by building a plan with each (``config.dp.clipping_strategy``;
``ExecutionConfig(clipping_strategy=...)``) and the DP-fairness methods by the DP config's method.

A step runs on one chunk of the sampler's widest width (the shape every step but about 1% of Poisson steps runs
at) holding ``batch_size`` real examples, the rest padding, so ``examples/s`` = expected batch / step time is what
training pays per step. The input values are random (a step's time does not depend on them); their shape and dtype
are the data source's: :func:`input_shape`.
"""

from __future__ import annotations

import dataclasses
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxdp import clipping, diagnostics, parallel, steps
from jaxdp.plan import DPConfig, DPPlan, ExecutionConfig, TrainState, make_plan
from jaxdp_study.bench import small_models, timing

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
GROUP1_SHARE = 0.3  # of a random batch, for the DP-fairness methods' per-group work


@dataclasses.dataclass
class JaxStep:
    """A built jaxdp training step: ``run()`` runs one step and waits for it; ``lowered`` is its program as lowered
    (``lowered.as_text()`` is what the tests compare with training's)."""

    plan: DPPlan
    strategy: str | None  # the clipping strategy that runs ("auto" resolved); None without DP
    run: Callable[[], None]
    lowered: Any
    compile_s: float
    accelerator_memory: int | None
    state: Callable[[], TrainState]  # the current state (for the noise-only breakdown)


@dataclasses.dataclass(frozen=True)
class TorchSpec:
    """The same workload in PyTorch, for :mod:`jaxdp_study.bench.torch_side` (an Opacus comparison)."""

    model: str  # a builder of torch_side.MODELS
    model_kwargs: dict
    optimizer: str  # "adam" | "sgd"
    learning_rate: float
    weight_decay: float
    l2_clip_norm: float
    noise_multiplier: float
    inputs: np.ndarray  # float32, as the jax model sees them (NHWC images or features): batch_size real examples
    labels: np.ndarray  # int


class Workload:
    """A model, its data's shape and its DP settings (see the module docstring); subclasses build the steps."""

    name: str  # names the measurement record, e.g. "resnet18-64px-b32"
    title: str  # heads the printed table
    batch_size: int  # the expected batch size (Poisson) whose examples/s is reported
    dataset_size: int
    strategies: tuple[str, ...] | None  # the strategies benchmarked by default (None: every one)

    def settings(self) -> dict[str, Any]:
        """What was benchmarked, for the result's ``config``."""
        raise NotImplementedError

    def jax_step(self, private: bool, strategy: str | None = None, method: str | None = None,
                 mechanism: str | None = None) -> JaxStep:
        """The training step of a plan: non-private, or DP with ``strategy``, ``method`` and noise ``mechanism``
        (None: the workload's)."""
        raise NotImplementedError

    def torch_spec(self) -> TorchSpec:
        raise NotImplementedError


def _timed_compile(jitted: Callable, *args: Any) -> tuple[Any, float, int | None]:
    """``(lowered, compile seconds, accelerator memory)``: the jitted step then runs this executable."""
    lowered = jitted.lower(*args)
    start = time.perf_counter()
    compiled = lowered.compile()
    return lowered, time.perf_counter() - start, timing.accelerator_memory(compiled)


def _step_mask(width: int, batch_size: float) -> np.ndarray:
    return np.arange(width) < min(int(round(batch_size)), width)


# --------------------------------------------------------------------------------------------------------------
# Run configs.


def input_shape(data_config: Any) -> tuple[int, ...]:
    """The shape of one example of ``config.data``'s source (:func:`jaxdp.data.input_shape`: ``(H, W, C)`` images,
    ``(features,)`` tabular), from the settings alone."""
    from jaxdp import data

    try:
        return data.input_shape(data_config)
    except NotImplementedError as e:
        raise ValueError(f"config.data.source={data_config.source!r} does not say its examples' shape: give the "
                         f"source an input_shape(data_config) method (jaxdp.data.DataSource) ({e})") from None


def training_set_size(config: ml_collections.ConfigDict) -> int:
    """The number of training examples of ``config.data``, from the counts alone (nothing is loaded): the source's
    ``train_size(data_config)`` (:class:`jaxdp.data.DataSource`)."""
    from jaxdp import data

    size = data.get_source(config.data.source).train_size(config.data)
    if size is None:
        raise ValueError(f"the size of config.data.source={config.data.source!r}'s training set is unknown without "
                         "loading it: pass dataset_size (launch/bench.py --dataset-size N)")
    return int(size)


def config_model_name(config: ml_collections.ConfigDict) -> str:
    """``resnet18``, ``resnet-s111-w8`` (a smaller ResNet), or the config's model name."""
    model = config.model
    if str(model.name).lower() in ("resnet18", "resnet"):
        stages, width = tuple(int(s) for s in model.stage_sizes), int(model.width)
        return "resnet18" if (stages, width) == ((2, 2, 2, 2), 64) else f"resnet-s{''.join(map(str, stages))}-w{width}"
    return str(model.name).lower()


class ConfigWorkload(Workload):
    """A run config's model, data shape, batch, DP and optimiser settings (its sweep is ignored)."""

    def __init__(self, config: ml_collections.ConfigDict, *, dataset_size: int | None = None,
                 strategies: tuple[str, ...] | None = None, seed: int = 0) -> None:
        config = ml_collections.ConfigDict(config.to_dict())
        if "sweep" in config:
            del config["sweep"]
        self.config, self.seed = config, seed
        self.shape = input_shape(config.data)
        self.dataset_size = int(dataset_size) if dataset_size is not None else training_set_size(config)
        self.batch_size = int(config.train.batch_size)
        self.strategies = strategies if strategies is not None else (str(config.dp.clipping_strategy),)
        inputs = f"{self.shape[0]}px" if len(self.shape) == 3 else f"{self.shape[0]}features"
        self.name = f"{config_model_name(config)}-{inputs}-b{self.batch_size}"
        self.title = (f"{config.get('name', 'config')}: {config_model_name(config)}, inputs {list(self.shape)}, "
                      f"batch {self.batch_size} of {self.dataset_size}")

    def settings(self) -> dict[str, Any]:
        c = self.config
        model = {k: (list(v) if isinstance(v, tuple) else v) for k, v in c.model.to_dict().items()}
        return dict(workload=self.name, config_name=c.get("name"), model=model, input_shape=list(self.shape),
                    batch_size=self.batch_size, dataset_size=self.dataset_size, l2_clip_norm=float(c.dp.l2_clip_norm),
                    noise_multiplier=float(c.dp.noise_multiplier), optimizer=c.optim.name,
                    learning_rate=float(c.optim.learning_rate), weight_decay=float(c.optim.weight_decay),
                    nonprivate_diagnostics=bool(c.train.nonprivate_diagnostics), random_flip=bool(c.train.random_flip))

    def run_config(self, private: bool, strategy: str | None = None, method: str | None = None,
                   mechanism: str | None = None):
        config = ml_collections.ConfigDict(self.config.to_dict())
        config.dp.enabled = bool(private)
        if strategy is not None:
            config.dp.clipping_strategy = strategy
        if method is not None:
            config.dp.method = method
        if mechanism is not None:
            config.dp.noise_mechanism = mechanism
        return config

    def jax_step(self, private: bool, strategy: str | None = None, method: str | None = None,
                 mechanism: str | None = None) -> JaxStep:
        from jaxdp import models

        config = self.run_config(private, strategy, method, mechanism)
        mesh = parallel.make_mesh(config.train.num_devices)
        model = models.create_model(config.model, private=private)
        plan = steps.plan_from_config(config, model, self.dataset_size, secret=None, mesh=mesh)
        variables = _variables(model, self.shape, self.seed)
        width = plan.sampler.chunk_widths[-1]
        chunks = steps.step_batches(mesh, self._random_split(width, int(config.model.num_classes)),
                                    np.arange(width)[None], _step_mask(width, self.batch_size)[None])
        holder = {"state": parallel.replicate(mesh, plan.init(variables["params"], variables["model_state"])),
                  "stats": parallel.replicate(mesh, diagnostics.zero_stats(bool(config.train.nonprivate_diagnostics))),
                  "step": 0}
        step_fn = steps.jit_train_step(config, plan)
        lowered, compile_s, memory = _timed_compile(step_fn, holder["state"], holder["stats"],
                                                    plan.zero_accumulator(holder["state"].params), chunks[0],
                                                    np.int32(0), np.bool_(True), np.bool_(True))

        def run():  # a whole step, as the training loop runs it (one chunk: the batch fits the chunk width)
            holder["state"], holder["stats"], _ = steps.run_step(step_fn, plan, holder["state"], holder["stats"],
                                                                 chunks, holder["step"])
            holder["step"] += 1
            jax.block_until_ready(holder["state"])

        example = {"inputs": jax.ShapeDtypeStruct((1, *self.shape), jnp.float32),
                   "labels": jax.ShapeDtypeStruct((1,), jnp.int32)}
        strategy_name = plan.resolve_strategy(variables["params"], example)[0]
        return JaxStep(plan, strategy_name, run, lowered, compile_s, memory, lambda: holder["state"])

    def _random_split(self, n: int, num_classes: int) -> types.SimpleNamespace:
        rng = np.random.default_rng(self.seed)
        if len(self.shape) == 3:  # images, as the sources store them
            inputs = rng.integers(0, 256, (n, *self.shape), dtype=np.uint8)
        else:
            inputs = rng.standard_normal((n, *self.shape), dtype=np.float32)
        return types.SimpleNamespace(inputs=inputs, label=rng.integers(0, num_classes, n).astype(np.int32),
                                     group=(rng.random(n) < GROUP1_SHARE).astype(np.int32))

    def torch_spec(self) -> TorchSpec:
        c = self.config
        if config_model_name(c).split("-")[0] not in ("resnet18", "resnet") or c.model.norm != "group":
            raise ValueError(f"the Opacus comparison builds GroupNorm ResNets; this config's model is "
                             f"{c.model.name!r} with norm {c.model.norm!r}")
        if c.optim.name not in ("adam", "sgd"):
            raise ValueError(f"the Opacus comparison runs torch's adam or sgd; config.optim.name={c.optim.name!r}")
        split = self._random_split(self.batch_size, int(c.model.num_classes))
        inputs = np.asarray(steps.normalize_inputs(jnp.asarray(split.inputs)))
        return TorchSpec("resnet", dict(stage_sizes=tuple(c.model.stage_sizes), width=int(c.model.width),
                                        num_groups=int(c.model.num_groups), num_classes=int(c.model.num_classes)),
                         c.optim.name, float(c.optim.learning_rate), float(c.optim.weight_decay),
                         float(c.dp.l2_clip_norm), float(c.dp.noise_multiplier), inputs, split.label)


def _variables(model: Any, shape: tuple[int, ...], seed: int) -> dict[str, Any]:
    """Random parameters (numpy draws, :func:`jaxdp.models.random_params`: the speed of a step does not depend on
    their values, and ``model.init`` would compile first) and zero model state (BatchNorm statistics)."""
    from jaxdp.models import random_params

    example = jnp.zeros((1, *shape), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), example)
    model_state = {k: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), v)
                   for k, v in shapes.items() if k != "params"}
    return {"params": random_params(model, example, seed), "model_state": model_state}


# --------------------------------------------------------------------------------------------------------------
# A user's model and loss on the public plan.


class PlanWorkload(Workload):
    """A user's Flax model and per-example loss on :func:`jaxdp.plan.make_plan` (module docstring)."""

    def __init__(self, name: str, title: str, model: Any, data: dict[str, np.ndarray], groups: np.ndarray, *,
                 dp: DPConfig, optimizer: Callable[[], optax.GradientTransformation], batch_size: int,
                 epochs: float, torch_model: tuple[str, dict], optimizer_settings: dict[str, Any],
                 test: tuple[np.ndarray, np.ndarray] | None = None, dataset_size: int | None = None,
                 seed: int = 0) -> None:
        self.name, self.title, self.model, self.data, self.groups = name, title, model, data, groups
        self.test = test  # (inputs, labels) for whole runs' accuracy; None: step benchmark only
        self.dp, self.optimizer, self.batch_size, self.epochs = dp, optimizer, int(batch_size), float(epochs)
        self.dataset_size = int(dataset_size if dataset_size is not None else len(groups))
        self.torch_model, self.optimizer_settings, self.seed = torch_model, optimizer_settings, seed
        self.loss_fn = small_models.per_example_loss(model)
        self.params = jax.tree_util.tree_map(
            np.asarray, model.init(jax.random.key(seed), jnp.asarray(data["x"][:1]))["params"])
        self.strategies = None

    def settings(self) -> dict[str, Any]:
        return dict(workload=self.name, input_shape=list(self.data["x"].shape[1:]), batch_size=self.batch_size,
                    dataset_size=self.dataset_size, l2_clip_norm=self.dp.l2_clip_norm,
                    noise_multiplier=self.dp.noise_multiplier, delta=self.dp.delta, epochs=self.epochs,
                    parameters=int(sum(np.size(p) for p in jax.tree_util.tree_leaves(self.params))),
                    **self.optimizer_settings)

    def make_plan(self, private: bool, strategy: str | None = None, method: str | None = None,
                  mechanism: str | None = None, *,
                  steps: int | None = None) -> DPPlan:
        """The plan a user builds for this workload (``steps`` instead of the workload's epochs, for short runs)."""
        dp = dataclasses.replace(self.dp, method=method or self.dp.method,
                                 noise_mechanism=mechanism or self.dp.noise_mechanism) if private else None
        length = {"epochs": self.epochs} if steps is None else {"steps": steps}
        return make_plan(dp, self.loss_fn, dataset_size=self.dataset_size, batch_size=self.batch_size,
                         optimizer=self.optimizer(), execution=ExecutionConfig(clipping_strategy=strategy or "auto"),
                         **length)

    def jax_step(self, private: bool, strategy: str | None = None, method: str | None = None,
                 mechanism: str | None = None) -> JaxStep:
        plan = self.make_plan(private, strategy, method, mechanism)
        width = plan.sampler.chunk_widths[-1]
        indices = np.arange(width) % len(self.groups)
        # Host arrays with a chunk axis, as plan.gather hands them to a user's loop (each step transfers them).
        batch = {k: np.asarray(v[indices][None]) for k, v in self.data.items()}
        mask = _step_mask(width, self.batch_size)[None]
        # A user passes each example's group only for a method that needs it.
        groups = self.groups[indices][None].astype(np.int32) if plan.private and plan.method.uses_groups else None
        holder = {"state": plan.init(self.params)}
        # train_step runs the plan's one compiled chunk program (once here: the batch fits one chunk).
        lowered, compile_s, memory = _timed_compile(
            plan.chunk_step, holder["state"], plan.zero_accumulator(self.params),
            jax.tree_util.tree_map(lambda a: a[0], batch), mask[0],
            groups[0] if groups is not None else jnp.zeros(mask.shape[1:], jnp.int32), np.bool_(True), np.bool_(True))

        def run():
            holder["state"], _ = plan.train_step(holder["state"], batch, mask, groups)
            jax.block_until_ready(holder["state"])

        example = jax.tree_util.tree_map(lambda a: a[0, :1], batch)
        return JaxStep(plan, plan.resolve_strategy(self.params, example)[0], run, lowered, compile_s, memory,
                       lambda: holder["state"])

    def torch_spec(self) -> TorchSpec:
        name, kwargs = self.torch_model
        return TorchSpec(name, kwargs, l2_clip_norm=self.dp.l2_clip_norm, noise_multiplier=self.dp.noise_multiplier,
                         inputs=self.data["x"][:self.batch_size], labels=self.data["y"][:self.batch_size],
                         **self.optimizer_settings)


def digits_workload(seed: int = 0) -> PlanWorkload:
    """Issue 25's digits CNN: batch 64 Poisson of 1,400, C 1, z 1, delta 1e-5, Adam 3e-3, 15 epochs (330 steps)."""
    x, y, x_test, y_test = small_models.digits(seed)
    return PlanWorkload(
        "digits-cnn-b64", "GroupNorm CNN on sklearn's digits (8x8), batch 64 of 1,400", small_models.DigitsCNN(),
        {"x": x, "y": y}, np.zeros(len(y), np.int32), dp=DPConfig(l2_clip_norm=1.0, noise_multiplier=1.0, delta=1e-5),
        optimizer=lambda: optax.adam(3e-3), batch_size=64, epochs=15, torch_model=("digits_cnn", {}),
        optimizer_settings=dict(optimizer="adam", learning_rate=3e-3, weight_decay=0.0), test=(x_test, y_test),
        seed=seed)


def adult_mlp_workload(seed: int = 0) -> PlanWorkload:
    """fair-dp's Adult MLP and its DP-SGD settings (``experiment_scripts/adult_script.sh``): batch 256, C 0.5, z 1,
    delta 1e-6, SGD 0.01, 20 epochs, on random features of Adult's shape (:func:`small_models.adult_shaped`)."""
    x, y, groups = small_models.adult_shaped(small_models.ADULT_TRAIN, seed)
    return PlanWorkload(
        "adult-mlp-b256", f"fair-dp's MLP 256-256 tanh on {small_models.ADULT_FEATURES} random Adult-shaped "
        f"features, batch 256 of {small_models.ADULT_TRAIN:,}", small_models.MLP(), {"x": x, "y": y}, groups,
        dp=DPConfig(l2_clip_norm=0.5, noise_multiplier=1.0, delta=1e-6), optimizer=lambda: optax.sgd(0.01),
        batch_size=256, epochs=20, torch_model=("mlp", dict(features=small_models.ADULT_FEATURES)),
        optimizer_settings=dict(optimizer="sgd", learning_rate=0.01, weight_decay=0.0), seed=seed)


def resnet18_config(image_size: int = 64, batch_size: int = 32) -> ml_collections.ConfigDict:
    """The paper's GroupNorm ResNet18 and DP settings (:func:`jaxdp.config.base_config`) at ``image_size``."""
    from jaxdp.config import base_config

    config = base_config()
    config.name = "resnet18"
    config.data.image_size, config.train.batch_size = image_size, batch_size
    return config


def named_config(name: str) -> ml_collections.ConfigDict:
    """The run config of a named config workload (:data:`CONFIG_WORKLOADS`)."""
    if name == "resnet18":
        return resnet18_config()
    from jaxdp_study import grid

    return grid.load_config(CONFIGS_DIR / f"{name}.py")


# The named workloads of launch/bench.py --workload: run configs (flags may override them), and user models.
CONFIG_WORKLOADS = ("resnet18", "demo")
PLAN_WORKLOADS: dict[str, Callable[[], PlanWorkload]] = {"digits": digits_workload, "adult-mlp": adult_mlp_workload}
WORKLOADS = (*CONFIG_WORKLOADS, *PLAN_WORKLOADS)
LOOP_WORKLOADS = ("digits",)  # the user workloads with real data and a test set: whole runs (--loop)
ALL_STRATEGIES = tuple(s for s in clipping.available_strategies() if s != "auto")
