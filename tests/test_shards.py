"""Sharded feature extraction (engine.shards) and the ``extract`` command.

Two CPU processes started by Lightning Fabric's ddp_spawn must leave the same features in the
cache as one process computes, each distinct image computed exactly once across the ranks.
"""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import TINY_BACKBONE, make_image
from transferlab.backbones import at_input_size, create_backbone
from transferlab.cache import FeatureCache
from transferlab.cli import app
from transferlab.config import FitConfig
from transferlab.data.images import file_digest
from transferlab.engine.shards import _unshared_cache, extract_sharded, shard_slice, unique_images
from transferlab.extract import FeatureExtractor


@pytest.fixture(scope="module")
def tiny_backbone():
    torch.manual_seed(0)
    bb = create_backbone(TINY_BACKBONE, pretrained=False)
    # 64 px instead of 224: the same code paths at a twelfth of the compute
    return bb.replace(preprocess=dataclasses.replace(bb.preprocess, input_size=(64, 64)))


def _images(root, n: int) -> tuple[list[str], list[str]]:
    paths = [str(make_image(root / f"img{i:02d}.jpg", (48 + 8 * i, 40), seed=i)) for i in range(n)]
    return paths, [file_digest(p) for p in paths]


def test_shard_slices_cover_every_item_once():
    for n in (0, 1, 5, 17):
        for world in (1, 2, 3, 8):
            got = [i for r in range(world) for i in range(n)[shard_slice(n, r, world)]]
            assert got == list(range(n))
            sizes = [len(range(n)[shard_slice(n, r, world)]) for r in range(world)]
            assert max(sizes) - min(sizes) <= 1


def test_unique_images_keeps_one_path_per_digest_in_digest_order():
    paths, digests = unique_images(["b", "a", "c", "d"], ["22", "22", "11", "33"])
    assert digests == ["11", "22", "33"]
    assert paths == ["c", "a", "d"]  # "a" before "b": the first in path order wins


@pytest.mark.slow
def test_two_processes_give_the_features_of_one(tmp_path, tiny_backbone, monkeypatch):
    monkeypatch.setenv("TRANSFERLAB_QUIET", "1")
    paths, digests = _images(tmp_path / "data", 9)
    copy = tmp_path / "data" / "copy_of_img03.jpg"
    shutil.copy(paths[3], copy)  # same content twice: computed once
    broken = tmp_path / "data" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    paths += [str(copy), str(broken)]
    digests += [digests[3], file_digest(broken)]

    shared = FeatureCache(tmp_path / "shared-cache")
    ex = FeatureExtractor(tiny_backbone, cache=shared, engine="torch", workers=0, batch_size=4)
    cfg = FitConfig(accelerator="cpu", devices=2, dist_strategy="ddp_spawn")
    report = extract_sharded(ex, paths, digests, cfg)

    assert report.world_size == 2 and report.images == 10  # 11 files, 10 distinct
    assert [r["images"] for r in report.ranks] == [5, 5]
    assert report.computed == 9 and report.cache_hits == 0  # each good image exactly once
    assert sum(r["computed"] for r in report.ranks) == 9
    assert report.failures == [(str(broken), report.failures[0][1])]

    one = FeatureExtractor(tiny_backbone, cache=FeatureCache(tmp_path / "own"), engine="torch")
    alone = one(paths, digests)
    gathered = FeatureExtractor(tiny_backbone, cache=shared, engine="torch", workers=0)
    got = gathered(paths[:-1], digests[:-1])
    assert got.stats["computed"] == 0 and got.stats["cache_hits"] == 10
    np.testing.assert_allclose(got.features, alone.features[:-1], rtol=1e-4, atol=1e-5)

    again = extract_sharded(ex, paths, digests, FitConfig(accelerator="cpu", devices=1))
    assert again.computed == 0 and again.cache_hits == 9 and len(again.failures) == 1


def test_a_cache_the_ranks_do_not_share_is_refused(tmp_path, tiny_backbone):
    ex = FeatureExtractor(tiny_backbone, cache=FeatureCache(tmp_path / "c"), engine="torch")
    ex.store.put_many({"ab" * 32: np.ones(ex.backbone.num_features, np.float32)})
    seen = {"rank": 0, "host": "n0", "written": ["ab" * 32]}
    elsewhere = {"rank": 1, "host": "n1", "written": ["cd" * 32]}  # never reached this cache
    assert _unshared_cache(ex, [seen], 0) is None
    problem = _unshared_cache(ex, [seen, elsewhere], 0)
    assert "rank 1 (n1)" in problem and "every node shares" in problem and "--cache-dir" in problem


def test_extract_command_reports_counts(tiny_dataset, tmp_path):
    args = ["extract", str(tiny_dataset), "--backbone", TINY_BACKBONE, "--no-pretrained"]
    args += ["--engine", "torch", "--workers", "0", "--cache-dir", str(tmp_path / "cache")]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "16 images, 16 distinct: 16 computed, 0 cached, 0 failed, on 1 rank(s)" in first.output
    second = CliRunner().invoke(app, [*args, "--part", "1/2"])
    assert second.exit_code == 0, second.output
    assert "16 images, 8 distinct (part 1/2): 0 computed, 8 cached, 0 failed" in second.output
    wrong = CliRunner().invoke(app, [*args, "--part", "2/2"])
    assert wrong.exit_code != 0 and "--part '2/2'" in str(wrong.exception)


def test_fit_with_two_devices_extracts_on_two_ranks_and_gives_the_same_model(
    tiny_dataset, tmp_path
):
    """``fit --devices 2`` with a pretrained-feature strategy shards the extraction (each image
    once, in two spawned ranks) and then fits the same head as one process."""
    import transferlab
    from conftest import tiny_fit_options

    one = transferlab.fit(tiny_dataset, **tiny_fit_options(tmp_path / "a"), verbose=False)
    two = transferlab.fit(tiny_dataset, devices=2, accelerator="cpu",
                          **tiny_fit_options(tmp_path / "b"), verbose=False)  # fmt: skip
    assert "extract_sharded_s" in two.metrics["timings"]
    assert sum(e["cache_hits"] for e in two.metrics["extraction"]) == 16  # all read back
    assert two.metrics["test"]["accuracy"] == one.metrics["test"]["accuracy"]
    assert two.metrics["val"]["log_loss"] == pytest.approx(one.metrics["val"]["log_loss"], abs=1e-4)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
def test_launched_ranks_leave_the_features_one_process_computes(launcher, tiny_dataset, tmp_path):
    """Every rank runs ``transferlab extract`` and Lightning joins them: started by torchrun
    (``--nproc-per-node 2``) or as srun starts them (two processes with SLURM's variables, as
    docs/cluster.md's job scripts do). The shared cache then answers every image with one
    process's features."""
    import os
    import subprocess
    import sys

    from test_backbones import make_local_dir

    spec = f"local-dir:{make_local_dir(tmp_path / 'weights' / 'tiny')}"
    cache = tmp_path / "cache"
    command = ["-m", "transferlab", "extract", str(tiny_dataset), "--backbone", spec,
               "--accelerator", "cpu", "--devices", "2", "--engine", "torch", "--workers", "0",
               "--cache-dir", str(cache)]  # fmt: skip
    port = str(_free_port())
    if launcher == "torchrun":
        run = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port]
        procs = [subprocess.Popen([sys.executable, *run, *command], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)]  # fmt: skip
    else:
        slurm = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NODEID": "0",
                 "SLURM_JOB_NAME": "extract", "SLURM_JOB_ID": "4242", "SLURM_NODELIST": "localhost",
                 "SLURM_JOB_NUM_NODES": "1", "MASTER_PORT": port}  # fmt: skip
        procs = [
            subprocess.Popen([sys.executable, *command], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, **slurm, "SLURM_PROCID": r, "SLURM_LOCALID": r})
            for r in ("0", "1")
        ]  # fmt: skip
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert "16 images, 16 distinct: 16 computed, 0 cached, 0 failed, on 2 rank(s)" in outputs[0]
    if launcher == "srun":  # each process is one rank of the job, not a launcher of its own
        assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1] and "GLOBAL_RANK: 0" not in outputs[1]

    bb = at_input_size(create_backbone(spec))  # at the size fit uses, as extract computes them
    paths = sorted(str(p) for p in tiny_dataset.rglob("*.jpg"))
    digests = [file_digest(p) for p in paths]
    shared = FeatureExtractor(bb, cache=FeatureCache(cache), engine="torch", workers=0)
    got = shared(paths, digests)
    assert got.stats["computed"] == 0 and got.stats["cache_hits"] == 16
    alone = FeatureExtractor(bb, cache=FeatureCache(tmp_path / "alone"), engine="torch", workers=0)
    np.testing.assert_allclose(got.features, alone(paths, digests).features, atol=1e-5)
