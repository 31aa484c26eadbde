"""Checks of a run config's values that would otherwise fail only once a run has started (in the optimiser, the
model factory, the sampler or the step count), made before it.

Each check raises ValueError with one line: the key, the value, what is allowed. :func:`jaxdp.config.
validate_run_config` makes the config-only ones (epochs, optimiser, microbatch size);
:func:`jaxdp.train.check_runnable` adds the model and the batch size against the data (:func:`check_run` runs them
all). ``launch/sweep.py`` calls ``check_runnable`` for every run of a sweep before the first one starts, so that a
mistake is refused before anything is written (not as a traceback in the middle of the sweep, with a run
directory left behind that blocks the corrected command).

>>> from jaxdp.config import base_config
>>> c = base_config(); c.train.epochs = float("inf")
>>> check_run(c)
Traceback (most recent call last):
...
ValueError: config.train.epochs=inf: expected a finite number > 0 (the number of passes over the training set).
"""

from __future__ import annotations

import difflib
import math

import ml_collections


def check_run(config: ml_collections.ConfigDict) -> None:
    """Every check of this module on a run config (raises ValueError, naming the key)."""
    check_epochs(config)
    check_optimizer(config)
    check_microbatch_size(config)
    check_model(config)
    check_batch_fits(config)


def check_epochs(config: ml_collections.ConfigDict) -> None:
    """``train.epochs`` a finite number > 0 (inf and NaN pass ``> 0`` tests or fail them obscurely)."""
    epochs = config.train.epochs
    try:
        ok = not isinstance(epochs, bool) and math.isfinite(float(epochs)) and float(epochs) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"config.train.epochs={epochs!r}: expected a finite number > 0 (the number of passes over "
                         "the training set).")


def _optimizer_names() -> list[str]:
    """The public optax functions that take a learning_rate: the optimisers ``optim.name`` can name."""
    import inspect

    import optax

    names = []
    for name in dir(optax):
        if name.startswith("_") or not callable(getattr(optax, name)):
            continue
        try:
            if "learning_rate" in inspect.signature(getattr(optax, name)).parameters:
                names.append(name)
        except (TypeError, ValueError):
            continue
    return names


def check_optimizer(config: ml_collections.ConfigDict) -> None:
    """``optim.name`` names an optax optimiser that takes ``learning_rate`` (what :func:`jaxdp.train.make_optimizer`
    builds); the message suggests the closest names."""
    import optax

    name = config.optim.name
    factory = getattr(optax, name, None) if isinstance(name, str) and not name.startswith("_") else None
    problem = None
    if factory is None or not callable(factory):
        problem = "is not an optax optimiser"
    else:
        try:
            built = factory(learning_rate=float(config.optim.learning_rate))
        except TypeError:
            problem = "does not take a learning_rate (not an optimiser)"
        else:
            if not (callable(getattr(built, "init", None)) and callable(getattr(built, "update", None))):
                problem = "is not an optax optimiser (it builds no gradient transformation)"
    if problem:
        names = _optimizer_names()
        close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        raise ValueError(f"config.optim.name={name!r} {problem}; {hint}expected an optax optimiser taking "
                         "learning_rate, e.g. 'adam', 'sgd', 'adamw'.")


def check_microbatch_size(config: ml_collections.ConfigDict) -> None:
    """``dp.microbatch_size`` None or an integer >= 1 (what :func:`jaxdp.clipped_grad` accepts)."""
    size = config.dp.get("microbatch_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"config.dp.microbatch_size={size!r}: expected None (the whole chunk at once) or an "
                         "integer >= 1.")


def check_model(config: ml_collections.ConfigDict) -> None:
    """The model factory accepts ``config.model`` (its name, norm and sizes; BatchNorm refused under DP). Cheap: the
    module is constructed, not initialised."""
    from jaxdp import models

    models.create_model(config.model, private=bool(config.dp.enabled))


def check_batch_fits(config: ml_collections.ConfigDict, train_size: int | None = None) -> None:
    """``train.batch_size`` at most the training set's size (both samplers need it: Poisson's q = batch / size
    must be <= 1, fixed batches are drawn without replacement). ``train_size`` defaults to what the data source
    says without loading (:meth:`jaxdp.data.DataSource.train_size`); unknown sizes are not checked."""
    from jaxdp import data

    batch_size = config.train.batch_size
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"config.train.batch_size={batch_size!r}: expected an integer >= 1.")
    if train_size is None:
        train_size = data.get_source(config.data.source).train_size(config.data)
    if train_size is not None and batch_size > train_size:
        d = config.data
        where = (f"config.data.total={d.total} less a test set of {int(d.total) - train_size}"
                 if "total" in d else "config.data")
        raise ValueError(f"config.train.batch_size={batch_size} is larger than the training set: {train_size} "
                         f"examples ({where}); use a batch size of at most {train_size}, or more data.")


