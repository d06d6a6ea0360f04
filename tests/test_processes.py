"""Sharded calibration: `accelerate launch --multi_gpu --num_processes 2 -m treeopt calibrate` splits the
shards between two processes and merges them into the same files as one process. On a machine without
GPUs the processes run on the CPU (gloo); accelerate's own `--cpu` flag would start one process, or
ask for MPI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from treeopt.calibrate.run import SHARDS, TIMING, CalibrationConfig, calibrate
from treeopt.decoding.heads import random_heads
from treeopt.decoding.models import load_model
from treeopt.core.record import ACCURACY, CONTINUATIONS, META, RANKS

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.process]


def files(directory):
    meta = json.loads((directory / META).read_text())
    return {f: (directory / f).read_bytes() for f in (RANKS, ACCURACY, CONTINUATIONS)} | {
        META: {k: v for k, v in meta.items() if k not in TIMING}}


def test_two_processes_equal_one(tmp_path, tiny_model_dir):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": " ".join(f"w{(5 * i + j) % 90 + 3}" for j in range(2 + i % 4))})
                               + "\n" for i in range(7)))
    loaded = load_model(str(tiny_model_dir), device="cpu")
    heads = random_heads(loaded.model, num_heads=3, seed=1, scale=0.3).save(tmp_path / "heads")
    args = {"model": str(tiny_model_dir), "heads": str(heads), "prompts": str(prompts), "max_new_tokens": 8,
            "top_k": 20, "batch_size": 2, "shard_size": 2, "device": "cpu"}
    one = calibrate(CalibrationConfig(out=tmp_path / "one", progress=False, **args), loaded=loaded)

    cli = [f"--{k.replace('_', '-')}={v}" for k, v in args.items() if k != "device"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "-m", "treeopt", "calibrate", "--quiet", *cli, "--output-dir", str(tmp_path / "two")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    shards = [json.loads(p.read_text()) for p in sorted((tmp_path / "two" / SHARDS).glob("*.done.json"))]
    assert [s["process"] for s in shards] == [0, 1, 0, 1]  # 7 prompts in shards of 2, dealt out in turn
    assert files(tmp_path / "two") == files(one)
