"""Speed benchmarks of jaxdp's training step and of whole training runs, side by side with Opacus.

``launch/bench.py`` is the command line. The package, one concern per module:

* :mod:`~jaxdp_study.bench.workloads` — what is timed: a workload (a run config, or a user's model and loss) and
  its training steps, each the plan's step as training runs it (:func:`jaxdp.steps.jit_train_step`,
  ``DPPlan.train_step``); :mod:`~jaxdp_study.bench.small_models` — the digits CNN and the Adult MLP, as users write
  them, and their data;
* :mod:`~jaxdp_study.bench.step` — the step benchmark (:func:`run_benchmark`): non-private, each clipping
  strategy, each DP-fairness method, PyTorch and each Opacus mode;
* :mod:`~jaxdp_study.bench.user_runs` — whole runs as users write them (:func:`run_user_loops`): the recommended
  API, issue 25's script as written, Opacus's ``make_private`` loop;
* :mod:`~jaxdp_study.bench.config_loop` — a config's run against its own step (:func:`run_loop_benchmark`);
* :mod:`~jaxdp_study.bench.timing` — how everything is measured (interleaved rounds, settle pauses, the untimed
  memory step, ratios); :mod:`~jaxdp_study.bench.torch_side` — the PyTorch/Opacus side;
  :mod:`~jaxdp_study.bench.reports` — the tables.
"""

from jaxdp_study.bench.config_loop import loop_run_config, run_loop_benchmark
from jaxdp_study.bench.reports import format_loop_table, format_runs_table, format_table, write_json
from jaxdp_study.bench.step import METHOD_NAMES, run_benchmark
from jaxdp_study.bench.timing import WARMUP_S
from jaxdp_study.bench.torch_side import OPACUS_MODES, TORCH_INSTALL
from jaxdp_study.bench.user_runs import run_user_loops
from jaxdp_study.bench.workloads import (
    ALL_STRATEGIES,
    CONFIG_WORKLOADS,
    LOOP_WORKLOADS,
    PLAN_WORKLOADS,
    WORKLOADS,
    ConfigWorkload,
    PlanWorkload,
    named_config,
)

__all__ = [
    "ALL_STRATEGIES", "CONFIG_WORKLOADS", "LOOP_WORKLOADS", "METHOD_NAMES", "OPACUS_MODES", "PLAN_WORKLOADS",
    "TORCH_INSTALL", "WARMUP_S", "WORKLOADS", "ConfigWorkload", "PlanWorkload", "format_loop_table",
    "format_runs_table", "format_table", "loop_run_config", "named_config", "run_benchmark", "run_loop_benchmark",
    "run_user_loops", "write_json",
]
