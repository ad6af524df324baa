"""Kill -9 a deterministic training run mid-way, resume it, and get the uninterrupted result.

Three subprocesses run the same two-stage job (head, then the top two stages with BatchNorm in
train mode, augmentation on): one uninterrupted; one SIGKILLed as soon as its first checkpoint
appears (decoding is slowed down so that happens inside the run); and that one again with
``resume=True``, on two DataLoader workers where the others decode in the main process (the
worker count may change on resume: augmentation is seeded per item, not per worker). Final
weights and every per-epoch metric must be identical.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from transferlab.engine import load_checkpoint

TESTS = Path(__file__).resolve().parent

SCRIPT = textwrap.dedent(
    """
    import hashlib, json, os, sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    import transferlab.data.dataset as dataset
    from test_engine import PRE, make_split, tiny_config, tiny_net
    from transferlab.engine import Stage, train

    root, out, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    if mode == "slow":
        decode = dataset.open_rgb
        def slow_open(*a, **k):
            time.sleep(0.05)
            return decode(*a, **k)
        dataset.open_rgb = slow_open
    tr, va = make_split(root, "train", 16), make_split(root, "val", 8, seed=100)
    res = train(
        tiny_net(7), tr, va, preprocess=PRE,
        config=tiny_config(resume=mode == "resume", workers=2 if mode == "resume" else 0),
        out=out, stages=[Stage("head", 1, "head", lr=1e-2),
                         Stage("top2", 4, 2, lr=1e-2, lr_mult=0.1, bn="train")],
        augment="light",
    )
    h = hashlib.sha256()
    for k, v in sorted(res.net.state_dict().items()):
        h.update(k.encode()); h.update(v.contiguous().numpy().tobytes())
    rows = [{{k: v for k, v in r.items() if k not in ("seconds", "img_per_s")}}
            for r in res.history]
    print(json.dumps({{"digest": h.hexdigest(), "history": rows, "best": res.best_epoch}}))
    """
).format(tests=str(TESTS))


def _env() -> dict[str, str]:
    return {**os.environ, "TRANSFERLAB_QUIET": "1", "OMP_NUM_THREADS": "1"}


def _run(script: Path, root: Path, out: Path, mode: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(script), str(root), str(out), mode],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    root = tmp_path / "data"
    full = _run(script, root, tmp_path / "full", "plain")

    cut = tmp_path / "cut"
    last = cut / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(root), str(cut), "slow"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    deadline = time.monotonic() + 240
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"run ended before the kill: {err[-2000:]!r}"
    state = load_checkpoint(last)["state"]
    assert 1 <= state["epoch"] < 5  # killed mid-run, after at least one checkpoint

    resumed = _run(script, root, cut, "resume")
    assert resumed == full
