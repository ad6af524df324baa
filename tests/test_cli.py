"""The command line: real subprocesses, as a user runs them."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from test_api import COLOURS, TINY, _photo, photo_dataset


def tl(*args, cwd=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "transferlab", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def test_user_errors_are_one_line_not_a_traceback(tmp_path):
    r = tl("fit", tmp_path / "nope", "--out", tmp_path / "run")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "nope" in r.stderr and "error:" in r.stderr
    r = tl("predict", tmp_path, tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "model.json" in r.stderr


def test_fit_evaluate_predict_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    data = photo_dataset(tmp_path / "data", (("train", 10), ("val", 4), ("test", 4)))
    (tmp_path / "photos").mkdir()
    _photo(tmp_path / "photos" / "ünïcode red.jpg", COLOURS["red"], rng)
    (tmp_path / "photos" / "broken.jpg").write_text("hello")
    run = tmp_path / "run"
    common = ["--cache-dir", tmp_path / "cache", "--workers", "0"]
    r = tl(
        "fit",
        data,
        "--out",
        run,
        "--backbone",
        TINY,
        "--no-pretrained",
        "--engine",
        "torch",
        *common,
    )
    assert r.returncode == 0, r.stderr
    assert "test accuracy" in r.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] >= 0.85

    r = tl("evaluate", run, data, "--split", "val", "--json", tmp_path / "val.json")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "val.json").read_text())["accuracy"] == metrics["val"]["accuracy"]

    r = tl("predict", run, tmp_path / "photos", "--top-k", "2", "--format", "csv")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(rows) == 1 and rows[0]["label1"] == "red"
    assert abs(float(rows[0]["prob1"]) + float(rows[0]["prob2"]) - 1) < 1e-4
    assert "broken.jpg" in r.stderr and "1 unreadable" in r.stderr

    # a folder without split folders that is not the run's own data: every image is scored
    r = tl("evaluate", run, data / "test", "--json", tmp_path / "all.json")
    assert r.returncode == 0, r.stderr
    assert "scoring all 8 usable images" in r.stderr and "ECE" in r.stdout
    assert json.loads((tmp_path / "all.json").read_text())["n"] == 8
    # the run's images moved into one unsplit folder: those it trained or validated on are not
    # scored again (they would inflate the accuracy), only its test images
    moved = tmp_path / "moved"
    for image in data.rglob("*.jpg"):
        (moved / image.parent.name).mkdir(parents=True, exist_ok=True)
        target = moved / image.parent.name / f"{image.parent.parent.name}-{image.name}"
        target.write_bytes(image.read_bytes())
    r = tl("evaluate", run, moved, "--json", tmp_path / "moved.json")
    assert r.returncode == 0, r.stderr
    assert "left out 28 image(s) the model was trained or validated on" in r.stderr  # 2 x (10+4)
    assert json.loads((tmp_path / "moved.json").read_text())["n"] == 8
    # inputs that match nothing are an error, not an empty success
    r = tl("predict", run, str(tmp_path / "nothing*.jpg"))
    assert r.returncode == 2 and "matched no file" in r.stderr


def test_command_options_are_config_fields() -> None:
    """fit/ladder/lr-find build FitConfig from their options by name: a renamed option must fail
    here instead of being dropped silently."""
    import dataclasses
    import inspect

    from transferlab.cli import fit, ladder, lr_find
    from transferlab.config import FitConfig

    fields = {f.name for f in dataclasses.fields(FitConfig)}
    own = {fit: {"data", "out"}, lr_find: {"data", "out"}}
    own[ladder] = {"data", "out", "rungs", "seeds", "quick"}
    for command, extra in own.items():
        assert set(inspect.signature(command).parameters) - extra <= fields, command.__name__
    assert set(inspect.signature(fit).parameters) - own[fit] == fields  # fit exposes them all


def test_conventions_help_version_and_short_out(tmp_path):
    r = tl("--version")
    assert r.returncode == 0 and r.stdout.startswith("transferlab ")
    for command in ("fit", "ladder", "lr-find", "explain", "report", "compare", "predict"):
        r = tl(command, "-h")
        assert r.returncode == 0, (command, r.stderr)
        assert "-o" in r.stdout and "--out" in r.stdout, command


def test_ctrl_c_says_how_to_resume_and_resume_finishes(tiny_dataset, tmp_path):
    """SIGINT during training: one line naming the command to resume with, exit 130; that
    command then continues from the checkpoint and completes."""
    import signal
    import time

    args = [
        "fit", str(tiny_dataset), "--out", str(tmp_path / "run"), "--strategy", "scratch-basic",
        "--backbone", TINY, "--no-pretrained", "--image-size", "64", "--epochs", "60",
        "--patience", "1000", "--engine", "torch", "--workers", "0", "--batch-size", "4",
        "--cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "transferlab", *args],
        stderr=subprocess.PIPE,
        text=True,
        # as a terminal's Ctrl-C finds it, even when this test runs in a background job (where
        # SIGINT starts ignored and Python would never raise KeyboardInterrupt)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    for line in proc.stderr:  # the first finished epoch is logged: a checkpoint exists
        if "epoch 2/" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130
    assert "Traceback" not in rest
    hint = rest.strip().splitlines()[-1]
    assert hint.startswith("interrupted — resume with: transferlab fit ") and "--resume" in hint
    # nothing half-written in OUT: the run waits in OUT.partial, marked, with its checkpoints
    run, partial = tmp_path / "run", tmp_path / "run.partial"
    assert not run.exists() and (partial / "incomplete.json").is_file()
    # the SLURM example's requeue check finds this checkpoint, and so passes --resume
    sbatch = Path(__file__).parents[1] / "examples" / "slurm.sbatch"
    test = next(line for line in sbatch.read_text().splitlines() if 'last.ckpt" ]]' in line)
    check = subprocess.run(["bash", "-c", f"RUN={run}; {test} echo resume; fi"],
                           capture_output=True, text=True)  # fmt: skip
    assert check.stdout.strip() == "resume", (test, check.stderr)
    # every command that meets it says how to resume; a plain re-run is refused, not started over
    for command in (["predict", run, tiny_dataset], ["evaluate", partial, tiny_dataset], args):
        r = tl(*command)
        assert r.returncode == 2 and "interrupted run" in r.stderr, (command, r.stderr)
        assert "--resume" in r.stderr and "Traceback" not in r.stderr
    listed = tl("runs", tmp_path, "--format", "csv")
    assert listed.returncode == 0 and "run.partial,incomplete" in listed.stdout, listed.stdout
    resumed = tl(*hint.split("resume with: transferlab ", 1)[1].split())
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not partial.exists()
    history = json.loads((run / "history.json").read_text())
    assert len(history) == 60  # every epoch, the interrupted ones and the resumed ones
    again = tl(*hint.split("resume with: transferlab ", 1)[1].split())
    assert again.returncode == 0 and "nothing left to train" in again.stderr


def test_a_failed_overwrite_leaves_the_old_run_whole(tiny_dataset, tmp_path, monkeypatch):
    """The new run is built beside the old one and renamed over it only when complete: a crash
    midway (here in the metrics) leaves the old run loadable and unchanged."""
    import pytest

    import transferlab
    from conftest import tiny_fit_options
    from transferlab import api

    run = tmp_path / "run"
    first = transferlab.fit(tiny_dataset, out=run, **tiny_fit_options(tmp_path), verbose=False)
    before = (run / "model.json").read_bytes()

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(api, "_fit_metrics", crash)
    with pytest.raises(OSError):
        transferlab.fit(tiny_dataset, out=run, overwrite=True, seed=7, **tiny_fit_options(tmp_path))
    assert (run / "model.json").read_bytes() == before
    again = transferlab.load(run)
    assert again.metrics["test"]["accuracy"] == first.metrics["test"]["accuracy"]
    assert (tmp_path / "run.partial" / "incomplete.json").is_file()


def test_quiet_anywhere_and_piped_tables_keep_whole_paths(tiny_dataset, tmp_path):
    """-q/--quiet (before or after the command) leaves results and errors only; piped output
    is never cut at 80 columns: a long path comes out whole."""
    run = tmp_path / "run"
    args = ["--out", run, "--backbone", TINY, "--no-pretrained", "--engine", "torch",
            "--workers", "0", "--cache-dir", tmp_path / "cache"]  # fmt: skip
    r = tl("fit", tiny_dataset, *args, "-q")
    assert r.returncode == 0, r.stderr
    assert "checking images" not in r.stderr and "found" not in r.stderr  # no progress, no info
    assert "test accuracy" in r.stdout
    loud = tl("fit", tiny_dataset, *args, "--overwrite")
    assert "checking images" in loud.stderr  # what -q took away
    r = tl("-q", "predict", run, tmp_path / "nothing*.jpg")
    assert r.returncode == 2 and "matched no file" in r.stderr  # errors still said

    deep = tmp_path / ("a_rather_long_folder_name_" * 4) / "and_another_level_of_folders"
    deep.mkdir(parents=True)
    photo = next((tiny_dataset / "test" / "a").glob("*.jpg"))
    (deep / "picture_with_a_long_descriptive_name.jpg").write_bytes(photo.read_bytes())
    r = tl("predict", run, deep, "--format", "table")
    assert r.returncode == 0, r.stderr
    assert str(deep / "picture_with_a_long_descriptive_name.jpg") in r.stdout
    assert len(str(deep)) > 120


def test_a_foreign_partial_folder_is_never_touched(tiny_dataset, tmp_path):
    """OUT.partial that transferlab did not make (no incomplete.json) is refused, not removed."""
    import pytest

    import transferlab
    from conftest import tiny_fit_options
    from transferlab.errors import TransferlabError

    mine = tmp_path / "run.partial"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(TransferlabError, match="not an interrupted transferlab run"):
        transferlab.fit(tiny_dataset, out=tmp_path / "run", **tiny_fit_options(tmp_path))
    assert (mine / "notes.txt").read_text() == "keep me"
