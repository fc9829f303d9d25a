"""The SLURM job scripts in tools/slurm/, run for real on CPU.

Each script runs under bash as sbatch would start it (the batch environment: SLURM_JOB_ID,
SLURM_JOB_NODELIST, SLURM_NNODES, SLURM_SUBMIT_DIR), with stand-ins from tests/slurm_shim/ on PATH:
`srun` starts the step's tasks as local processes with the variables real srun sets for each task,
`scontrol` expands host lists and records requeues, `module` records loads. The launch line is the
script's own, training a tiny model with 2 gloo ranks; a second run of the script is the requeued job,
which must resume where the first stopped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import data
from _dist_util import free_port

ROOT = Path(__file__).resolve().parent.parent
SHIM = Path(__file__).resolve().parent / "slurm_shim"
TINY_RUN = ["--model", "vit_tiny", "--img-size", "32", "--decoder-embed-dim", "32", "--decoder-depth", "1",
            "--decoder-num-heads", "4", "--batch-size", "4", "--warmup-steps", "1", "--workers", "0", "--threads", "1", "--log-every", "1"]


@pytest.fixture(scope="module")
def chips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chips")
    data.make_demo_chips(str(folder), n=32, size=32, bands=4)
    return str(folder)


def batch_env(tmp_path, out, chips, restart=0, **extra):
    """The environment sbatch gives the batch script, plus the script's own parameters."""
    env = dict(os.environ)
    env.update(
        PATH=f"{SHIM}{os.pathsep}{env['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="localhost",
        SLURM_NNODES="1", SLURM_SUBMIT_DIR=str(ROOT), SLURM_RESTART_COUNT=str(restart),
        VENV=sys.prefix, MASTER_PORT=str(free_port()), FAKE_SLURM_REQUEUED=str(tmp_path / "requeued"),
        FAKE_MODULE_LOG=str(tmp_path / "modules"), MODEL="vit_tiny", STRATEGY="full_shard", SHARD_GROUP_SIZE="",
        DATA=chips, OUT=str(out), SOCKET_IFNAME="lo",  # no Slingshot NIC here
        MIOPEN_USER_DB_PATH=str(tmp_path / "miopen"),  # made by each task (in /tmp of each node on Frontier)
    )
    env.update(extra)
    return env


def logged_steps(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("script, per_node", [("frontier.sbatch", "GCDS_PER_NODE"), ("generic_cuda.sbatch", "GPUS_PER_NODE")])
def test_job_script_runs_and_its_requeue_resumes(script, per_node, chips, tmp_path):
    out = tmp_path / "run"
    command = ["bash", str(ROOT / "tools" / "slurm" / script), *TINY_RUN, "--steps", "6", "--max-steps-per-run", "3"]
    first = subprocess.run(command, env=batch_env(tmp_path, out, chips, **{per_node: "2"}), timeout=300)
    log = (out / "slurm-4242.out").read_text()
    assert first.returncode == 0, log
    assert (out / "latest").read_text().strip() == "step-3" and not (out / "step-6").exists()
    assert "world size 2" in log and "srun exited 0" in log
    assert not (tmp_path / "requeued").exists()  # stopped by --max-steps-per-run, not by the time limit

    second = subprocess.run(command, env=batch_env(tmp_path, out, chips, restart=1, **{per_node: "2"}), timeout=300)
    log = (out / "slurm-4242.out").read_text()
    assert second.returncode == 0, log
    assert (out / "step-6").is_dir() and (out / "latest").read_text().strip() == "step-6"
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6]  # the second run continued at step 4
    assert "(restart 1)" in log
    if script == "frontier.sbatch":
        assert (tmp_path / "modules").read_text().count("module load rocm/") == 2
        assert (tmp_path / "miopen").is_dir()


def test_time_limit_signal_saves_and_requeues(chips, tmp_path):
    """USR1 to the batch script (--signal=B:USR1@180): the tasks stop at a step with a checkpoint,
    srun exits 0 and the script requeues the job."""
    out = tmp_path / "run"
    command = ["bash", str(ROOT / "tools" / "slurm" / "frontier.sbatch"), *TINY_RUN, "--steps", "100000",
               "--ckpt-every", "0"]
    job = subprocess.Popen(command, env=batch_env(tmp_path, out, chips, GCDS_PER_NODE="2"))
    try:
        metrics, deadline = out / "metrics.jsonl", time.monotonic() + 300  # a hang guard, not a budget
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):  # training is under way
            assert job.poll() is None, (out / "slurm-4242.out").read_text()
            assert time.monotonic() < deadline, "the job never started training"
            time.sleep(0.2)
        job.send_signal(signal.SIGUSR1)
        assert job.wait(timeout=120) == 0, (out / "slurm-4242.out").read_text()
    finally:
        if job.poll() is None:
            job.kill()
    assert (tmp_path / "requeued").read_text() == "4242\n"
    saved = (out / "latest").read_text().strip()
    assert saved == f"step-{logged_steps(out)[-1]}"
    assert "time limit near" in (out / "slurm-4242.out").read_text()
