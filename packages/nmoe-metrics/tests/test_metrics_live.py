"""A run is readable while it is being written: readers and the writer live in different processes."""

import subprocess
import sys
import textwrap
import time
from collections import Counter

import pytest

from nmoe.metrics import MetricsWriter, latest, read_metrics

TAGS = ("train/loss", "lr", "router/layer00/load_cv")
WRITER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from nmoe.metrics import MetricsWriter
    w = MetricsWriter(sys.argv[1], "live", flush_every_s=0.05)
    print("started", flush=True)
    for step in range(int(sys.argv[2])):
        w.log(step, {"train/loss": 10.0 / (step + 1), "lr": 1e-3, "router/layer00/load_cv": 0.5})
        time.sleep(0.01)
    w.close()
    print("done", flush=True)
    """
)
HOLD_READ_LOCK_SCRIPT = textwrap.dedent(
    """
    import sys, time, duckdb
    con = duckdb.connect(sys.argv[1], read_only=True)
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    con.close()
    """
)


def test_reader_follows_a_live_writer_in_another_process(tmp_path):
    n_steps = 150
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER_SCRIPT, str(tmp_path), str(n_steps)], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout.readline().strip() == "started"
    seen = []
    while writer.poll() is None:
        rows = read_metrics(tmp_path, "live")
        per_step = Counter(r.step for r in rows)
        assert set(per_step.values()) <= {len(TAGS)}, "a step was visible with only part of its tags"
        seen.append(len(rows))
        time.sleep(0.02)
    assert writer.returncode == 0 and writer.stdout.read().strip() == "done"
    assert seen == sorted(seen), "row count went backwards"
    assert any(0 < n < n_steps * len(TAGS) for n in seen), f"never saw a partial run: {seen[:5]}...{seen[-5:]}"
    assert len(read_metrics(tmp_path, "live")) == n_steps * len(TAGS)
    assert latest(tmp_path, "live")["train/loss"] == (n_steps - 1, 10.0 / n_steps)


def _hold_read_lock(path, seconds):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_READ_LOCK_SCRIPT, str(path), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_writer_waits_out_a_reader_holding_the_file(tmp_path):
    w = MetricsWriter(tmp_path, "r", flush_every_s=3600)
    holder = _hold_read_lock(w.path, 1.0)
    for step in range(50):
        w.log(step, {"a": float(step)})
    t0 = time.monotonic()
    w.flush(timeout=30)
    waited = time.monotonic() - t0
    assert holder.wait() == 0
    assert waited > 0.3, "flush cannot have written while another process held the file"
    w.close()
    assert [r.value for r in read_metrics(tmp_path, "r")] == [float(s) for s in range(50)]


def test_flush_times_out_under_a_long_lock_and_loses_nothing(tmp_path):
    w = MetricsWriter(tmp_path, "r", flush_every_s=3600, lock_timeout_s=0.2)
    holder = _hold_read_lock(w.path, 2.0)
    w.log(0, {"a": 1.0, "b": 2.0})
    with pytest.raises(TimeoutError, match="2 rows pending"):
        w.flush(timeout=0.5)
    assert holder.wait() == 0
    w.close()
    assert sorted(r.tag for r in read_metrics(tmp_path, "r")) == ["a", "b"]


def test_reader_in_the_writing_process_retries_instead_of_failing(tmp_path):
    w = MetricsWriter(tmp_path, "r", flush_every_s=0.01)
    for step in range(200):
        w.log(step, {"a": float(step)})
        if step % 5 == 0:
            latest(tmp_path, "r")  # may race the writer thread's connection: must retry, not raise
    w.close()
    assert latest(tmp_path, "r") == {"a": (199, 199.0)}
