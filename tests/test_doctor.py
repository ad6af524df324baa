"""`transferlab doctor` and `transferlab cache info|prune`, `transferlab runs`."""

from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from transferlab.cache_admin import cache_info, parse_age, parse_size, prune_cache
from transferlab.cli import app
from transferlab.errors import TransferlabError

runner = CliRunner()


def test_doctor_json_lists_every_check_with_a_status(tmp_path):
    result = runner.invoke(app, ["doctor", "--json", "--out", str(tmp_path / "runs"),
                                 "--cache-dir", str(tmp_path / "cache")])  # fmt: skip
    checks = json.loads(result.output)
    names = {c["name"] for c in checks}
    assert {"versions", "cpu", "accelerators", "engines", "cache", "offline weights",
            "headless chromium", "output folder"} <= names  # fmt: skip
    assert all(c["status"] in ("green", "yellow", "red") for c in checks)
    engines = next(c for c in checks if c["name"] == "engines")
    assert "would use" in engines["detail"]
    assert result.exit_code == (1 if any(c["status"] == "red" for c in checks) else 0)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_doctor_unwritable_output_is_red_with_a_fix(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result = runner.invoke(app, ["doctor", "--json", "--out", str(locked / "runs")])
    out = next(c for c in json.loads(result.output) if c["name"] == "output folder")
    assert out["status"] == "red" and out["fix"]
    assert result.exit_code == 1


def test_doctor_output_folder_check(tmp_path):
    from transferlab.doctor import _writable

    ok = _writable("output folder", tmp_path / "a" / "b", "fix")
    assert ok.status == "green"
    bad = _writable("output folder", Path("/proc/1/nope"), "fix it")
    assert bad.status == "red" and bad.fix == "fix it"


def _entry(root: Path, ns: str, name: str, size: int, age_days: float) -> Path:
    p = root / "features" / ns / name[:2] / f"{name}.feat"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x" * size)
    t = time.time() - age_days * 86400
    os.utime(p, (t, t))
    return p


def test_cache_info_and_prune_by_age_then_size(tmp_path):
    root = tmp_path / "cache"
    old = _entry(root, "ns1", "aa" * 8, 1000, 40)
    mid = _entry(root, "ns1", "bb" * 8, 1000, 10)
    new = _entry(root, "ns2", "cc" * 8, 1000, 0)
    info = cache_info(root)
    assert info.bytes == 3000 and info.files == 3
    assert info.namespaces["ns1"] == {"bytes": 2000, "files": 2}
    done = prune_cache(root, older_than_s=parse_age("30d"))
    assert done["files"] == 1 and not old.exists() and mid.exists()
    done = prune_cache(root, max_bytes=parse_size("1.5KB"))
    assert done["files"] == 1 and not mid.exists() and new.exists()  # least recently used first
    assert not (root / "features" / "ns1").exists()  # emptied folders go too
    result = runner.invoke(app, ["cache", "info", "--cache-dir", str(root), "--json"])
    assert json.loads(result.output)["bytes"] == 1000


def test_cache_option_parsing():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_age("12h") == 12 * 3600
    with pytest.raises(TransferlabError, match="--max-size"):
        parse_size("lots")
    with pytest.raises(TransferlabError, match="--older-than"):
        parse_age("30")
    with pytest.raises(TransferlabError, match="--older-than"):
        prune_cache("/nonexistent")


def _fake_run(root: Path, name: str, acc: float, strategy: str) -> None:
    run = root / name
    run.mkdir(parents=True)
    (run / "model.json").write_text(json.dumps({"strategy": strategy, "body": {"spec": "m"}}))
    m = {"accuracy": acc, "accuracy_ci95": [acc - 0.1, min(1.0, acc + 0.1)]}
    (run / "metrics.json").write_text(json.dumps({"val": m, "test": m, "timings": {"total_s": 3}}))
    (run / "data.json").write_text(json.dumps({"index": {"root": "/d/cats"}}))


def test_runs_table_sorts_and_exports(tmp_path):
    _fake_run(tmp_path, "a", 0.7, "features")
    _fake_run(tmp_path, "sub/b", 0.9, "finetune")
    _fake_run(tmp_path, "mlruns/1/abc/artifacts", 0.9, "finetune")  # MLflow's copy: not a run
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.json").write_text("{oops")
    result = runner.invoke(app, ["runs", str(tmp_path), "--sort", "test_acc", "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [Path(r["run"]).name for r in rows] == ["b", "a", "broken"]
    assert rows[0]["test_lo"] == pytest.approx(0.8) and rows[0]["strategy"] == "finetune"
    result = runner.invoke(app, ["runs", str(tmp_path), "--format", "csv", "--sort", "test_acc",
                                 "--no-descending"])  # fmt: skip
    table = list(csv.DictReader(io.StringIO(result.output)))
    assert [Path(r["run"]).name for r in table] == ["a", "b", "broken"]
    result = runner.invoke(app, ["runs", str(tmp_path)], env={"COLUMNS": "250"})
    assert "90.0% [80.0%, 100.0%]" in result.output and "finetune" in result.output
    result = runner.invoke(app, ["runs", str(tmp_path), "--sort", "nope"])
    assert result.exit_code != 0
