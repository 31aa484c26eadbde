"""The PyTorch side of the benchmark: each workload's model in PyTorch, its non-private and Opacus training steps,
and a whole Opacus training run as its users write it (``make_private`` with Poisson sampling).

The models are the jax workloads' layer for layer (:mod:`jaxdp_study.bench.small_models`,
:class:`jaxdp.models.ResNet`): torchvision's resnet18 layout with GroupNorm(min(num_groups, C), C) in place of
BatchNorm; the digits CNN; fair-dp's tanh MLP. Needs ``pip install torch==2.13.0 opacus`` (the ``bench`` extra);
without them every function here raises ImportError saying so.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxdp_study.bench import timing

OPACUS_MODES = ("hooks", "ghost", "functorch", "ew")
# Opacus's hooks make torch warn at every backward pass on inputs that need no gradient (here: every batch).
_HOOK_WARNING = "Full backward hook is firing when gradients are computed with respect to module outputs"
TORCH_INSTALL = "pip install torch==2.13.0 opacus"  # or: pip install -e '.[bench]'


def require_torch():
    """``torch``, after checking that PyTorch and Opacus import (ImportError saying how to install them)."""
    try:
        import opacus  # noqa: F401
        import torch
    except ImportError as error:
        raise ImportError(
            f"the Opacus comparison needs PyTorch and Opacus, which are not installed ({error}). Install them with "
            f"`{TORCH_INSTALL}` (the optional 'bench' extra), or run without --compare-opacus / Opacus loops."
        ) from error
    return torch


def set_threads(threads: int | None) -> None:
    """Sets torch's intra-op threads (None: torch's default, one per core). On a machine other work shares, torch's
    OpenMP threads wait for each other's cores and a small model's step can take 50x longer than with one thread;
    the threads used are recorded with every result (:func:`versions`)."""
    torch = require_torch()
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"torch threads={threads!r} must be an integer >= 1 (or None: torch's default).")
        torch.set_num_threads(threads)


def versions() -> dict[str, Any]:
    import opacus
    import torch

    return {"torch": torch.__version__, "opacus": opacus.__version__, "torch_threads": torch.get_num_threads()}


# --------------------------------------------------------------------------------------------------------------
# Models.


def resnet(stage_sizes: Sequence[int], width: int, num_groups: int, num_classes: int = 2):
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


def digits_cnn():
    """:class:`jaxdp_study.bench.small_models.DigitsCNN` in PyTorch (21,642 parameters)."""
    import torch.nn as tnn

    return tnn.Sequential(tnn.Conv2d(1, 16, 3, padding=1), tnn.GroupNorm(4, 16), tnn.ReLU(),
                          tnn.Conv2d(16, 32, 3, stride=2, padding=1), tnn.GroupNorm(8, 32), tnn.ReLU(),
                          tnn.Flatten(), tnn.Linear(32 * 4 * 4, 32), tnn.ReLU(), tnn.Linear(32, 10))


def mlp(features: int, hidden: Sequence[int] = (256, 256), num_classes: int = 2):
    """fair-dp's MLP (:class:`jaxdp_study.bench.small_models.MLP`) in PyTorch."""
    import torch.nn as tnn

    layers, width = [], features
    for h in hidden:
        layers += [tnn.Linear(width, h), tnn.Tanh()]
        width = h
    return tnn.Sequential(*layers, tnn.Linear(width, num_classes))


MODELS = {"resnet": resnet, "digits_cnn": digits_cnn, "mlp": mlp}


def to_torch_layout(inputs: np.ndarray):
    """NHWC images as NCHW (features as they are), as a float32 tensor."""
    import torch

    array = np.asarray(inputs, np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2) if array.ndim == 4 else array))


def _optimizer(spec: Any, parameters):
    import torch

    factory = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[spec.optimizer]
    return factory(parameters, lr=spec.learning_rate, weight_decay=spec.weight_decay)


def make_private(spec: Any, model, optimizer, loader, mode: str, *, poisson_sampling: bool):
    """Opacus's ``PrivacyEngine().make_private`` as its users call it; returns ``(engine, model, optimizer,
    criterion, loader)`` (``ghost``, fast gradient clipping, also wraps the criterion)."""
    import torch
    from opacus import PrivacyEngine

    criterion = torch.nn.CrossEntropyLoss()
    with warnings.catch_warnings():  # Opacus warns that its secure RNG is off, as it is by default
        warnings.simplefilter("ignore")
        engine = PrivacyEngine()
        made = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                   noise_multiplier=spec.noise_multiplier, max_grad_norm=spec.l2_clip_norm,
                                   poisson_sampling=poisson_sampling, grad_sample_mode=mode,
                                   **({"criterion": criterion} if mode == "ghost" else {}))
    if mode == "ghost":
        model, optimizer, criterion, loader = made
    else:
        model, optimizer, loader = made
    return engine, model, optimizer, criterion, loader


# --------------------------------------------------------------------------------------------------------------
# Steps.


def step_entries(spec: Any, modes: Sequence[str], seed: int = 0) -> list[timing.Entry]:
    """``torch nonprivate`` and one ``opacus <mode>`` entry per mode: one step on the spec's batch (fixed size, as
    the batch the jax step's real examples are), the workload's loss and optimiser."""
    torch = require_torch()
    from torch.utils.data import DataLoader, TensorDataset

    warnings.filterwarnings("ignore", message=_HOOK_WARNING)
    inputs, labels = to_torch_layout(spec.inputs), torch.from_numpy(np.asarray(spec.labels, np.int64))

    def build(mode: str | None):
        def make():
            torch.manual_seed(seed)
            model = MODELS[spec.model](**spec.model_kwargs)
            optimizer, criterion = _optimizer(spec, model.parameters()), torch.nn.CrossEntropyLoss()
            if mode is not None:
                loader = DataLoader(TensorDataset(inputs, labels), batch_size=len(labels))
                _, model, optimizer, criterion, _ = make_private(spec, model, optimizer, loader, mode,
                                                                 poisson_sampling=False)

            def run():
                optimizer.zero_grad(set_to_none=True)
                criterion(model(inputs), labels).backward()
                optimizer.step()

            return run

        return make

    entries = [timing.guarded(timing.Entry("torch nonprivate", "torch", False), build(None))]
    for mode in modes:
        entries.append(timing.guarded(timing.Entry(f"opacus {mode}", "torch", True), build(mode)))
    return entries


# --------------------------------------------------------------------------------------------------------------
# A whole run.


def opacus_run(spec: Any, data: tuple[np.ndarray, ...], *, batch_size: int, epochs: int, delta: float,
               mode: str = "hooks", max_steps: int | None = None, seed: int = 0) -> dict[str, Any]:
    """A whole Opacus training run as its users write it, timed: ``make_private`` with Poisson sampling (the
    default), ``epochs`` passes over the DataLoader (``len(loader)`` = round(1 / q) batches each), then the test
    accuracy and the epsilon of its accountant (PRV, Opacus's default) at ``delta``.

    ``data`` is ``(x_train, y_train, x_test, y_test)`` as the jax side has them. ``run_s`` is the wall time from
    building the model to the last step's end; ``step_s`` each step's wall time; ``max_steps`` stops early (tests).
    """
    torch = require_torch()
    from torch.utils.data import DataLoader, TensorDataset

    warnings.filterwarnings("ignore", message=_HOOK_WARNING)
    x_train, y_train, x_test, y_test = data
    train = TensorDataset(to_torch_layout(x_train), torch.from_numpy(np.asarray(y_train, np.int64)))
    torch.manual_seed(seed)
    started = time.perf_counter()
    model = MODELS[spec.model](**spec.model_kwargs)
    optimizer = _optimizer(spec, model.parameters())
    engine, model, optimizer, criterion, loader = make_private(
        spec, model, optimizer, DataLoader(train, batch_size=batch_size), mode, poisson_sampling=True)
    step_s, steps = [], 0
    for _ in range(epochs):
        for x, y in loader:
            if max_steps is not None and steps >= max_steps:
                break
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            criterion(model(x), y).backward()
            optimizer.step()
            step_s.append(time.perf_counter() - start)
            steps += 1
    run_s = time.perf_counter() - started
    model.eval()
    with torch.no_grad():
        predicted = model(to_torch_layout(x_test)).argmax(-1).numpy()
    return {"run_s": run_s, "steps": steps, "step_s": step_s, "median_step_s": statistics.median(step_s),
            "first_step_s": step_s[0], "slowest_later_step_s": max(step_s[1:], default=None),
            "test_accuracy": float(np.mean(predicted == np.asarray(y_test))),
            "epsilon": float(engine.get_epsilon(delta)), "accountant": engine.accountant.mechanism()}
