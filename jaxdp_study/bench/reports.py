"""The benchmark's results as markdown tables: printed by ``launch/bench.py`` and, from the measurement records,
rendered into docs/performance.md (:data:`jaxdp_study.measurements.RENDERERS`), so both show the same table."""

from __future__ import annotations

import json
from typing import Any


def _num(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _step_heading(result: dict[str, Any]) -> str:
    config, environment = result["config"], result["environment"]
    if "title" in config:
        what = config["title"]
        if config.get("chunk_width"):
            what += f" (chunk width {config['chunk_width']})"
    else:  # records written before the workloads
        what = f"{config['image_size']}x{config['image_size']}, batch {config['batch_size']}"
    return f"{what}, {environment['device']}, {environment['date']}"


def format_table(result: dict[str, Any]) -> str:
    """A markdown table of a step benchmark (:func:`jaxdp_study.bench.run_benchmark`)."""
    lines = [
        _step_heading(result),
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
            f"| {r['name']} | {_num(r['examples_per_s'], '.1f')} | {_num(r['vs_jax_nonprivate'], '.2f')} | "
            f"{_num(r['vs_fastest_opacus'], '.2f')} | {_num(r.get('vs_dpsgd'), '.3f')} | "
            f"{_num(r['compile_s'], '.1f')} | {_num(memory, '.1f')} | {_num(r['memory_vs_nonprivate'], '.2f')} |")
    return "\n".join(lines)


def format_loop_table(result: dict[str, Any]) -> str:
    """A markdown table of a config's run against its step (:func:`jaxdp_study.bench.run_loop_benchmark`)."""
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


def format_runs_table(result: dict[str, Any]) -> str:
    """A markdown table of whole user runs (:func:`jaxdp_study.bench.run_user_loops`): medians over the rounds."""
    config, environment = result["config"], result["environment"]
    threads = f", torch {environment['torch_threads']} threads" if "torch_threads" in environment else ""
    lines = [
        f"{config['title']}: whole training runs, median of {config['rounds']} interleaved rounds, "
        f"{environment['device']}{threads}, {environment['date']}",
        "",
        "| run | steps | run s | speed-up vs fastest Opacus | first step s | median step ms | test accuracy "
        "| epsilon |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["summary"]:
        lines.append(
            f"| {row['name']} | {row['steps']} | {row['run_s']:.2f} | {_num(row['speedup_vs_opacus'], '.2f')} | "
            f"{row['first_step_s']:.2f} | {1000 * row['median_step_s']:.2f} | {row['test_accuracy']:.3f} | "
            f"{row['epsilon']:.2f} ({row['accountant']}) |")
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
