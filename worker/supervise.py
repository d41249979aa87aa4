"""Run one claimed run: write its run.yaml, start a fresh training process (through `accelerate launch`
when the run trains in several), heartbeat while it works, pass on a cancel (politely, then SIGTERM, then
SIGKILL), and record how it ended.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from app import workers
from app.config import Settings
from app.db import PASSING_FAULTS, Database
from app.model_registry import find_model, removed_model
from app.models import WITH_ADAPTER, Run, RunStatus
from app.processes import Backoff, Child, describe_exit, free_port, signal_group, stop_process
from app.runs import state
from app.runs.config import RunConfig
from app.runs.folder import RunFolder
from worker.child import beating
from worker.hardware import usable_cores, visible_gpus
from worker.prepare import prepare_model
from worker.remote import ArtifactSync, Server, ServerError
from worker.sink import say_phase
from worker.train import write_config
from worker.warm import start as warm_start

log = logging.getLogger("tuneboard.worker")
# How long a run asked to stop gets to stop by itself (it saves its adapter first) before SIGTERM, and then
# before SIGKILL
CANCEL_GRACE_SECONDS = 30.0


def training_env(settings: Settings, processes: int = 1, *, gpus: bool = False) -> dict[str, str]:
    """The training processes' environment: CPU threads set explicitly (TUNEBOARD_TORCH_THREADS, else the
    cores this worker may use shared among the run's processes; `accelerate launch` would otherwise leave
    each one), and on a machine without GPUs, several processes train data parallel on the CPU (gloo)."""
    threads = str(settings.torch_threads or max(1, usable_cores() // processes))
    env = dict(os.environ, PYTHONUNBUFFERED="1", TUNEBOARD_TORCH_THREADS=threads, OMP_NUM_THREADS=threads)
    if processes > 1 and not gpus:
        env["ACCELERATE_USE_CPU"] = "1"  # else each CPU process would train alone on every row
    return env


def processes_for(settings: Settings, gpus: int) -> int:
    """A run that asked for GPUs gets one process per GPU; any other TUNEBOARD_NUM_PROCESSES."""
    return gpus or settings.num_processes


# FSDP for a model one GPU cannot hold: each decoder layer sharded over the run's GPUs (FSDP2), the adapter's
# parameters trained as they are, and whole (not sharded) weights saved, so that the adapter is PEFT's usual
# files and a checkpoint resumes on any number of GPUs.
FSDP = [
    "--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
    "--fsdp_reshard_after_forward", "true", "--fsdp_state_dict_type", "FULL_STATE_DICT",
    "--fsdp_cpu_ram_efficient_loading", "true",
]  # fmt: skip


def trainer_args(settings: Settings, run_yaml: Path, attempt: int) -> list[str]:
    """The trainer's own arguments (`python -m worker.train` ARGS, or a warm start's)."""
    return [str(run_yaml), "--attempt", str(attempt), "--stale-after", str(settings.stale_after_seconds / 2)]


def launch_command(
    settings: Settings, run_yaml: Path, attempt: int, *, gpus: int = 0, distributed: str = "ddp"
) -> list[str]:
    """The training command. One process (a laptop, one GPU) runs the trainer directly: one interpreter,
    no launcher. Several (the GPUs the run asked for, else TUNEBOARD_NUM_PROCESSES) go through
    `accelerate launch`, data parallel or, with `distributed="fsdp"`, sharded."""
    training = ["-m", "worker.train", *trainer_args(settings, run_yaml, attempt)]
    processes = processes_for(settings, gpus)
    if processes == 1:
        return [sys.executable, *training]
    accelerate = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", str(processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        *(FSDP if distributed == "fsdp" else ["--multi_gpu"]),  # accelerate takes one of the two
        "--main_process_port", str(free_port()),
    ]  # fmt: skip
    return [*accelerate, *training]


def oom_kills() -> int | None:
    """How many processes the kernel's out-of-memory killer has stopped: this container's cgroup (v2 or
    v1) when it says, else the whole machine's count; None when none of them can be read."""
    for path, prefix in (
        ("/sys/fs/cgroup/memory.events", "oom_kill "),
        ("/sys/fs/cgroup/memory/memory.oom_control", "oom_kill "),
        ("/proc/vmstat", "oom_kill "),
    ):
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(prefix):
                    return int(line.split()[1])
        except (OSError, ValueError):
            continue
    return None


OUT_OF_MEMORY = (
    "The operating system stopped the training process because the machine ran out of memory. Lower "
    "the batch size or max length, turn on gradient checkpointing, or choose a smaller model."
)
KILLED = (
    "The training process was killed from outside Tuneboard (SIGKILL), most often by the operating "
    "system's out-of-memory killer. If the machine was short of memory, lower the batch size or max "
    "length, or turn on gradient checkpointing."
)


def explain_kill(code: int, log_tail: str, oom_before: int | None, oom_after: int | None) -> str | None:
    """A sentence for a training process that was killed rather than failing by itself, or None.
    (`accelerate launch` reports its child's SIGKILL in the log and exits 1 itself.)"""
    killed = code == -signal.SIGKILL or "Signals.SIGKILL" in log_tail or "exit status -9" in log_tail
    if code == 0 or not killed:
        return None
    if oom_before is not None and oom_after is not None and oom_after > oom_before:
        return OUT_OF_MEMORY
    return KILLED


def write_with_retry(db: Database, write, *, attempts: int = 8) -> None:
    """`write(session)` in a write transaction, retried with backoff through passing database faults: a
    run's final status must not be lost to a busy database."""
    backoff = Backoff()
    for attempt in range(attempts):
        try:
            with db.write_session() as session:
                write(session)
            return
        except PASSING_FAULTS as exc:
            if attempt == attempts - 1:
                raise
            delay = backoff.next()
            log.warning("database busy (%s); writing again in %.0f s", exc, delay)
            time.sleep(delay)


def prepare_run_folder(
    settings: Settings, run: Run, model_folder: Path | None = None, server: Server | None = None
) -> RunFolder:
    """The run's folder on this machine with its run.yaml: the model's folder (and the adapter it starts
    from) as this machine has them and, for a worker without the web server's disk (`server`), the dataset
    rows, that adapter and the checkpoints fetched from the server, and a fresh log (each attempt's log is
    sent on; the server keeps them all)."""
    folder = settings.run_folder(run.id)
    folder.path.mkdir(parents=True, exist_ok=True)
    config = RunConfig.model_validate(run.config)
    update: dict = {"run_id": run.id, "output_dir": str(folder.path), "database_url": settings.sqlalchemy_url}
    if model_folder is not None:
        update["model_path"] = str(model_folder)
    if config.start_run_id is not None:  # the adapter this run continues, where this machine holds it
        if server is not None:
            server.fetch_adapter(config.start_run_id, 0)
        update["start_adapter"] = str(settings.run_folder(config.start_run_id).adapter)
    if server is not None:
        update["dataset_path"] = str(server.dataset_rows(config.dataset_id))
        if config.evaluation_path and config.evaluation.dataset_id is not None:
            update["evaluation_path"] = str(server.dataset_rows(config.evaluation.dataset_id))
        steps = server.fetch_checkpoints(run.id, folder)
        log.info(
            "run %d: %s from the web server", run.id, f"checkpoints {steps}" if steps else "no checkpoint"
        )
        folder.log.unlink(missing_ok=True)
    write_config(config.model_copy(update=update), folder.config)
    return folder


def fail(db: Database, run: Run, me: str, problem: str) -> str:
    write_with_retry(
        db,
        lambda session: state.finish(
            session=session, run_id=run.id, worker_id=me, status=RunStatus.FAILED, error=problem
        ),
    )
    return RunStatus.FAILED


def supervise(
    settings: Settings,
    db: Database,
    run: Run,
    *,
    me: str,
    stop: threading.Event,
    server: Server | None = None,
) -> str:
    """Run `run` to its end. Returns the final status, or "requeued" when this worker is stopping. Raises
    ServerError after handing the run back when the web server cannot be reached (the worker loop waits)."""
    with run_beating(settings, db, run.id, me):  # converting the model and fetching files may take minutes
        say_phase(db, run.id, "Preparing: the base model and the run's files")
        problem, model_folder = ensure_model(settings, db, run, me=me, stop=stop, remote=server is not None)
        if problem and stop.is_set():  # the worker is stopping (a scheduler's warning): not the run's fault
            write_with_retry(db, lambda session: state.requeue(session=session, run_id=run.id, worker_id=me))
            log.info("run %d handed back to the queue while its model was being prepared", run.id)
            return "requeued"
        if problem:
            return fail(db, run, me, problem)
        try:
            folder = prepare_run_folder(settings, run, model_folder, server)
        except ServerError as exc:
            if exc.lasting:  # refused, or unreadable: asking again will not help
                return fail(db, run, me, f"The run's files could not be fetched from the web server. {exc}")
            write_with_retry(db, lambda session: state.requeue(session=session, run_id=run.id, worker_id=me))
            log.warning("run %d handed back to the queue: %s", run.id, exc)
            raise
    sync = ArtifactSync(server, run.id, folder) if server is not None else None
    try:
        return _attempt(settings, db, run, folder, me=me, stop=stop, sync=sync)
    finally:
        if sync is not None:
            sync.stop()


def run_beating(settings: Settings, db: Database, run_id: int, me: str):
    """The run's heartbeat from a thread while the worker itself is busy with it (converting its model,
    moving its files), so that nobody takes it for lost."""

    def beat() -> None:
        try:
            with db.write_session() as session:
                state.heartbeat(session=session, run_id=run_id, worker_id=me)
        except state.TransitionError:
            pass  # lost: the caller finds out by itself
        except PASSING_FAULTS:
            pass  # a busy database: the next beat tries again

    return beating(beat, settings.heartbeat_seconds, name=f"beat-run-{run_id}")


def _attempt(
    settings: Settings,
    db: Database,
    run: Run,
    folder: RunFolder,
    *,
    me: str,
    stop: threading.Event,
    sync: ArtifactSync | None,
) -> str:
    env = training_env(settings, processes_for(settings, run.gpus), gpus=bool(visible_gpus()))
    distributed = str(run.config.get("distributed", "ddp"))
    command = launch_command(settings, folder.config, run.attempts, gpus=run.gpus, distributed=distributed)
    log.info("run %d attempt %d: %s", run.id, run.attempts, " ".join(command))
    say_phase(db, run.id, "Starting the training process")
    oom_before = oom_kills()
    alone = processes_for(settings, run.gpus) == 1
    warm_args = trainer_args(settings, folder.config, run.attempts) if alone else None
    child = start_training(command, env, folder.log, f"attempt {run.attempts} by {me}", warm_args)
    try:
        return _watch(settings, db, run, folder, child, oom_before, me=me, stop=stop, sync=sync)
    except (
        BaseException
    ):  # a fault the loop does not pass over: the worker stops, and so does its run's process
        stop_process(child, CANCEL_GRACE_SECONDS, group=True)
        raise


def _watch(
    settings: Settings,
    db: Database,
    run: Run,
    folder: RunFolder,
    child: Child,
    oom_before: int | None,
    *,
    me: str,
    stop: threading.Event,
    sync: ArtifactSync | None,
) -> str:
    """Heartbeat the run while its training process works, pass on a cancel, and record how it ended."""
    cancel_since = terminate_since = None
    lost = False
    while child.poll() is None:
        if stop.wait(settings.heartbeat_seconds):
            stop_process(child, CANCEL_GRACE_SECONDS, group=True)
            _close_sync(sync, adapter=False)
            write_with_retry(db, lambda session: state.requeue(session=session, run_id=run.id, worker_id=me))
            log.info("run %d handed back to the queue (worker stopping)", run.id)
            return "requeued"
        try:
            with db.write_session() as session:
                cancel = state.heartbeat(session=session, run_id=run.id, worker_id=me)
                orders = workers.beat(session=session, worker_id=me, status="training", run_id=run.id)
            if orders.stop:
                log.info(
                    "run %d: stopping, as the Workers page asked; the run goes back to the queue", run.id
                )
                stop.set()  # handled at the top of the loop: SIGTERM, send what is left, requeue
        except state.TransitionError:
            lost = True  # requeued behind our back (we were too slow to heartbeat): stop our copy
            cancel = True
        except PASSING_FAULTS as exc:  # a busy database: the next heartbeat will do
            log.warning("run %d: heartbeat skipped (%s)", run.id, exc)
            cancel = False
        now = time.monotonic()
        if cancel and cancel_since is None:
            cancel_since = now  # the trainer sees the flag itself and saves the adapter
        if cancel_since is not None and terminate_since is None and now - cancel_since > CANCEL_GRACE_SECONDS:
            log.warning("run %d did not stop within %.0f s; sending SIGTERM", run.id, CANCEL_GRACE_SECONDS)
            signal_group(child, signal.SIGTERM)
            terminate_since = now
        if terminate_since is not None and now - terminate_since > CANCEL_GRACE_SECONDS:
            signal_group(child, signal.SIGKILL)
    code = child.wait()
    if lost:
        _close_sync(sync, adapter=False)
        return "lost"
    with db.session() as session:
        current = session.get(Run, run.id, populate_existing=True)
        cancelled = current is not None and current.cancel_requested
    error = None
    if cancelled:
        status = RunStatus.CANCELLED
    elif code == 0:
        status = RunStatus.SUCCEEDED
    else:
        status = RunStatus.FAILED
        log_tail = folder.tail(15)
        if (explained := folder.read_error()) is not None:
            error = explained
        elif killed := explain_kill(code, log_tail, oom_before, oom_kills()):
            error = killed
        else:
            error = (
                f"The training process ended unexpectedly ({describe_exit(code)}). Last lines of its log:\n"
            )
            error += log_tail
    if sync is not None:
        try:
            with run_beating(settings, db, run.id, me):
                sync.close(adapter=status in WITH_ADAPTER)
        except ServerError as exc:
            status, error = (
                RunStatus.FAILED,
                f"The run trained, but its files could not be sent to the web server: {exc}",
            )
    write_with_retry(
        db,
        lambda session: state.finish(
            session=session, run_id=run.id, worker_id=me, status=status, error=error, exit_code=code
        ),
    )
    log.info("run %d %s (%s)", run.id, status, describe_exit(code))
    return status


def start_training(
    command: list[str], env: dict[str, str], log_path: Path, heading: str, warm_args: list[str] | None
) -> Child:
    """The training process, in a session of its own, its output appended to the run's log under a heading
    for the attempt: forked warm with `warm_args` when one process trains (worker.warm), else `command` in
    a new interpreter (`accelerate launch` and its processes)."""
    with open(log_path, "ab") as out:
        out.write(f"--- {heading} ---\n".encode())
    warm = warm_start(warm_args, env, log_path) if warm_args is not None else None
    if warm is not None:
        log.info("training process %d forked warm", warm.pid)
        return warm
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def ensure_model(
    settings: Settings, db: Database, run: Run, *, me: str = "", stop: threading.Event, remote: bool = False
) -> tuple[str | None, Path | None]:
    """Convert the run's base model first if it still is a GGUF file; a worker without the web server's
    disk (`remote`) fetches a model named owner/name it lacks from its hub. Returns why it cannot be used,
    or the folder this machine loads it from."""
    with db.session() as session:
        model = find_model(settings, run.base_model, session=session)
    if model is None and remote and "/" in run.base_model:
        from worker.download import fetch_for_run

        say_phase(db, run.id, f"Fetching {run.base_model} to this worker")
        return fetch_for_run(
            settings, db, run.id, run.base_model, str(run.config.get("model_path", "")), me=me, stop=stop
        )
    if model is None:
        return removed_model(run.base_model), None
    if model.status == "preparing":
        log.info("run %d: preparing %s first", run.id, model.id)
        say_phase(db, run.id, f"Converting {model.name} to train it (once; about a minute for a small model)")
        reason = prepare_model(model, stop=stop)
        if reason:
            return reason, None
    elif model.status != "ready":
        return f"{model.name} cannot be used: {model.error}", None
    return None, model.folder


def _close_sync(sync: ArtifactSync | None, *, adapter: bool) -> None:
    """Send what an attempt being handed on left (its log, its checkpoints), if the server takes it."""
    if sync is None:
        return
    try:
        sync.close(adapter=adapter, tries=2)
    except ServerError as exc:
        log.warning("the run's last files could not be sent: %s", exc)
