"""The progress line: what it shows, and that no output of it resolves a single step's duration."""

import io

import pytest

from jaxdp import runlog


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _lines(durations, monkeypatch, window_steps=20):
    """Everything the progress line writes on a terminal for steps taking ``durations`` seconds each."""
    clock = [100.0]
    monkeypatch.setattr(runlog.time, "monotonic", lambda: clock[0])
    out = _Terminal()
    progress = runlog.RunProgress("run", stream=out, window_steps=window_steps)
    total = len(durations)
    progress(0, total, {})  # after compilation: where the windows start
    for step, seconds in enumerate(durations, start=1):
        clock[0] += seconds
        progress(step, total, {"accuracy_0": 90.0, "accuracy_1": 80.0, "group_names": ("white", "non-white")})
    return out.getvalue()


def test_the_line_changes_once_per_window_with_that_windows_speed(monkeypatch):
    text = _lines([0.5] * 20 + [0.25] * 20 + [1.0] * 5, monkeypatch)
    lines = [line for line in text.split("\r") if line]
    assert len(lines) == 3  # after steps 20 and 40, and at the last step (45)
    assert "step 20/45" in lines[0] and "2.00 steps/s" in lines[0]
    assert "step 40/45" in lines[1] and "4.00 steps/s" in lines[1]
    assert "step 45/45" in lines[2] and "1.00 steps/s" in lines[2]
    assert "acc W 90.0 / N 80.0" in lines[0]  # the groups' own initials


@pytest.mark.parametrize("swap", [(0, 19), (3, 7), (21, 38)])
def test_no_output_resolves_a_single_steps_duration(monkeypatch, swap):
    """Steps of one window taking their durations in another order (a large Poisson batch early or late)
    give exactly the same output."""
    durations = [0.1 * (1 + (i % 7)) for i in range(40)]
    swapped = list(durations)
    i, j = swap
    swapped[i], swapped[j] = swapped[j], swapped[i]
    assert durations != swapped
    assert _lines(durations, monkeypatch) == _lines(swapped, monkeypatch)
