"""Several processes, one run: the chain under torchrun with the gloo backend on CPU.

The 2-process runs here are real `torchrun` launches (`d3n pipeline --nproc 2`, `torchrun -m
d3n.cli train baseline`) on the micro dataset; they are compared with the single-process
`micro_pipeline` of the same config.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from d3n import distributed
from d3n.artifacts import MANIFEST, read_json, write_json
from d3n.cli import main

pytestmark = pytest.mark.timeout(600)

TRAINED = ("baseline", "teacher", "distill")


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_torchrun_command_one_node_and_several():
    one = distributed.torchrun_command(["pipeline", "c.yaml"], 2)
    assert one[1:4] == ["-m", "torch.distributed.run", "--nproc-per-node"] and "--standalone" in one
    assert one[-4:] == ["-m", "d3n.cli", "pipeline", "c.yaml"]
    two = distributed.torchrun_command(["pipeline", "c.yaml"], 4, nnodes=2, node_rank=1, rdzv_endpoint="h:29400")
    assert "--standalone" not in two
    assert two[two.index("--nnodes") + 1] == "2" and two[two.index("--node-rank") + 1] == "1"
    assert two[two.index("--rdzv-endpoint") + 1] == "h:29400"
    with pytest.raises(ValueError, match="rdzv-endpoint"):
        distributed.torchrun_command(["pipeline", "c.yaml"], 2, nnodes=2)


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "world", lambda: distributed.World(rank=1, size=2))
    with pytest.raises(RuntimeError, match=r"x\.json: rank 1 of 2 .* only rank 0 writes"):
        write_json(tmp_path / "x.json", {})
    assert not list(tmp_path.iterdir())  # nothing half-written either


def test_pipeline_on_two_processes(micro_pipeline, micro_config, tmp_path):
    """`d3n pipeline --nproc 2`: every stage completes, the training stages ran on both processes
    (batch split in two, the same optimiser steps per epoch as one process), the DDPM's losses are
    the single-process ones (each rank's half of every batch, gradients averaged)."""
    _, single = micro_pipeline
    cfg = tmp_path / "micro.yaml"
    cfg.write_text(yaml.safe_dump({**micro_config, "out": str(tmp_path / "run")}))
    assert main(["pipeline", str(cfg), "--nproc", "2"]) == 0
    out = tmp_path / "run"
    for stage in ("data", "ddpm", "repo", "resvae", "compress", *TRAINED, "export"):
        assert read_json(out / stage / MANIFEST)["complete"], stage
    for stage in TRAINED:
        opt = read_json(out / stage / "metrics.json")["optimizer"]
        assert (opt["processes"], opt["batch_per_process"]) == (2, micro_config["train"]["batch"] // 2)
        two, one = _rows(out / stage / "results.csv"), _rows(single / stage / "results.csv")
        assert [r["steps"] for r in two] == [r["steps"] for r in one]
        assert "processes" not in read_json(single / stage / "metrics.json")["optimizer"]
    for split in ("train", "val", "test"):  # the repository's shards shared out between the two
        assert read_json(out / "repo" / split / "metrics.json")["processes"] == 2
    ddpm2, ddpm1 = read_json(out / "ddpm" / "metrics.json"), read_json(single / "ddpm" / "metrics.json")
    assert ddpm2["loss_curve"] == pytest.approx(ddpm1["loss_curve"], rel=1e-4)
    leftovers = [p.name for p in out.rglob("*.tmp")]
    assert not leftovers


def test_killed_two_process_run_resumes_on_one(synth_small, tmp_path):
    """A baseline killed under torchrun (2 processes, mid-run) resumes with 1 process from its
    last state: a training state does not depend on the number of processes."""
    out = tmp_path / "baseline"
    args = ["train", "baseline", "--data", str(synth_small), "--out", str(out), "--imgsz", "64",
            "--epochs", "8", "--batch", "4", "--workers", "0", "--optimizer", "AdamW"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(distributed.torchrun_command(args, 2), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "last_state.pt"
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    # a crash: torchrun and its workers (which run in sessions of their own) all killed at once
    import psutil

    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in tree:
        p.kill()
    psutil.wait_procs(tree, timeout=30)
    proc.wait()
    assert state.exists(), "the 2-process run saved no state before it ended"
    done = len(_rows(out / "results.csv"))
    assert done < 8, "the run finished before it could be killed"
    assert main(args) == 0  # one process now
    rows = _rows(out / "results.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(1, 9))
    assert read_json(out / MANIFEST)["complete"]
    assert "processes" not in read_json(out / "metrics.json")["optimizer"]


def test_repository_shards_shared_out_between_processes(micro_pipeline, tmp_path):
    """`torchrun -m d3n.cli repo build` on 2 processes, small shards: each rank extracts every other
    shard, rank 0 writes them; the features are the single-process build's (noise seeded per image)."""
    import numpy as np

    from d3n.train.repository.store import FeatureStore

    _, single = micro_pipeline
    out = tmp_path / "repo"
    args = ["repo", "build", "--ddpm", str(single / "ddpm"), "--data", str(single / "data" / "dataset"),
            "--out", str(out), "--shard-size", "3"]
    done = subprocess.run(distributed.torchrun_command(args, 2), env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    two, one = FeatureStore.open(out), FeatureStore.open(single / "repo" / "train")
    assert read_json(out / "metrics.json")["processes"] == 2 and len(two._shards) == 4
    assert two.image_ids == one.image_ids
    for iid in one.image_ids:
        for lv in one.levels:
            np.testing.assert_allclose(two.get(iid)[lv].astype(np.float32), one.get(iid)[lv].astype(np.float32),
                                       rtol=1e-2, atol=1e-3)


def test_batch_must_split_evenly(synth_small, tmp_path):
    from d3n.errors import ConfigError
    from d3n.train.detector.loop import TrainConfig, per_rank_batch

    assert per_rank_batch(TrainConfig(batch=16), distributed.World(0, 2)) == 8
    with pytest.raises(ConfigError, match="batch 15 .* 2 processes"):
        per_rank_batch(TrainConfig(batch=15), distributed.World(0, 2))


def test_nproc_inside_torchrun_is_refused(micro_config, tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "micro.yaml"
    cfg.write_text(yaml.safe_dump({**micro_config, "out": str(tmp_path / "run")}))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed, "init_from_env", lambda: distributed.World())
    assert main(["pipeline", str(cfg), "--nproc", "2"]) != 0
    assert "inside a torchrun launch" in capsys.readouterr().err
    assert sys.modules.get("torch.distributed") is None or not sys.modules["torch.distributed"].is_initialized()


def test_a_hung_rank_times_out_except_while_rank_zero_works_alone(tmp_path):
    """With a 5 s collective timeout: a rank 12 s late passes the long barrier (the others waiting
    for rank 0's single-process stage), and makes the plain one (a gradient all-reduce's) fail on
    rank 0. A first long barrier lines the ranks up after their imports."""
    script = tmp_path / "late.py"
    script.write_text(
        "import sys, time\n"
        "from d3n import distributed\n"
        "w = distributed.init_from_env()\n"
        "distributed.barrier(long=True)\n"
        "if w.rank == 1: time.sleep(12)\n"
        "distributed.barrier(long=True)\n"
        "print(f'long ok {w.rank}', flush=True)\n"
        "if w.rank == 1: time.sleep(12)\n"
        "try:\n"
        "    distributed.barrier()\n"
        "except Exception as exc:\n"
        "    print(f'timed out {w.rank}: {type(exc).__name__}', flush=True)\n"
        "    sys.exit(3)\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", str(script)]
    env = {**os.environ, "D3N_COLLECTIVE_TIMEOUT": "5", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert "long ok 0" in done.stdout and "long ok 1" in done.stdout, done.stdout + done.stderr
    assert "timed out 0" in done.stdout and done.returncode != 0


@pytest.mark.parametrize("raw", ["soon", "0", "-5"])
def test_a_bad_collective_timeout_is_named(raw, monkeypatch):
    from d3n.errors import ConfigError

    monkeypatch.setenv("D3N_COLLECTIVE_TIMEOUT", raw)
    with pytest.raises(ConfigError, match="D3N_COLLECTIVE_TIMEOUT"):
        distributed.collective_timeout()
