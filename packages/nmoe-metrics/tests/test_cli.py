import csv
import math
import shutil
import subprocess
import sys

import pytest

from nmoe.metrics import MetricsWriter, Registry
from nmoe.metrics.cli import main
from nmoe.metrics.sparkline import BARS


@pytest.fixture
def run_dirs(tmp_path, monkeypatch):
    """A registry with two runs and metrics for one of them; env vars point the CLI at both."""
    db, metrics = tmp_path / "experiments.sqlite", tmp_path / "metrics"
    reg = Registry(db)
    common = dict(config_toml="", fingerprint="f", git_rev="g", world_size=1, device="cpu")
    reg.start("old-run", name="first", **common)
    reg.finish("old-run", "failed", {"train/loss": math.nan})
    reg.start("tiny-1", name="tiny", **common)
    with MetricsWriter(metrics, "tiny-1") as w:
        for step in range(100):
            w.log(step, {"train/loss": 5.0 - step / 25, "lr": 3e-4, "throughput/tokens_per_s": 12345.0})
        w.log(100, {"train/loss": math.nan})
    reg.finish("tiny-1", "completed", {"train/loss": 1.04, "val/loss": 1.1}, step=100)
    monkeypatch.setenv("NMOE_EXPERIMENTS_DB", str(db))
    monkeypatch.setenv("NMOE_METRICS_DIR", str(metrics))
    return db, metrics


def test_runs_lists_every_run_newest_first(run_dirs, capsys):
    assert main(["runs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["id", "name", "status", "steps", "device", "start", "final", "loss", "val", "loss"]
    assert lines[2].split()[:5] == ["tiny-1", "tiny", "completed", "100", "cpu"]
    assert lines[2].split()[-2:] == ["1.0400", "1.1000"]
    assert lines[3].split()[:3] == ["old-run", "first", "failed"] and "nan" in lines[3]


def test_show_prints_latest_values_and_sparklines(run_dirs, capsys):
    assert main(["show", "tiny-1", "--width", "20"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "status completed" in out[0] and "step 100" in out[0]
    by_tag = {line.split()[0]: line.split() for line in out[3:]}
    assert set(by_tag) == {"lr", "throughput/tokens_per_s", "train/loss"}
    loss = by_tag["train/loss"]
    assert loss[1:5] == ["100", "nan", "1.0400", "5.0000"]
    spark = loss[5]
    assert len(spark) == 20 and spark[0] == BARS[-1] and spark[-1] == "×"
    assert list(spark[:-1]) == sorted(spark[:-1], key=BARS.index, reverse=True)  # falling loss
    assert by_tag["throughput/tokens_per_s"][2] == "12,345"


def test_show_without_registry_and_with_tag_filter(run_dirs, capsys, tmp_path):
    _, metrics = run_dirs
    assert (
        main(["show", "tiny-1", "--db", str(tmp_path / "none.sqlite"), "--metrics-dir", str(metrics), "--tag", "lr"])
        == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[0] == "tag" and [line.split()[0] for line in out[2:]] == ["lr"]


def test_show_run_in_registry_without_metrics(run_dirs, capsys):
    assert main(["show", "old-run"]) == 0
    assert "no metrics recorded" in capsys.readouterr().out


def test_unknown_run_id_lists_known_runs(run_dirs, capsys):
    assert main(["show", "typo"]) == 2
    err = capsys.readouterr().err
    assert "unknown run id 'typo'" in err
    assert "tiny-1, old-run" in err and "runs with metrics: tiny-1" in err


def test_missing_registry_is_a_clear_error(tmp_path, capsys):
    assert main(["runs", "--db", str(tmp_path / "nope.sqlite")]) == 2
    assert "no experiment registry at" in capsys.readouterr().err


def test_export_csv_round_trips(run_dirs, tmp_path, capsys):
    out = tmp_path / "m.csv"
    assert main(["export", "tiny-1", "--csv", str(out)]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 301 and set(rows[0]) == {"rank", "step", "tag", "value", "ts"}
    last = [r for r in rows if r["step"] == "100"]
    assert [(r["tag"], r["value"]) for r in last] == [("train/loss", "nan")]


def test_console_script_runs(run_dirs):
    exe = shutil.which("nmoe-metrics") or str(__import__("pathlib").Path(sys.executable).parent / "nmoe-metrics")
    result = subprocess.run([exe, "runs"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "tiny-1" in result.stdout and "old-run" in result.stdout


def test_damaged_files_and_bad_arguments_give_one_line_errors(run_dirs, tmp_path, capsys):
    db, metrics = run_dirs
    (metrics / "broken").mkdir()
    (metrics / "broken" / "rank_0.duckdb").write_bytes(b"not a database")
    assert main(["show", "broken"]) == 2
    err = capsys.readouterr().err
    assert "rank_0.duckdb" in err and "Traceback" not in err

    bad_db = tmp_path / "bad.sqlite"
    bad_db.write_bytes(b"garbage" * 100)
    assert main(["runs", "--db", str(bad_db)]) == 2
    assert str(bad_db) in capsys.readouterr().err

    assert main(["export", "tiny-1", "--csv", str(tmp_path / "missing-dir" / "out.csv")]) == 2
    assert "pass --csv with a writable path" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exc:
        main(["show", "tiny-1", "--width", "0"])
    assert exc.value.code == 2 and "must be >= 1" in capsys.readouterr().err
