"""Issue 24: a sweep nothing can corrupt, and one clear line for every mistake a user can make.

Concurrency (two real processes on one workdir), damaged files (garbage bytes written into them), hostile file
systems (a full disk, a read-only folder), signals sent to a real process, command-line mistakes (each one line on
stderr, exit status 2, no traceback, nothing written) and bad library arguments. docs/failure-modes.md lists them.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from test_sweep import FakeTrain, _cli, load_cli, small_sweep

from jaxdp import runlog
from jaxdp.checkpoint import Checkpointer, CheckpointsUnreadable
from jaxdp_study import grid, launchers, overrides, workdir

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))


def _worker(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE / "sweep_worker.py"), *args], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _one_line_refusal(r: subprocess.CompletedProcess) -> str:
    """The command was refused the way every CLI mistake must be: exit 2, one line on stderr, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "\\'" not in lines[0] and "\\n" not in lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------- 1. two sweeps, one workdir


def test_two_sweep_processes_on_one_workdir_share_the_runs_and_train_each_once(tmp_path):
    """Two real processes start the same sweep together (a second SLURM submission): each run is trained by
    exactly one of them, step by step, both finish with exit 0, and each names the other as the holder of the
    runs it skipped."""
    work, log, go = tmp_path / "w", tmp_path / "steps.log", tmp_path / "go"
    procs = [_worker("share", str(work), str(log), str(go)) for _ in range(2)]
    time.sleep(0.5)
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert "Traceback" not in err
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    names = [r.name for r in grid.expand(small_sweep())]
    trained = [set(r["trained"]) for r in results]
    assert trained[0].isdisjoint(trained[1]) and trained[0] | trained[1] == set(names)
    assert trained[0] and trained[1], "both processes took part"
    # Every step of every run was taken once, by the process that reports it as trained.
    steps = [line.split() for line in log.read_text().splitlines()]
    assert sorted((run, int(step)) for _, run, step in steps) == sorted((n, s) for n in names for s in range(1, 9))
    for result in results:
        assert {run for pid, run, _ in steps if int(pid) == result["pid"]} == set(result["trained"])
    # A run skipped by one process was being trained by the other, and the line names it: pid and host.
    host = socket.gethostname()
    for mine, other in ((results[0], results[1]), (results[1], results[0])):
        for name, holder in mine["busy"].items():
            assert holder == f"pid {other['pid']} on {host}" and name in other["trained"]
    assert sum(len(r["busy"]) for r in results) >= 1
    for name in names:
        assert json.loads((work / name / "final.json").read_text())["steps"] == 8


def test_run_lock_names_its_holder_and_dies_with_it(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from jaxdp_study.workdir import RunLock; "
         "lock = RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)", str(run_dir)],
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(workdir.RunBusy) as e:
            workdir.RunLock(run_dir).acquire()
        assert e.value.holder == f"pid {holder.pid} on {socket.gethostname()}"
        assert str(e.value) == f"{run_dir} is being trained by pid {holder.pid} on {socket.gethostname()}"
        assert workdir.lock_holder(run_dir) == e.value.holder
    finally:
        holder.kill()  # SIGKILL: no clean-up of its own; the operating system releases the lock
        holder.wait()
    assert workdir.lock_holder(run_dir) is None
    with workdir.RunLock(run_dir):
        assert (run_dir / ".lock").read_text().startswith(f"pid {os.getpid()} on ")


def test_a_locked_run_is_skipped_and_never_deleted_even_with_overwrite(tmp_path, capsys):
    launchers.run_sweep(small_sweep(), tmp_path, train_fn=FakeTrain())
    changed = small_sweep()
    changed.optim.learning_rate = 1e-4
    held = tmp_path / "nondp-ff0.9-seed0"
    before = {p.name: p.read_bytes() for p in held.iterdir() if p.is_file()}
    with workdir.RunLock(held):
        fake = FakeTrain()
        result = launchers.run_sweep(changed, tmp_path, train_fn=fake, overwrite=True)
    assert held.name not in fake.calls and len(fake.calls) == 9
    assert result.busy == {held.name: f"pid {os.getpid()} on {socket.gethostname()}"}
    assert {p.name: p.read_bytes() for p in held.iterdir() if p.is_file() and p.name != ".lock"} == {
        k: v for k, v in before.items() if k != ".lock"}
    out = capsys.readouterr().out
    assert f"{held.name} is being trained by pid {os.getpid()}" in out and "skipped" in out


@pytest.mark.slow  # two real command lines training tiny nondp runs: ~40 s
def test_two_command_lines_on_one_workdir_both_finish(tmp_path):
    work = tmp_path / "w"
    args = [sys.executable, str(REPO / "launch" / "sweep.py"), "--config", "configs/tiny.py", "--workdir", str(work),
            f"--config.data.data_dir={tmp_path / 'data'}", "--runs", "nondp", "--noreport"]
    procs = [subprocess.Popen(args, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0 and "Traceback" not in err, err[-3000:]
    for name in ("nondp-ff0.7-seed0", "nondp-ff0.9-seed0"):
        assert json.loads((work / name / "final.json").read_text())["steps"] == 5
    done = [out.count(" done in ") for out, _ in outs]
    assert sum(done) == 2, outs  # each run trained by one of the two


# ------------------------------------------------------------------------------ 2, 4. damaged and foreign-looking files


def test_damaged_final_json_is_named_moved_aside_and_the_run_resumes(tmp_path, capsys):
    launchers.run_sweep(small_sweep(), tmp_path, train_fn=FakeTrain())
    run_dir = tmp_path / "medium-ff0.9-clip5-seed0"
    (run_dir / "final.json").write_bytes(b"\x00\x17garbage{")
    capsys.readouterr()
    fake = FakeTrain()
    result = launchers.run_sweep(small_sweep(), tmp_path, train_fn=fake)
    err = capsys.readouterr().err
    assert f"{run_dir / 'final.json'} is damaged (not a JSON object); moved it to final.json.corrupt-" in err
    assert "resumes from its checkpoints" in err
    assert fake.calls == [run_dir.name] and result.trained == [run_dir.name]
    (aside,) = run_dir.glob("final.json.corrupt-*")
    assert aside.read_bytes() == b"\x00\x17garbage{"  # kept, never deleted
    assert json.loads((run_dir / "final.json").read_text())["steps"] == 8


def test_damaged_run_record_is_checked_against_config_json_and_written_again(tmp_path, capsys):
    launchers.run_sweep(small_sweep(), tmp_path, train_fn=FakeTrain())
    run_dir = tmp_path / "high-ff0.7-clip5-seed0"
    (run_dir / "sweep_run.json").write_text('{"name": "high-ff0.7')
    capsys.readouterr()
    fake = FakeTrain()
    result = launchers.run_sweep(small_sweep(), tmp_path, train_fn=fake)
    assert f"{run_dir / 'sweep_run.json'} is damaged" in capsys.readouterr().err
    assert run_dir.name in result.skipped and fake.calls == []  # finished: its config.json matches
    run = next(r for r in grid.expand(small_sweep()) if r.name == run_dir.name)
    assert json.loads((run_dir / "sweep_run.json").read_text()) == json.loads(json.dumps(run.record()))
    # The same damage with a config.json of another config is a conflict, refused before anything is written.
    (run_dir / "sweep_run.json").write_text("garbage")
    changed = small_sweep()
    changed.optim.learning_rate = 1e-4
    with pytest.raises(grid.SweepError, match="optim.learning_rate: stored 5e-05 != new 0.0001"):
        launchers.run_sweep(changed, tmp_path, train_fn=FakeTrain(), run_filter="high-ff0.7")


def test_report_names_damaged_files_and_leaves_those_runs_out(tmp_path, monkeypatch, capsys):
    launchers.run_sweep(small_sweep(), tmp_path, train_fn=FakeTrain())
    (tmp_path / "nondp-ff0.7-seed0" / "final.json").write_text("[1, 2")
    (tmp_path / "high-ff0.9-clip5-seed0" / "sweep_run.json").write_bytes(b"\xff\xfe")
    capsys.readouterr()
    mod = load_cli()
    monkeypatch.chdir(REPO)
    mod.FLAGS.unparse_flags()
    try:
        mod.main(mod._parse_flags(["sweep.py", "report", "--workdir", str(tmp_path), "--nofigures"]))
    finally:
        mod.FLAGS.unparse_flags()
    err = capsys.readouterr().err
    assert "nondp-ff0.7-seed0/final.json is damaged" in err and "counts as unfinished" in err
    assert "high-ff0.9-clip5-seed0/sweep_run.json is damaged" in err and "leaves this run out" in err
    rows = (tmp_path / "summary.csv").read_text().splitlines()
    assert len(rows) == 1 + 8 and not any(r.startswith(("nondp-ff0.7-seed0,", "high-ff0.9-clip5")) for r in rows)


def test_a_folder_holding_only_our_temporary_file_is_not_foreign(tmp_path):
    """A kill between creating a run's folder and renaming its record into place leaves only our writer's
    temporary file: the run is new, and the garbage is removed when the run is claimed."""
    run_dir = tmp_path / "nondp-ff0.7-seed0"
    run_dir.mkdir()
    (run_dir / ".sweep_run.json.k2x_9abq.tmp").write_text('{"name": "nondp-ff0.7')
    (run_dir / ".lock").touch()
    statuses = workdir.prepare_workdir(tmp_path, grid.expand(small_sweep()), write=False)
    assert {s.run.name: s.state for s in statuses}[run_dir.name] == "new"
    fake = FakeTrain()
    launchers.run_sweep(small_sweep(), tmp_path, train_fn=fake, run_filter="nondp-ff0.7")
    assert fake.calls == [run_dir.name] and not list(run_dir.glob("*.tmp"))
    # A file that is not ours still makes the folder foreign.
    other = tmp_path / "nondp-ff0.9-seed0"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(grid.SweepError, match="not written by a sweep"):
        launchers.run_sweep(small_sweep(), tmp_path, train_fn=FakeTrain())


def test_temporary_target_recognises_only_our_writers_files():
    assert runlog.temporary_target(".sweep_run.json.k2x_9abq.tmp") == "sweep_run.json"
    assert runlog.temporary_target(".final.json.abc123.tmp") == "final.json"
    assert [runlog.temporary_target(n) for n in ("sweep_run.json", ".lock", "x.tmp", ".tmp", "..tmp")] == [None] * 5


# --------------------------------------------------------------------------------------- 5. the one atomic writer


def test_atomic_writer_writes_text_and_png_bytes_and_keeps_the_old_file_on_failure(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv = tmp_path / "summary.csv"
    runlog.write_atomic(csv, "run,accuracy\nnondp-ff0.7-seed0,90.5\n")
    assert csv.read_text() == "run,accuracy\nnondp-ff0.7-seed0,90.5\n" and oct(csv.stat().st_mode)[-3:] == "644"
    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1], [1, 0])
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    png = runlog.write_atomic(tmp_path / "fig.png", buffer.getvalue())
    with runlog.atomic_writer(tmp_path / "fig2.png", "wb") as handle:
        fig.savefig(handle, format="png")
    plt.close(fig)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" == (tmp_path / "fig2.png").read_bytes()[:8]
    # A writer that fails midway (a kill, a bug) leaves the previous file whole and no temporary file.
    with pytest.raises(RuntimeError), runlog.atomic_writer(csv) as handle:
        handle.write("run,acc")
        raise RuntimeError("killed")
    assert csv.read_text() == "run,accuracy\nnondp-ff0.7-seed0,90.5\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png", "fig2.png", "summary.csv"]
    with pytest.raises(ValueError, match="mode='a'"):
        with runlog.atomic_writer(csv, "a"):
            pass


def test_a_full_disk_names_the_file_and_what_to_do_and_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "table1.md"
    target.write_text("old table\n")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as e:
        runlog.write_atomic(target, "new table\n")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    assert runlog.describe_os_error(e.value) == (
        f"cannot write {target}: no space left on the device (ENOSPC); free space on that file system (or choose "
        "a directory on a larger one)")
    assert target.read_text() == "old table\n" and [p.name for p in tmp_path.iterdir()] == ["table1.md"]


# ------------------------------------------------------------------------------------------- 6, 7, 8. the CLI


@pytest.mark.parametrize("args, needles", [
    (("--config", "configs/demo.py", "--config.dp.noise_multiplier=1.0"),
     ["--config.dp.noise_multiplier=1.0 would be ignored", "config.sweep.imbalance.privacy sets dp.noise_multiplier",
      "--config.sweep.imbalance.privacy="]),
    (("--config", "configs/tiny.py", "--config.data.female_fraction=-0.5"),
     ["--config.data.female_fraction=-0.5 would be ignored",
      "set the axis instead, e.g. --config.sweep.imbalance.data.female_fraction=\"(-0.5,)\""]),
    (("--config", "configs/tiny.py", "--config.train.batch_size=100000"),
     ["config.train.batch_size=100000 is larger than the training set: 160 examples (config.data.total=200 less a "
      "test set of 40); use a batch size of at most 160", "(all 4 runs)"]),
    (("--config", "configs/tiny.py", "--config.train.epoch=3", "--config.train.eval_every_steps=2"),
     ["error: cannot apply config override --config.train.epoch=3: no such key 'epoch' in config.train. Did you "
      "mean \"epochs\"?"]),
])
def test_cli_mistakes_are_one_line_before_anything_is_written(tmp_path, args, needles):
    """Real command lines (a process each): an override a sweep axis overwrites, a batch no run can use, an
    unknown key next to a good one (only the unknown one is named)."""
    r = _cli(*args, "--workdir", str(tmp_path / "w"))
    line = _one_line_refusal(r)
    for needle in needles:
        assert needle in line, (needle, line)
    assert "eval_every_steps" not in line
    assert not (tmp_path / "w").exists()


def _parse_in_process(capsys, *args: str) -> tuple[int, str]:
    """launch/sweep.py's flag parsing in this process, for mistakes refused before absl defines override flags."""
    mod = load_cli()
    mod.FLAGS.unparse_flags()
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as e:
            mod._parse_flags(["sweep.py", *args])
    finally:
        mod.FLAGS.unparse_flags()
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("--config.dp.l2_clip_norm=abc", "config.dp.l2_clip_norm=abc: expected a number, e.g. 0.5, 1e-3 or inf; the "
                                     "config's value is 5.0"),
    ("--config.train.batch_size=1.5", "config.train.batch_size=1.5: expected an integer; the config's value is 32"),
    ("--config.dp.enabled=maybe", "config.dp.enabled=maybe: expected true or false; the config's value is True"),
    ("--config.dp=1", "--config.dp=1: config.dp is a section, not a value; set one of its keys (accountant, "
                      "clipping_strategy, delta, dpsgd_f, dpsgd_global, dpsgd_global_adapt, ...), e.g. "
                      "--config.dp.accountant=..."),
    ("--config.foo=1", "cannot apply config override --config.foo=1: no such key 'foo' in the config (its keys: "
                       "audit, data, dp, model, name, optim, sweep, train)"),
])
def test_wrong_typed_and_unknown_overrides_name_the_key_the_value_and_what_is_allowed(capsys, override, message):
    code, err = _parse_in_process(capsys, "--config", str(REPO / "configs" / "tiny.py"), override)
    assert (code, err) == (2, f"error: {message}\n")


def test_values_only_a_run_would_reject_are_refused_for_every_run_before_any_starts():
    runs = grid.expand(grid.load_config(REPO / "configs" / "tiny.py"))
    for key, value, message in (
            ("train.epochs", float("inf"), "config.train.epochs=inf: expected a finite number > 0 (the number of "
                                           "passes over the training set)."),
            ("optim.name", "adamz", "config.optim.name='adamz' is not an optax optimiser; did you mean 'adam' or "
                                    "'radam' or 'nadam'? expected an optax optimiser taking learning_rate, e.g. "
                                    "'adam', 'sgd', 'adamw'."),
            ("optim.name", "chain", "config.optim.name='chain' does not take a learning_rate (not an optimiser)"),
            ("model.norm", "batch", "config.model.norm='batch' cannot be used with DP training")):
        changed = []
        for run in runs:
            config = ml_collections.ConfigDict(run.config.to_dict())
            grid._set_path(config, key, value)
            changed.append(grid.Run(run.name, run.grids, run.axes, config))
        with pytest.raises(grid.SweepError) as e:
            launchers.check_runs(changed, launchers.default_check)
        assert str(e.value).startswith(message), str(e.value)
        assert "\n" not in str(e.value) or key == "model.norm"  # one line per distinct problem
        # A problem of every run says so instead of listing them; one of some runs names them.
        assert str(e.value).endswith("(all 4 runs)") or key == "model.norm", str(e.value)
        assert key != "model.norm" or "(runs: medium-" in str(e.value), str(e.value)


def test_cli_config_file_with_a_syntax_error_is_one_line_with_its_line(tmp_path):
    (tmp_path / "syntax.py").write_text("def get_config(:\n    pass\n")
    line = _one_line_refusal(_cli("--config", str(tmp_path / "syntax.py"), "--workdir", str(tmp_path / "w")))
    assert line == f"error: {tmp_path / 'syntax.py'}:1: invalid syntax: def get_config(:; fix the config file"
    assert not (tmp_path / "w").exists()


def test_config_files_that_do_not_load_are_named_with_their_line(tmp_path):
    (tmp_path / "raises.py").write_text("from jaxdp.config import base_config\n\ndef get_config():\n"
                                        "    c = base_config()\n    c.train.epochs = 1 / 0\n    return c\n")
    (tmp_path / "empty.py").write_text("x = 1\n")
    (tmp_path / "wrong.py").write_text("def get_config():\n    return {'a': 1}\n")
    for name, message in (
            ("raises.py", "raises.py:5: loading the config failed: ZeroDivisionError: division by zero"),
            ("empty.py", "empty.py: defines no get_config(); a config file defines get_config() returning a "
                         "ConfigDict (see configs/demo.py)"),
            ("wrong.py", "wrong.py: get_config() returned dict, not an ml_collections.ConfigDict")):
        with pytest.raises(grid.SweepError) as e:
            overrides.load_config_file(str(tmp_path / name))
        assert str(e.value) == f"{tmp_path}/{message}"


def test_overrides_checked_in_process():
    config = grid.load_config(REPO / "configs" / "paper.py")
    parsed = overrides.parse_overrides(["--config.train.epochs", "3", "--noconfig.dp.enabled", "--config.x.y=1",
                                        "--workdir=w"])
    assert [(o.key, o.value) for o in parsed] == [("train.epochs", "3"), ("dp.enabled", "false"), ("x.y", "1")]
    overrides.check_overrides(config, parsed[:2])
    with pytest.raises(grid.SweepError, match=r"no such key 'x' in the config \(its keys: audit, data, dp"):
        overrides.check_overrides(config, parsed)
    # paper.py: the clipping grid sweeps the clip norm, the imbalance grid keeps the override: a warning only.
    warnings = overrides.refuse_overwritten(config, {"dp.l2_clip_norm": 3.0})
    assert warnings == ["--config.dp.l2_clip_norm=3.0 applies to grid(s) imbalance only: "
                        "config.sweep.clipping.dp.l2_clip_norm sets it in grid clipping"]
    assert overrides.refuse_overwritten(config, {"optim.learning_rate": 1e-3, "sweep.clipping.privacy": ("low",)}) == []
    # --seeds adds a seed axis to every grid: a train.seed override would be ignored in every run.
    with pytest.raises(grid.SweepError) as e:
        overrides.refuse_overwritten(grid.with_seeds(config, [0, 1]), {"train.seed": 3})
    assert str(e.value) == ("--config.train.seed=3 would be ignored: the sweep axes config.sweep.clipping.seed, "
                            "config.sweep.imbalance.seed set train.seed in every run; give the replicates with "
                            "--seeds or --config.sweep.clipping.seed=...")


# ----------------------------------------------------------- 7. a run that fails before its first step leaves nothing


class FailsBeforeFirstStep(FakeTrain):
    def __call__(self, config, workdir, *, on_progress=None):
        wd = Path(workdir)
        (wd / "checkpoints").mkdir(parents=True, exist_ok=True)
        (wd / "config.json").write_text(config.to_json())
        raise ValueError("Preparing the generated files failed (BadZipFile: truncated); generate them again")


def test_a_run_failing_before_its_first_step_leaves_nothing_that_blocks_the_corrected_command(tmp_path, capsys):
    with pytest.raises(ValueError, match="BadZipFile"):
        launchers.run_sweep(small_sweep(), tmp_path, train_fn=FailsBeforeFirstStep())
    first = tmp_path / "high-ff0.7-clip5-seed0"
    assert [p.name for p in first.iterdir()] == [".lock"]
    assert f"run {first.name} failed (ValueError); nothing of it was kept" in capsys.readouterr().out
    corrected = small_sweep()
    corrected.optim.learning_rate = 1e-4  # a different config: no --overwrite needed
    assert len(launchers.run_sweep(corrected, tmp_path, train_fn=FakeTrain()).trained) == 10


def test_a_run_failing_after_steps_keeps_its_files(tmp_path, capsys):
    with pytest.raises(KeyboardInterrupt):
        launchers.run_sweep(small_sweep(), tmp_path, train_fn=FakeTrain(crash_in="high-ff0.7-clip5-seed0"))
    kept = {p.name for p in (tmp_path / "high-ff0.7-clip5-seed0").iterdir()}
    assert {"sweep_run.json", "history.jsonl", "checkpoints"} <= kept


# ------------------------------------------------------------------------------------ 9. hostile file systems


def test_cli_disk_full_during_a_run_is_one_line_saying_what_to_do(tmp_path):
    work = tmp_path / "w"
    r = subprocess.run([sys.executable, str(HERE / "sweep_worker.py"), "cli", "enospc", "--", "--config",
                        "configs/tiny.py", "--workdir", str(work), "--runs", "nondp-ff0.7"],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    line = _one_line_refusal(r)
    assert line == (f"error: cannot write {work / 'nondp-ff0.7-seed0' / 'final.json'}: no space left on the device "
                    "(ENOSPC); free space on that file system (or choose a directory on a larger one)")
    assert (work / "nondp-ff0.7-seed0" / "sweep_run.json").exists()  # a step ran: the run is kept, to resume


def _orbax_subprocess(script: str, *wrapper: str) -> subprocess.CompletedProcess:
    return subprocess.run([*wrapper, sys.executable, "-c", script], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)


_SAVE_TWICE = """
import numpy as np, os, sys
from jaxdp.checkpoint import Checkpointer
d = sys.argv[1] if len(sys.argv) > 1 else os.environ["CKPT_DIR"]
c = Checkpointer(os.path.join(d, "checkpoints"))
c.save(0, {"w": np.ones(3000, np.float32)}, {"run_secret": "ab"})
if os.environ.get("READ_ONLY"):
    os.chmod(os.path.join(d, "checkpoints"), 0o500)
try:
    c.save(4, {"w": np.random.rand(int(os.environ.get("SIZE", 3000))).astype(np.float32)}, {"run_secret": "ab"})
except OSError as e:
    print("ERROR", type(e).__name__, e.errno, e)
print("STEPS", sorted(os.listdir(os.path.join(d, "checkpoints"))))
"""


def test_checkpoint_save_on_a_full_disk_is_one_error_without_thread_tracebacks(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {mount}"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs unshare and mount privileges)")
    script = (f"mount -t tmpfs -o size=1m tmpfs {mount} && CKPT_DIR={mount} SIZE=400000 "
              f"{sys.executable} -c '{_SAVE_TWICE}'")
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=REPO, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert "Traceback" not in r.stderr and "ERROR:absl" not in r.stderr, r.stderr[-3000:]
    assert (f"ERROR CheckpointWriteError 28 cannot write checkpoint 4 in {mount}/checkpoints: no space left on the "
            "device (ENOSPC)") in r.stdout, r.stdout + r.stderr[-2000:]
    assert "STEPS ['0']" in r.stdout  # the partial step is gone, the previous one intact


def test_checkpoint_save_in_a_read_only_folder_is_one_error(tmp_path):
    wrapper = []
    if os.geteuid() == 0:  # root writes anywhere: drop the capability that lets it
        if shutil.which("capsh") is None:
            pytest.skip("running as root without capsh to drop CAP_DAC_OVERRIDE")
        wrapper = ["capsh", "--drop=cap_dac_override,cap_dac_read_search", "--", "-c",
                   f"READ_ONLY=1 {sys.executable} -c '{_SAVE_TWICE}' {tmp_path}"]
        r = subprocess.run(wrapper, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    else:
        r = _orbax_subprocess(_SAVE_TWICE.replace("sys.argv[1]", f"'{tmp_path}'"), "env", "READ_ONLY=1")
    assert "Traceback" not in r.stderr and "ERROR:absl" not in r.stderr, r.stderr[-3000:]
    assert (f"ERROR CheckpointWriteError 13 cannot write checkpoint 4 in {tmp_path}/checkpoints: permission denied "
            "(EACCES); make it writable for you (e.g. chmod u+w) or choose another directory") in r.stdout, r.stdout
    assert "STEPS ['0']" in r.stdout


def test_checkpoints_are_owner_only_whatever_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        c = Checkpointer(tmp_path / "checkpoints")
        c.save(3, {"w": np.arange(4.0)}, {"run_secret": "00ff"})
        c.close()
    finally:
        os.umask(previous)
    modes = {p.relative_to(tmp_path): p.stat().st_mode & 0o777 for p in [tmp_path / "checkpoints",
                                                                          *(tmp_path / "checkpoints").rglob("*")]}
    assert len(modes) > 5
    assert {str(p): m for p, m in modes.items() if m != (0o700 if (tmp_path / p).is_dir() else 0o600)} == {}


# ------------------------------------------------------------------------------- 3. every checkpoint record unreadable


def _secret_checkpoints(run_dir: Path, steps=(0, 4)) -> None:
    c = Checkpointer(run_dir / "checkpoints")
    for step in steps:
        c.save(step, {"w": np.full(3, float(step))}, {"run_secret": "0" * 31 + "7"})
    c.close()


def _damage_records(run_dir: Path) -> None:
    for path in (run_dir / "checkpoints").glob("*/record/*"):
        if path.is_file():
            path.write_bytes(b"\x00garbage")


def test_latest_record_refuses_when_every_record_is_unreadable(tmp_path):
    _secret_checkpoints(tmp_path)
    assert Checkpointer(tmp_path / "checkpoints").latest_record()["run_secret"] == "0" * 31 + "7"
    _damage_records(tmp_path)
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    with pytest.raises(CheckpointsUnreadable) as e:
        checkpointer.latest_record()
    assert f"no checkpoint in {tmp_path / 'checkpoints'} can be read (steps 0, 4 unreadable)" in str(e.value)
    assert "--fresh_start" in str(e.value)
    abandoned = checkpointer.start_fresh()
    assert sorted(p.name for p in abandoned.iterdir()) == ["0", "4"]  # set aside, not deleted
    assert checkpointer.latest_record() is None  # the explicit fresh start: a new run may draw a new secret
    checkpointer.close()
    # Steps quarantined by restore_latest (all damaged) still count: no silent "no checkpoint".
    _secret_checkpoints(tmp_path / "again")
    c = Checkpointer(tmp_path / "again" / "checkpoints")
    for step in (0, 4):
        c._quarantine(step, "is unreadable (test)")
    with pytest.raises(CheckpointsUnreadable, match="damaged steps moved to .*checkpoints-corrupt"):
        c.latest_record()


def _dp_secret_sweep() -> ml_collections.ConfigDict:
    c = small_sweep()
    c.sweep = ml_collections.ConfigDict({"one": grid.grid({"privacy": ("medium",)})})
    return c


class CheckpointingFake(FakeTrain):
    """FakeTrain declaring jaxdp.train's checkpoint layout (orbax steps under checkpoints/), which the sweep then
    checks before resuming a secret-seed run."""

    writes_jaxdp_checkpoints = True


def test_sweep_refuses_a_secret_run_whose_checkpoints_are_unreadable_unless_fresh_start(tmp_path):
    config = _dp_secret_sweep()
    (run,) = grid.expand(config)
    assert run.config.dp.enabled and not run.config.dp.reproducible
    with pytest.raises(ValueError, match="BadZipFile"):  # leaves nothing: creates the run folder and its lock
        launchers.run_sweep(config, tmp_path, train_fn=FailsBeforeFirstStep())
    run_dir = tmp_path / run.name
    workdir.write_run_record(run, run_dir)
    _secret_checkpoints(run_dir)
    _damage_records(run_dir)
    fake = CheckpointingFake()
    with pytest.raises(CheckpointsUnreadable, match="--fresh_start"):
        launchers.run_sweep(config, tmp_path, train_fn=fake)
    assert fake.calls == [] and sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["0", "4"]
    result = launchers.run_sweep(config, tmp_path, train_fn=fake, fresh_start=True)
    assert result.trained == [run.name]
    (abandoned,) = run_dir.glob("abandoned-*")
    assert sorted(p.name for p in (abandoned / "checkpoints").iterdir()) == ["0", "4"]


def test_a_finished_secret_run_whose_final_json_is_damaged_is_not_trained_again_silently(tmp_path, capsys):
    """A finished run deletes its secret-bearing checkpoints (jaxdp.train): a damaged final.json cannot be
    recomputed from them, and training again would draw a second secret. Refused unless --fresh_start."""
    config = _dp_secret_sweep()
    (run,) = grid.expand(config)
    launchers.run_sweep(config, tmp_path, train_fn=CheckpointingFake())
    run_dir = tmp_path / run.name
    shutil.rmtree(run_dir / "checkpoints")  # what a finished run of jaxdp.train leaves: no checkpoint
    (run_dir / "final.json").write_text("{trunc")
    fake = CheckpointingFake()
    with pytest.raises(CheckpointsUnreadable) as e:
        launchers.run_sweep(config, tmp_path, train_fn=fake)
    assert (f"no checkpoint in {run_dir / 'checkpoints'} can be read (there is none, but its final.json was "
            "damaged and set aside (final.json.corrupt-") in str(e.value)
    assert fake.calls == [] and "moved it to final.json.corrupt-" in capsys.readouterr().err
    result = launchers.run_sweep(config, tmp_path, train_fn=fake, fresh_start=True)
    assert result.trained == [run.name] and json.loads((run_dir / "final.json").read_text())["steps"] == 8
    (abandoned,) = run_dir.glob("abandoned-*")
    assert {"history.jsonl", "config.json"} <= {p.name for p in abandoned.iterdir()}
    assert any(p.name.startswith("final.json.corrupt-") for p in abandoned.iterdir())


# ------------------------------------------------------------------------------- 9. damaged prepared data (tfds)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A data_dir with 200 generated images prepared through tfds (the folder tfds reads from)."""
    from jaxdp.data import celeba, synthetic

    data_dir = tmp_path_factory.mktemp("prepared")
    synthetic.write_celeba_files(data_dir / "downloads" / "manual", 200, seed=0)
    celeba.build_imbalanced(female_fraction=0.7, total=40, image_size=16, data_dir=data_dir, source="synthetic")
    return data_dir


def _prepared_folder(data_dir: Path) -> Path:
    (folder,) = (data_dir / "celeb_a_generated").glob("files_*/2.1.0")
    return folder


@pytest.mark.parametrize("damage", ["truncated record", "garbage dataset_info.json"])
def test_damaged_prepared_data_is_prepared_again_from_the_files(prepared, tmp_path, damage):
    from jaxdp.data import celeba

    data_dir = tmp_path / "data"
    shutil.copytree(prepared, data_dir)
    shutil.rmtree(data_dir / "jaxdp_subsets")  # read the prepared copy, not the cached subset
    folder = _prepared_folder(data_dir)
    if damage == "truncated record":
        (record,) = folder.glob("*-train.tfrecord-*")
        record.write_bytes(record.read_bytes()[: record.stat().st_size // 2])
    else:
        (folder / "dataset_info.json").write_text("garbage{")
    train, test = celeba.build_imbalanced(female_fraction=0.7, total=40, image_size=16, data_dir=data_dir,
                                          source="synthetic")
    assert len(train) == 32 and len(test) == 8
    json.loads((folder / "dataset_info.json").read_text())  # prepared again


def test_damaged_prepared_data_without_its_files_is_named_with_what_to_do(prepared, tmp_path):
    from jaxdp.data import DataUnavailable, celeba

    data_dir = tmp_path / "data"
    shutil.copytree(prepared, data_dir)
    shutil.rmtree(data_dir / "jaxdp_subsets")
    folder = _prepared_folder(data_dir)
    (record,) = folder.glob("*-train.tfrecord-*")
    record.write_bytes(record.read_bytes()[:100])
    (data_dir / "downloads" / "manual" / "img_align_celeba.zip").unlink()
    with pytest.raises(DataUnavailable) as e:
        celeba.build_imbalanced(female_fraction=0.7, total=40, image_size=16, data_dir=data_dir, source="synthetic")
    message = str(e.value)
    assert f"The prepared copy of the data in {folder} is damaged (DataLossError" in message
    assert f"Put the five files back in {data_dir / 'downloads' / 'manual'}" in message
    assert f"and delete {folder}" in message and folder.is_dir()  # named, not deleted: it was the only copy


def test_prepared_celeba_with_garbage_dataset_info_and_no_files_is_refused_before_any_run(tmp_path):
    from jaxdp import data
    from jaxdp.config import base_config

    info = tmp_path / "celeb_a" / "2.1.0" / "dataset_info.json"
    info.parent.mkdir(parents=True)
    info.write_text("{garbage")
    c = base_config()
    c.data.data_dir = str(tmp_path)
    with pytest.raises(data.DataUnavailable, match=r"celeb_a/2.1.0 is damaged \(JSONDecodeError"):
        data.check_available(c.data)


# ------------------------------------------------------------------------------------------------- 10. signals


def _start_cli_worker(fake: str, work: Path) -> subprocess.Popen:
    return _worker("cli", fake, "--", "--config", "configs/tiny.py", "--workdir", str(work), "--noreport",
                   "--runs", "nondp-ff0.7")


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_sweep_at_a_checkpoint_with_the_line_and_the_status(tmp_path, signum, code):
    """The trainer polls runlog.stop_requested once per step (as jaxdp.train will): the stop saves a checkpoint
    at the step it came in, and a rerun resumes from it."""
    work = tmp_path / "w"
    proc = _start_cli_worker("polling", work)
    run_dir = work / "nondp-ff0.7-seed0"
    _wait_for(run_dir / "started", proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err + out
    assert err.strip().splitlines()[-1] == "stopped; rerun the same command to resume"
    stopped_at = int((run_dir / "stopped_at").read_text())
    assert (run_dir / "checkpoints" / "latest").read_text() == str(stopped_at) and 1 <= stopped_at < 8
    assert "run nondp-ff0.7-seed0 stopped; rerun the same command to resume it" in out
    if signum == signal.SIGINT:
        return  # the rerun below is the same after either signal
    rerun = _start_cli_worker("polling", work)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-3000:]
    history = [json.loads(line)["step"] for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert history[-1] == 8 and json.loads((run_dir / "final.json").read_text())["steps"] == 8


def test_a_signal_stops_a_trainer_that_does_not_poll_at_once(tmp_path):
    work = tmp_path / "w"
    proc = _start_cli_worker("plain", work)
    _wait_for(work / "nondp-ff0.7-seed0" / "started", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err + out, err[-3000:]
    assert err.strip().splitlines()[-1] == "stopped; rerun the same command to resume"


def test_deferred_stops_wait_for_the_poll_and_a_second_signal_stops_at_once():
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    runlog.install_stop_handlers()
    try:
        with pytest.raises(runlog.Stopped) as e:  # outside: at once, like KeyboardInterrupt
            signal.raise_signal(signal.SIGTERM)
        assert (e.value.signum, e.value.exit_code, str(e.value)) == (signal.SIGTERM, 143, "stopped by SIGTERM")
        polled = []
        with pytest.raises(runlog.Stopped) as e:
            with runlog.deferred_stops():
                signal.raise_signal(signal.SIGINT)  # recorded, not raised
                polled.append(runlog.stop_requested())
        assert polled == [signal.SIGINT] and e.value.exit_code == 130  # raised on leaving the block
        runlog.clear_stop_request()
        with pytest.raises(runlog.Stopped):
            with runlog.deferred_stops():
                signal.raise_signal(signal.SIGTERM)
                signal.raise_signal(signal.SIGTERM)  # a second signal: at once
                polled.append("not reached")
        assert polled == [signal.SIGINT]
    finally:
        runlog.clear_stop_request()
        for s, handler in previous.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------------------------------------- 11. library API


def test_clipped_grad_names_a_mask_of_the_wrong_shape_or_dtype():
    import jax.numpy as jnp

    from jaxdp import clipped_grad
    from jaxdp.clipping import core

    if not hasattr(core, "_check_mask"):
        pytest.skip("the mask check is main's (0712a89, jaxdp.clipping.core._check_mask): runs once merged")

    def loss_fn(params, x, y):
        return jnp.mean((x @ params["w"] - y) ** 2)

    grad_fn = clipped_grad(loss_fn, l2_clip_norm=1.0)
    params, x, y = {"w": jnp.ones(3)}, jnp.ones((4, 3)), jnp.zeros(4)
    assert grad_fn(params, x, y, jnp.ones(4, bool))[1].shape == (4,)
    for mask, given in ((jnp.ones(4), "float32[4]"), (jnp.ones((4, 1), bool), "bool[4, 1]")):
        with pytest.raises(ValueError) as e:
            grad_fn(params, x, y, mask)
        assert str(e.value) == (f"mask must be bool[4] (one entry per example of inputs): True for real examples, "
                                f"False for padding; got {given}.")
    with pytest.raises(ValueError, match=r"mask has 3 entries but an inputs leaf has shape \(4, 3\)"):
        grad_fn(params, x, y, jnp.ones(3, bool))


def test_clip_norm_and_noise_arguments_are_refused_by_name():
    import jax

    from jaxdp import clipped_grad, dp_noise

    for call in (lambda: clipped_grad(lambda p, x, y: 0.0, l2_clip_norm="5"),
                 lambda: dp_noise(1.0, "5", 32, jax.random.key(0))):
        with pytest.raises(TypeError) as e:
            call()
        assert str(e.value) == "l2_clip_norm must be a number > 0 (or a pytree of them); got '5' of type str."
    with pytest.raises(TypeError, match=r"key is None; pass a secret key: jaxdp.noise.secret_key\(\)"):
        dp_noise(1.0, 5.0, 32, None)
    with pytest.raises(TypeError, match=r"noise_multiplier must be a number >= 0; got the str '0.7'"):
        dp_noise("0.7", 5.0, 32, jax.random.key(0))
