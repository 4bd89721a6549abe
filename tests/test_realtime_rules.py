"""The rules for real-time tests (tests/conftest.py): a timing miss fails unless the machine was
saturated by other work (then it is reported as xfailed, never passed), and the load measurement
tells this test's own processes from other work."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import MachineLoad, Timing, _proc_cpu_seconds

BUSY = "import time\nend = time.process_time() + {seconds}\nwhile time.process_time() < end: pass\n"


def loaded(total: float, others: float, cores: int = 2) -> MachineLoad:
    load = MachineLoad()
    load.stop = lambda: load  # keep the values below
    load.cores, load.total, load.others = cores, total, others
    return load


def verdict(load: MachineLoad, *checks: bool) -> tuple[str, str]:
    """(outcome, message) of a Timing whose checks came out as `checks`, under `load`."""
    t = Timing()
    t.load = load
    for i, ok in enumerate(checks):
        t.check(ok, f"check {i}")
    try:
        t.verdict()
    except pytest.xfail.Exception as exc:  # a subclass of pytest.fail.Exception: caught first
        return "xfailed", str(exc)
    except pytest.fail.Exception as exc:
        return "failed", str(exc)
    return "passed", ""


def test_timing_misses_fail_unless_other_work_saturated_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    import conftest

    assert verdict(loaded(2.0, 1.5), True, True)[0] == "passed"  # no miss: passes whatever the load
    outcome, message = verdict(loaded(0.4, 0.1), True, False)  # an idle machine: the miss is ours
    assert outcome == "failed" and "check 1" in message and "check 0" not in message
    assert verdict(loaded(1.9, 0.2), False)[0] == "failed"  # saturated, but by this test itself
    assert verdict(loaded(1.2, 1.0), False)[0] == "failed"  # other work, but cores to spare
    outcome, message = verdict(loaded(1.9, 1.1), False)
    assert outcome == "xfailed" and "1.90 of 2 cores busy, 1.10 of them by other work" in message, message
    assert "check 0" in message
    monkeypatch.setattr(conftest, "STRICT_TIMING", True)
    assert verdict(loaded(1.9, 1.1), False)[0] == "failed"


needs_proc = pytest.mark.skipif(not Path("/proc/stat").exists(), reason="the load is read from /proc (Linux)")


def cpu_of(pid: int) -> float:
    info = _proc_cpu_seconds(pid)
    assert info is not None
    return info[1]


@needs_proc
def test_a_child_process_counts_as_this_test_and_a_detached_one_as_other_work(tmp_path: Path) -> None:
    # ours: a child of this process, still running when the load is read
    load = MachineLoad()
    child = subprocess.Popen([sys.executable, "-c", BUSY.format(seconds=0.6) + "time.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        while cpu_of(child.pid) < 0.6 and time.monotonic() < deadline:
            time.sleep(0.05)
        child_cpu = cpu_of(child.pid)
        load.stop()
        own = (load.total - load.others) * load.wall  # CPU seconds
        assert child_cpu >= 0.6 and own >= child_cpu - 0.05, (own, child_cpu)
    finally:
        child.kill()
        child.wait()

    # other work: a process that is not a descendant (its parent exits at once: init adopts it)
    pid_file = tmp_path / "pid"
    code = f"import os\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n" + BUSY.format(seconds=0.6)
    load = MachineLoad()
    subprocess.run([sys.executable, "-c", f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {code!r}])"],
                   check=True)
    deadline = time.monotonic() + 20
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)
    detached = int(pid_file.read_text())
    cpu = 0.0
    while (info := _proc_cpu_seconds(detached)) is not None and time.monotonic() < deadline:
        cpu = info[1]
        if cpu >= 0.55:
            break
        time.sleep(0.02)
    load.stop()
    assert cpu >= 0.55 and load.others * load.wall >= cpu - 0.1, (load.others, load.wall, cpu)
    try:
        os.kill(detached, 9)
    except ProcessLookupError:
        pass
