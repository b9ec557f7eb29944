import math
import time

import duckdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nmoe.metrics import MetricsWriter, latest, rank_path, read_arrays, read_metrics, run_headers


def _count(path) -> int:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute("SELECT count(*) FROM metrics").fetchone()[0]
    finally:
        con.close()


def test_round_trip_keeps_nan_and_inf(tmp_path):
    with MetricsWriter(tmp_path, "run-a", meta={"cfg": "tiny"}) as w:
        w.log(1, {"train/loss": 2.5, "router/layer03/load_cv": 0.125})
        w.log(2, {"train/loss": math.nan, "grad/norm": math.inf, "neg": -math.inf})
    rows = read_metrics(tmp_path, "run-a")
    got = {(r.step, r.tag): r.value for r in rows}
    assert got[(1, "train/loss")] == 2.5
    assert got[(1, "router/layer03/load_cv")] == 0.125
    assert math.isnan(got[(2, "train/loss")])
    assert got[(2, "grad/norm")] == math.inf and got[(2, "neg")] == -math.inf
    assert {r.rank for r in rows} == {0}
    con = duckdb.connect(str(rank_path(tmp_path, "run-a", 0)), read_only=True)
    assert con.execute("SELECT DISTINCT run_id FROM metrics").fetchall() == [("run-a",)]
    assert [c[1] for c in con.execute("PRAGMA table_info(metrics)").fetchall()] == [
        "run_id",
        "step",
        "tag",
        "value",
        "ts",
    ]
    con.close()
    (header,) = run_headers(tmp_path, "run-a")
    assert header[0] == "run-a" and header[1] == 0 and '"cfg"' in header[5]


def test_latest_takes_the_newest_step_per_tag(tmp_path):
    with MetricsWriter(tmp_path, "r") as w:
        w.log(10, {"a": 1.0, "b": 2.0})
        w.log(11, {"a": 3.0})
    assert latest(tmp_path, "r") == {"a": (11, 3.0), "b": (10, 2.0)}


def test_many_values_batch_to_exact_counts(tmp_path):
    w = MetricsWriter(tmp_path, "r", flush_every_s=3600, max_buffer=10**9)
    tags = [f"router/layer{i:02d}/load_cv" for i in range(40)]
    for step in range(500):
        w.log(step, {t: step + i / 100 for i, t in enumerate(tags)})
    w.flush()
    assert _count(w.path) == 500 * 40
    w.log(500, {"train/loss": 1.0})
    w.close()
    assert _count(w.path) == 500 * 40 + 1


def test_log_does_not_touch_the_db_until_flush(tmp_path):
    w = MetricsWriter(tmp_path, "r", flush_every_s=3600, max_buffer=10**9)
    mtime = w.path.stat().st_mtime_ns
    for step in range(200):
        w.log(step, {"train/loss": 1.0, "lr": 0.1})
    time.sleep(0.2)
    assert _count(w.path) == 0
    assert w.path.stat().st_mtime_ns == mtime
    assert w.pending_rows == 400
    w.flush()
    assert _count(w.path) == 400 and w.pending_rows == 0
    w.close()


def test_max_buffer_triggers_a_write_before_the_interval(tmp_path):
    w = MetricsWriter(tmp_path, "r", flush_every_s=3600, max_buffer=100)
    for step in range(60):
        w.log(step, {"a": 1.0, "b": 2.0})  # 120 rows > max_buffer
    deadline = time.monotonic() + 20
    while w.pending_rows and time.monotonic() < deadline:
        time.sleep(0.02)
    assert w.pending_rows == 0
    assert _count(w.path) == 120
    w.close()


def test_close_is_idempotent_and_log_after_close_fails(tmp_path):
    w = MetricsWriter(tmp_path, "r")
    w.log(0, {"a": 1.0})
    w.close()
    w.close()
    assert _count(w.path) == 1
    with pytest.raises(RuntimeError, match="closed"):
        w.log(1, {"a": 1.0})


def test_bad_input_fails_at_the_call_site(tmp_path):
    with MetricsWriter(tmp_path, "r") as w:
        with pytest.raises(TypeError, match="step must be an int"):
            w.log(1.5, {"a": 1.0})
        with pytest.raises(TypeError, match="'a'.*not convertible"):
            w.log(1, {"a": "high"})
        with pytest.raises(TypeError, match="tags must be non-empty str"):
            w.log(1, {3: 1.0})
        w.log(1, {})
    assert _count(w.path) == 0
    with pytest.raises(ValueError, match="run_id"):
        MetricsWriter(tmp_path, "a/b")
    with pytest.raises(ValueError, match="rank"):
        MetricsWriter(tmp_path, "r", rank=-1)


def test_background_failure_is_raised_to_the_caller(tmp_path, monkeypatch):
    w = MetricsWriter(tmp_path, "r", flush_every_s=3600)

    def broken_append(batch):
        raise OSError("disk full")

    monkeypatch.setattr(w, "_append", broken_append)
    w.log(0, {"a": 1.0})
    with pytest.raises(RuntimeError, match="disk full"):
        w.flush()
    with pytest.raises(RuntimeError, match="disk full"):
        w.log(1, {"a": 1.0})
    with pytest.raises(RuntimeError, match="disk full"):
        w.close()
    w.close()  # already closed: no second error


def test_resume_step_drops_rows_after_the_checkpoint(tmp_path):
    with MetricsWriter(tmp_path, "r") as w:
        for step in range(10):
            w.log(step, {"train/loss": float(step)})
    with MetricsWriter(tmp_path, "r", resume_step=5) as w:
        for step in range(6, 8):
            w.log(step, {"train/loss": 100.0 + step})
    rows = read_metrics(tmp_path, "r")
    assert [(r.step, r.value) for r in rows] == [(s, float(s)) for s in range(6)] + [(6, 106.0), (7, 107.0)]
    assert len(run_headers(tmp_path, "r")) == 2


def test_ranks_are_separate_files_and_readable_together(tmp_path):
    for rank in (0, 1):
        with MetricsWriter(tmp_path, "r", rank=rank) as w:
            w.log(3, {"mem/peak_gb": 10.0 + rank})
    assert {(r.rank, r.value) for r in read_metrics(tmp_path, "r")} == {(0, 10.0), (1, 11.0)}
    assert [r.value for r in read_metrics(tmp_path, "r", rank=1)] == [11.0]
    assert latest(tmp_path, "r") == {"mem/peak_gb": (3, 10.0)}
    assert read_metrics(tmp_path, "r", tags=["other"]) == []
    with pytest.raises(FileNotFoundError, match="ranks present: \\[0, 1\\]"):
        read_metrics(tmp_path, "r", rank=7)
    with pytest.raises(FileNotFoundError, match="runs there: r"):
        read_metrics(tmp_path, "missing")


values = st.floats(allow_nan=True, allow_infinity=True, width=64)
logs = st.lists(
    st.tuples(st.integers(0, 2**40), st.dictionaries(st.text(min_size=1, max_size=12), values, max_size=4)),
    max_size=12,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(logs)
def test_any_logged_values_come_back_bit_exact(tmp_path_factory, entries):
    root = tmp_path_factory.mktemp("m")
    with MetricsWriter(root, "h") as w:
        for step, vals in entries:
            w.log(step, vals)
    expected = sorted((tag, step, repr(v)) for step, vals in entries for tag, v in vals.items())
    got = sorted((r.tag, r.step, repr(r.value)) for r in read_metrics(root, "h"))
    assert got == expected


def test_log_array_round_trips_and_shares_the_scalar_transaction(tmp_path):
    w = MetricsWriter(tmp_path, "r", flush_every_s=3600, max_buffer=10**9)
    for step in range(3):
        w.log(step, {"train/loss": float(step)})
        w.log_array(step, "router/layer00/expert_load", [step, 2.0, math.nan])
        w.log_array(step, "router/layer01/expert_load", [1.0] * 4)
    assert w.pending_rows == 9
    w.close()
    got = read_arrays(tmp_path, "r", "router/layer00/")
    assert [(a.rank, a.step, a.tag) for a in got] == [(0, s, "router/layer00/expert_load") for s in range(3)]
    assert got[2].values[:2] == [2.0, 2.0] and math.isnan(got[2].values[2])
    assert len(read_arrays(tmp_path, "r")) == 6
    assert [a.step for a in read_arrays(tmp_path, "r", "router/layer01", after_step=0)] == [1, 2]
    assert [r.step for r in read_metrics(tmp_path, "r")] == [0, 1, 2]  # arrays stay out of `metrics`
    con = duckdb.connect(str(w.path), read_only=True)
    assert [tuple(c[1:3]) for c in con.execute("PRAGMA table_info(arrays)").fetchall()] == [
        ("run_id", "VARCHAR"),
        ("step", "BIGINT"),
        ("tag", "VARCHAR"),
        ("value", "DOUBLE[]"),
        ("ts", "TIMESTAMP"),
    ]
    con.close()


def test_a_failed_batch_writes_neither_scalars_nor_arrays(tmp_path, monkeypatch):
    from nmoe.metrics import writer as writer_module

    w = MetricsWriter(tmp_path, "r", flush_every_s=3600)
    monkeypatch.setattr(writer_module, "INSERT_ARRAY_BATCH", "INSERT INTO no_such_table VALUES (1)")
    w.log(0, {"a": 1.0})
    w.log_array(0, "e", [1.0])
    with pytest.raises(RuntimeError, match="no_such_table"):
        w.flush()
    assert _count(w.path) == 0, "the scalar insert of the failed batch must roll back"
    with pytest.raises(RuntimeError, match="no_such_table"):
        w.close()


def test_log_array_bad_input_fails_at_the_call_site(tmp_path):
    with MetricsWriter(tmp_path, "r") as w:
        with pytest.raises(ValueError, match="empty"):
            w.log_array(0, "e", [])
        with pytest.raises(TypeError, match="sequence of floats"):
            w.log_array(0, "e", "123")
        with pytest.raises(TypeError, match="'e'.*not convertible"):
            w.log_array(0, "e", [1.0, "x"])
        with pytest.raises(TypeError, match="step must be an int"):
            w.log_array(0.5, "e", [1.0])
    assert read_arrays(tmp_path, "r") == []


def test_resume_step_drops_arrays_after_the_checkpoint_and_old_files_read_empty(tmp_path):
    with MetricsWriter(tmp_path, "r") as w:
        for step in range(6):
            w.log_array(step, "e", [float(step)])
    with MetricsWriter(tmp_path, "r", resume_step=3) as w:
        w.log_array(4, "e", [40.0])
    assert [(a.step, a.values) for a in read_arrays(tmp_path, "r")] == [(s, [float(s)]) for s in range(4)] + [
        (4, [40.0])
    ]
    old = rank_path(tmp_path, "old", 0)
    old.parent.mkdir()
    con = duckdb.connect(str(old))
    con.execute("CREATE TABLE metrics (run_id VARCHAR, step BIGINT, tag VARCHAR, value DOUBLE, ts TIMESTAMP)")
    con.close()
    assert read_arrays(tmp_path, "old") == []
