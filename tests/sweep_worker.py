"""A sweep process for tests/test_reliability.py: two of them share a workdir, or one is sent a signal.

    python tests/sweep_worker.py share WORKDIR LOG GO     run_sweep over small_sweep() with SlowTrain, once GO exists
    python tests/sweep_worker.py cli FAKE -- ARGS...      launch/sweep.py's main with ARGS, the trainer replaced
                                                          by FAKE (polling | plain | enospc)

SlowTrain is test_sweep.FakeTrain (8 steps, a checkpoint every 4) with a pause per step and one line per step in
LOG ("pid run step"), appended with O_APPEND so that lines of two processes never mix.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from test_sweep import FakeTrain, load_cli, small_sweep  # noqa: E402

from jaxdp import runlog  # noqa: E402
from jaxdp_study import launchers  # noqa: E402


class SlowTrain(FakeTrain):
    """FakeTrain that takes ``pause`` seconds a step and logs each step; inside runlog.deferred_stops, polling
    runlog.stop_requested() once per step as jaxdp.train does: a stop saves the step as its checkpoint (the
    `latest` file) and raises runlog.Stopped."""

    def __init__(self, log: str | None = None, pause: float = 0.05, poll: bool = True,
                 fail_with: OSError | None = None):
        super().__init__()
        self.log, self.pause, self.poll, self.fail_with = log, pause, poll, fail_with

    def __call__(self, config, workdir, *, on_progress=None):
        wd = Path(workdir)

        def progress(step, total, info):
            time.sleep(self.pause)
            if self.log:
                fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
                os.write(fd, f"{os.getpid()} {wd.name} {step}\n".encode())
                os.close(fd)
            (wd / "started").touch()
            if self.poll and (signum := runlog.stop_requested()) is not None:
                (wd / "checkpoints" / "latest").write_text(str(step))  # the checkpoint a stop saves
                (wd / "stopped_at").write_text(str(step))
                raise runlog.Stopped(signum)
            if on_progress is not None:
                on_progress(step, total, info)

        if self.fail_with is not None:  # the disk fills up during the run: every atomic write fails at its flush
            def fail_on_fsync(fd):
                raise self.fail_with

            (wd / "checkpoints").mkdir(parents=True, exist_ok=True)
            progress(1, self.steps, {})
            os.fsync = fail_on_fsync
            runlog.write_json(wd / "final.json", {"metrics": {}})
        if not self.poll:
            return super().__call__(config, workdir, on_progress=progress)
        with runlog.deferred_stops():
            return super().__call__(config, workdir, on_progress=progress)


def share(workdir: str, log: str, go: str) -> None:
    while not os.path.exists(go):  # both processes start training together
        time.sleep(0.01)
    result = launchers.run_sweep(small_sweep(), workdir, train_fn=SlowTrain(log))
    print(json.dumps({"pid": os.getpid(), "trained": result.trained, "busy": result.busy,
                      "skipped": result.skipped}))


def cli(fake: str, args: list[str]) -> None:
    trainers = {"polling": lambda: SlowTrain(pause=0.15), "plain": lambda: SlowTrain(pause=0.15, poll=False),
                "enospc": lambda: SlowTrain(fail_with=OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))}
    launchers._default_train_fn = trainers[fake]
    from absl import app

    mod = load_cli()
    sys.argv = ["sweep.py", *args]
    app.run(mod.main, flags_parser=mod._parse_flags)


if __name__ == "__main__":
    if sys.argv[1] == "share":
        share(*sys.argv[2:5])
    else:
        cli(sys.argv[2], sys.argv[sys.argv.index("--") + 1:])
