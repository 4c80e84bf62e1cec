"""scripts/slurm_train.sh: the srun/torchrun command lines it renders (DRY_RUN=1), read back by
torchrun's own argument parser, and its time-limit path (checkpoint, then requeue) against fake
SLURM commands on PATH."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from torch.distributed.launcher.api import LaunchConfig
from torch.distributed.run import get_args_parser

from fastsiam.config import load_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm_train.sh"
DEFAULT_CONFIG = "configs/simsiam_resnet50_8xb32-coslr-100e_in1k.yaml"
JOB_ID = "771234"

# scontrol: the node list expanded as SLURM does, one host per line; any other call is logged.
# srun: logs its argv one word a line and, unless FAKE_SRUN_EXIT says to exit at once, runs
# until SIGTERM, then exits FAKE_SRUN_TERM_EXIT: 1, as torchrun does once a signal stopped it
# (its workers having checkpointed), or 0 for a training that finished as the signal came.
# scancel: logs and sends SIGTERM to that srun, as `scancel --signal=TERM <job>` does to a
# job's steps.
FAKES = {
    "scontrol": """#!/bin/sh
if [ "$1" = show ] && [ "$2" = hostnames ]; then printf 'gpu-a07\\ngpu-a08\\n'; exit 0; fi
echo "scontrol $*" >> "$FAKE_DIR/calls"
""",
    "srun": """#!/bin/sh
printf '%s\\n' "$@" > "$FAKE_DIR/srun.argv"
echo srun >> "$FAKE_DIR/calls"
if [ -n "$FAKE_SRUN_EXIT" ]; then exit "$FAKE_SRUN_EXIT"; fi
trap 'echo "srun: TERM" >> "$FAKE_DIR/calls"; exit "${FAKE_SRUN_TERM_EXIT:-1}"' TERM
echo $$ > "$FAKE_DIR/srun.pid"
while :; do sleep 0.02; done
""",
    "scancel": """#!/bin/sh
echo "scancel $*" >> "$FAKE_DIR/calls"
kill -TERM "$(cat "$FAKE_DIR/srun.pid")"
""",
}


@pytest.fixture
def fake_slurm(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A bare environment as sbatch gives the batch shell, with the fake SLURM commands first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKES.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    yield {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_DIR": str(tmp_path),
        "SLURM_JOB_ID": JOB_ID,
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "gpu-a[07-08]",
        "VENV": sys.prefix,  # the environment running this test has torch's torchrun
    }
    # a script that failed to stop its srun must not leave the fake running after the test
    # (only while that pid is still the fake: a finished one's pid may belong to another process)
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        pid = int((tmp_path / "srun.pid").read_text())
        if str(bin_dir / "srun") in Path(f"/proc/{pid}/cmdline").read_text():
            os.kill(pid, signal.SIGKILL)


def run_script(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=30)


def dry_run(env: dict[str, str], *args: str, cwd: Path) -> tuple[dict[str, str], list[str]]:
    """The exported variables and the srun command line the script prints with DRY_RUN=1."""
    done = run_script({**env, "DRY_RUN": "1"}, *args, cwd=cwd)
    assert done.returncode == 0, done.stderr
    *exports, command = done.stdout.strip().splitlines()
    exported = dict(shlex.split(line)[1].split("=", 1) for line in exports)
    return exported, shlex.split(command)


def torchrun_args(tokens: list[str]) -> tuple[list[str], argparse.Namespace]:
    """srun's own options, and what torchrun's argument parser makes of the rest."""
    at = tokens.index("torchrun")
    return tokens[:at], get_args_parser().parse_args(tokens[at + 1:])


def sbatch_header() -> dict[str, str]:
    options = {}
    for line in SCRIPT.read_text().splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line.removeprefix("#SBATCH --").partition("=")
            options[key] = value
    return options


def test_script_parses_as_bash() -> None:
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_dry_run_renders_one_torchrun_per_node_at_a_c10d_rendezvous(fake_slurm: dict[str, str]) -> None:
    exported, tokens = dry_run(fake_slurm, "data.batch_size=64", cwd=REPO)
    srun, args = torchrun_args(tokens)
    assert srun == ["srun", "--nodes", "2", "--ntasks-per-node", "1", "--kill-on-bad-exit=1"]
    assert (args.nnodes, args.nproc_per_node) == ("2", "8")
    assert (args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id) == ("c10d", "gpu-a07:29500", JOB_ID)
    assert args.max_restarts == 3
    assert args.module and args.training_script == "fastsiam"
    assert args.training_script_args == ["train", "--config", DEFAULT_CONFIG, "--resume", "auto",
                                         "data.batch_size=64"]
    # every round its own store: what fastsiam.dist._attempt_store's docstring counts on
    assert exported["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    cfg = load_config(REPO / DEFAULT_CONFIG, ["data.batch_size=64"])
    assert cfg.data.batch_size == 64 and cfg.model.backbone == "resnet50"


def test_settings_come_from_the_environment(fake_slurm: dict[str, str]) -> None:
    env = {**fake_slurm, "CONFIG": "configs/simsiam_resnet18_toy-demo.yaml", "GPUS_PER_NODE": "4",
           "RDZV_PORT": "29611", "MAX_RESTARTS": "0", "SHUTDOWN_TIMEOUT": "90",
           "SLURM_CPUS_PER_TASK": "32", "SLURM_NNODES": "3"}
    exported, tokens = dry_run(env, "--max-steps", "100", "optim.lr=0.1", cwd=REPO)
    srun, args = torchrun_args(tokens)
    assert srun[-2:] == ["--cpus-per-task", "32"] and srun[1:3] == ["--nodes", "3"]
    assert (args.nnodes, args.nproc_per_node, args.rdzv_endpoint, args.max_restarts) == ("3", "4", "gpu-a07:29611", 0)
    assert args.training_script_args[2] == "configs/simsiam_resnet18_toy-demo.yaml"
    assert args.training_script_args[-3:] == ["--max-steps", "100", "optim.lr=0.1"]
    assert exported["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "90"


def test_slurm_gpu_count_is_the_default(fake_slurm: dict[str, str]) -> None:
    _, args = torchrun_args(dry_run({**fake_slurm, "SLURM_GPUS_ON_NODE": "4"}, cwd=REPO)[1])
    assert args.nproc_per_node == "4"


def test_time_limit_signal_leaves_torchrun_time_to_checkpoint(fake_slurm: dict[str, str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    header = sbatch_header()
    assert header["ntasks-per-node"] == "1" and "requeue" in header
    assert header["open-mode"] == "append"  # a requeued job appends to the same log
    sig, _, lead = header["signal"].partition("@")
    assert sig == "B:USR1"  # to the batch shell only: its trap forwards SIGTERM, then requeues
    exported, _ = dry_run(fake_slurm, cwd=REPO)
    shutdown = int(exported["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"])
    assert shutdown + 30 <= int(lead)  # torchrun's grace ends before the time limit, with room to requeue
    if "shutdown_timeout" in {f.name for f in dataclasses.fields(LaunchConfig)}:  # torch >= 2.12
        # the variable the script exports is the one torchrun reads
        monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(shutdown))
        assert LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=1).shutdown_timeout == shutdown


def test_missing_config_is_a_one_line_error(fake_slurm: dict[str, str]) -> None:
    done = run_script({**fake_slurm, "CONFIG": "configs/nope.yaml", "DRY_RUN": "1"}, cwd=REPO)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "slurm_train.sh: error: CONFIG=configs/nope.yaml: no such file (run from the repository root or set CONFIG)\n"


def test_outside_slurm_it_refuses(fake_slurm: dict[str, str]) -> None:
    env = {k: v for k, v in fake_slurm.items() if k != "SLURM_JOB_NODELIST"}
    done = run_script(env, cwd=REPO)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("slurm_train.sh: error: SLURM_JOB_NODELIST is not set")


@pytest.mark.parametrize(("srun_exit", "requeued"), [(1, True), (0, False)],
                         ids=["stopped-requeued", "finished-not-requeued"])
def test_time_limit_stops_the_workers_then_requeues(fake_slurm: dict[str, str], tmp_path: Path,
                                                    srun_exit: int, requeued: bool) -> None:
    _, expected = dry_run(fake_slurm, "data.batch_size=64", cwd=REPO)
    fake_slurm = {**fake_slurm, "FAKE_SRUN_TERM_EXIT": str(srun_exit)}
    log = tmp_path / "job.out"  # a file, not a pipe: a fake srun left running would hold a pipe open
    with log.open("w") as out:
        proc = subprocess.Popen(["bash", str(SCRIPT), "data.batch_size=64"], env=fake_slurm, cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT)
    pid_file = tmp_path / "srun.pid"
    deadline = time.monotonic() + 20
    while not pid_file.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pid_file.exists(), log.read_text()
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@... sends before the time limit
    try:
        proc.wait(timeout=10)
    finally:
        proc.kill()
    assert proc.returncode == 0, log.read_text()
    assert "time limit near" in log.read_text()
    calls = (tmp_path / "calls").read_text().splitlines()
    # the workers are stopped (and checkpoint) before the job goes back to the queue
    stopped = ["srun", f"scancel --signal=TERM {JOB_ID}", "srun: TERM"]
    assert calls == stopped + [f"scontrol requeue {JOB_ID}"] * requeued
    # what ran is exactly what DRY_RUN printed
    assert ["srun", *(tmp_path / "srun.argv").read_text().splitlines()] == expected


def test_a_failed_run_keeps_its_status_and_is_not_requeued(fake_slurm: dict[str, str], tmp_path: Path) -> None:
    done = run_script({**fake_slurm, "FAKE_SRUN_EXIT": "3"}, cwd=REPO)
    assert done.returncode == 3
    assert (tmp_path / "calls").read_text().splitlines() == ["srun"]
