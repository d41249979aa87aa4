"""A throwaway single-node Slurm cluster for the tests: Debian's `slurm-wlm` and `munge` packages (installed
by `make install-test`), a `slurm.conf` in a temporary folder (SlurmUser root, `proctrack/linuxproc`,
`task/none`, one node named by this machine's short hostname with two CPUs, its own ports, its own munge
socket and key), and `munged`, `slurmctld` and `slurmd` started as root; stopped by their process ids and
removed at the end. Commands reach it through SLURM_CONF (`env()`)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from app.processes import free_port

PARTITION = "tuneboard"
URGENT = "urgent"  # a partition whose jobs preempt (cancel) the other's
CPUS = 2


def installed() -> bool:
    return all(shutil.which(p) for p in ("munged", "slurmctld", "slurmd", "sbatch"))


class SlurmCluster:
    def __init__(self) -> None:
        if not installed():
            raise RuntimeError("Slurm is not installed: make install-test installs it (apt slurm-wlm munge)")
        if os.geteuid() != 0:
            raise RuntimeError("the test cluster's daemons run as root (SlurmUser root)")
        self.folder = Path(tempfile.mkdtemp(prefix="tuneboard-slurm-"))
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.folder / "slurm.conf"
        self.socket = self.folder / "munge" / "munge.socket"
        self.processes: list[tuple[str, Path]] = []  # (daemon, its pid file)

    def env(self) -> dict[str, str]:
        """What a process needs to talk to this cluster (sbatch, squeue, scancel, scontrol)."""
        return {"SLURM_CONF": str(self.conf)}

    def _write_conf(self) -> None:
        f = self.folder
        settings = {
            "ClusterName": "tuneboard-test",
            "SlurmctldHost": self.node,
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "SlurmctldPort": str(free_port()),
            "SlurmdPort": str(free_port()),
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={self.socket}",
            "StateSaveLocation": str(f / "state"),
            "SlurmdSpoolDir": str(f / "spool"),
            "SlurmctldPidFile": str(f / "slurmctld.pid"),
            "SlurmdPidFile": str(f / "slurmd.pid"),
            "SlurmctldLogFile": str(f / "slurmctld.log"),
            "SlurmdLogFile": str(f / "slurmd.log"),
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "ReturnToService": "2",
            "SchedulerType": "sched/builtin",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_CPU",
            "MpiDefault": "none",
            "JobCompType": "jobcomp/none",
            "AccountingStorageType": "accounting_storage/none",
            "MinJobAge": "600",  # a finished job stays visible to squeue for ten minutes
            "KillWait": "5",
            "PreemptType": "preempt/partition_prio",
            "PreemptMode": "CANCEL",
        }
        lines = [f"{key}={value}" for key, value in settings.items()]
        lines += [
            f"NodeName={self.node} CPUs={CPUS} State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1",
            f"PartitionName={URGENT} Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF",
        ]
        self.conf.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def start(self) -> SlurmCluster:
        for name in ("state", "spool", "munge"):
            (self.folder / name).mkdir(mode=0o700)
        key = self.folder / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self._write_conf()
        munge = self.folder / "munge"
        self._daemon(
            "munged",
            [
                "munged",
                f"--socket={self.socket}",
                f"--key-file={key}",
                f"--pid-file={munge / 'munged.pid'}",
                f"--log-file={munge / 'munged.log'}",
                f"--seed-file={munge / 'seed'}",
                "--force",
            ],
            munge / "munged.pid",
        )
        self._daemon("slurmctld", ["slurmctld"], self.folder / "slurmctld.pid")
        self._daemon("slurmd", ["slurmd"], self.folder / "slurmd.pid")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            answer = self.run("sinfo", "-h", "-o", "%t", check=False)
            if answer.returncode == 0 and answer.stdout.strip() == "idle":
                return self
            time.sleep(0.3)
        raise RuntimeError(f"the test cluster's node did not come up:\n{self.logs()}")

    def _daemon(self, name: str, command: list[str], pid_file: Path) -> None:
        env = os.environ | self.env()
        subprocess.run(command, check=True, capture_output=True, timeout=30, env=env, cwd=self.folder)
        self.processes.append((name, pid_file))

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=30,
            env=os.environ | self.env(),
            check=check,
            cwd=self.folder,  # a job submitted from here writes its output here
        )

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in (self.folder / "slurmctld.log", self.folder / "slurmd.log")
            if p.is_file()
        )

    def stop(self) -> None:
        """Cancel what is still queued or running, stop the daemons by their own process ids (slurmd first),
        then remove the folder."""
        try:
            if self.processes:
                for partition in (PARTITION, URGENT):
                    self.run("scancel", "--full", "--partition", partition, check=False)
            for _, pid_file in reversed(self.processes):
                try:
                    pid = int(pid_file.read_text().strip())
                except (OSError, ValueError):
                    continue
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
                for _ in range(100):
                    try:
                        os.kill(pid, 0)
                    except ProcessLookupError:
                        break
                    time.sleep(0.05)
                else:
                    os.kill(pid, signal.SIGKILL)
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
