"""Slurm, through its own commands: `sbatch` submits a run's batch script, `squeue` says what became of the
jobs, `scancel` cancels one. Every command is a list of arguments (no shell); the script is written from
the provider's checked settings (app.providers.config) and the run's number, nothing else; secrets reach
the job through the environment sbatch passes on, never the script's text.

The script starts a one-shot worker for exactly that run (`tuneboard worker --run N`), in place of the
batch shell (`exec`), so that the warning Slurm sends before the time limit (`--signal=B:TERM@…`) reaches
it: it stops the training process and hands the run back, and the dispatcher sends it to a new job, which
resumes from the last checkpoint the web server received.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from app.providers.config import SlurmProvider

TIMEOUT = 30.0  # seconds a command may take (a busy controller answers slowly)
# the states after which a job does nothing more (Slurm's names)
ENDED = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "REVOKED",
    "TIMEOUT",
    "GONE",  # no longer known to the controller at all
}
# the ends that are failures of the job itself, not interruptions (a time limit, a preemption, a cancel)
FAILURES = {"BOOT_FAIL", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY"}
# variables of the web server's environment a job's worker gets too (no secrets: those are named)
PASSED_ON = (
    *("PATH", "LANG", "LC_ALL", "HOME", "SLURM_CONF"),
    *("HF_ENDPOINT", "HF_HUB_OFFLINE", "MODELSCOPE_ENDPOINT"),
)


class SlurmError(Exception):
    """A command of Slurm's failed: `unreachable` when the controller did not answer (try again later),
    else it refused (a bad partition, a quota)."""

    def __init__(self, message: str, *, unreachable: bool) -> None:
        super().__init__(message)
        self.unreachable = unreachable


@dataclass(frozen=True)
class JobState:
    state: str  # PENDING, RUNNING, COMPLETED, PREEMPTED… (GONE: the controller no longer knows it)
    reason: str | None  # why it waits or ended (Resources, Priority, TimeLimit…)
    node: str | None

    @property
    def ended(self) -> bool:
        return self.state in ENDED


def log_file(log_folder: Path, run_id: int, job_id: str) -> Path:
    return log_folder / f"run-{run_id}-{job_id}.out"


def script(provider: SlurmProvider, run_id: int, log_folder: Path, name: str) -> str:
    """The batch script for one run: its #SBATCH options, the provider's setup lines, then the worker."""
    options = [
        f"--job-name={name}",
        f"--output={log_file(log_folder, run_id, '%j')}",
        f"--signal=B:TERM@{provider.warning_seconds}",
        "--no-requeue",  # Tuneboard sends a run that lost its job to a new one itself
    ]
    named = {
        "partition": provider.partition,
        "account": provider.account,
        "qos": provider.qos,
        "time": provider.time_limit,
        "gres": provider.gres,
        "mem": provider.memory,
    }
    options += [f"--{key}={value}" for key, value in named.items() if value]
    if provider.gpus is not None:
        options.append(f"--gpus={provider.gpus}")
    if provider.cpus_per_task is not None:
        options.append(f"--cpus-per-task={provider.cpus_per_task}")
    options += provider.sbatch_options
    worker = [provider.python or sys.executable, "-m", "app.cli", "worker", "--run", str(run_id)]
    lines = [
        "#!/bin/bash",
        *(f"#SBATCH {option}" for option in options),
        "# Written by Tuneboard for one run: its worker takes this run only, then exits.",
        "set -e",
        "umask 077",  # what the worker writes (the run's settings hold the database's address) is its own
        *provider.setup,
        'export TUNEBOARD_DATA_DIR="${TMPDIR:-/tmp}/tuneboard-slurm-${SLURM_JOB_ID}"',
        f"exec {shlex.join(worker)}",
    ]
    return "\n".join(lines) + "\n"


def job_environment(provider: SlurmProvider | None, worker_env: dict[str, str]) -> dict[str, str]:
    """The environment sbatch runs with, and passes on to the job: a few of the server's own variables,
    the worker's settings (its web server, database and token) and the provider's extra variables."""
    passed = {name: os.environ[name] for name in PASSED_ON if name in os.environ}
    return passed | worker_env | (provider.environment if provider else {})


def _run(command: list[str], env: dict[str, str] | None = None) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=env, check=False)
    except FileNotFoundError:
        raise SlurmError(
            f"{command[0]} is not installed on the machine of this web server: Tuneboard submits to Slurm "
            "with Slurm's own commands (the slurm-client package).",
            unreachable=True,
        ) from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{command[0]} did not answer within {TIMEOUT:.0f} s.", unreachable=True) from None
    if done.returncode != 0:
        said = _said(done.stderr or done.stdout)
        unreachable = any(
            words in said.lower()
            for words in ("unable to contact", "connection refused", "timed out", "communication", "no route")
        )
        raise SlurmError(said or f"{command[0]} failed with code {done.returncode}", unreachable=unreachable)
    return done.stdout


def _said(output: str) -> str:
    """Slurm's own sentence from an error output: its last 'error:' line, without the command's name."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    last = (errors or lines or [""])[-1]
    return last.split("error:", 1)[-1].strip()[:300]


def job_folder(provider: SlurmProvider, folder: Path) -> Path:
    """Where a run's jobs start and write their logs: the provider's job folder, else the run's folder."""
    return Path(provider.job_folder) if provider.job_folder else folder


def submit(script_text: str, folder: Path, env: dict[str, str], chdir: Path) -> str:
    """Submit a batch script (written to `folder`) to start in `chdir`; the job's id. SlurmError when
    Slurm refuses it or does not answer."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "job.sh"
    path.write_text(script_text, encoding="utf-8")
    answer = _run(["sbatch", "--parsable", f"--chdir={chdir}", "--export=ALL", str(path)], env=env)
    job_id = answer.strip().split(";")[0]
    if not job_id.isdigit():
        raise SlurmError(f"sbatch answered {answer.strip()[:200]!r} instead of a job id", unreachable=False)
    return job_id


def poll(job_ids: list[str], env: dict[str, str] | None = None) -> dict[str, JobState]:
    """What became of these jobs, asked of the controller in one call."""
    if not job_ids:
        return {}
    try:
        answer = _run(
            ["squeue", "--noheader", "--states=all", "--format=%i|%T|%r|%N", f"--jobs={','.join(job_ids)}"],
            env=env,
        )
    except SlurmError as exc:
        if "invalid job id" not in str(exc).lower():
            raise
        answer = ""  # none of them is known any more
    found: dict[str, JobState] = {}
    for line in answer.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 4 or parts[0] not in job_ids:
            continue
        job_id, state, reason, node = parts
        state = state.split()[0].upper()
        found[job_id] = JobState(
            state=state,
            reason=None if reason in ("None", "(null)", "") else reason,
            node=node or None if node not in ("(null)", "n/a") else None,
        )
    return {job_id: found.get(job_id, JobState("GONE", None, None)) for job_id in job_ids}


def find(name: str, env: dict[str, str] | None = None) -> str | None:
    """The id of a job of this name still waiting or running, if the controller has one."""
    answer = _run(
        [
            "squeue",
            "--noheader",
            "--format=%i",
            f"--name={name}",
            "--states=PENDING,RUNNING,CONFIGURING,SUSPENDED",
        ],
        env=env,
    )
    ids = [line.strip() for line in answer.splitlines() if line.strip().isdigit()]
    return ids[0] if ids else None


def cancel(job_id: str, env: dict[str, str] | None = None) -> None:
    """Cancel a job (a pending one leaves the queue; a running one is stopped)."""
    try:
        _run(["scancel", job_id], env=env)
    except SlurmError as exc:
        if "invalid job id" not in str(exc).lower():  # it has gone already
            raise
