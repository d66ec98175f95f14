"""A real two-node SLURM cluster on 127.0.0.1 for the launcher tests.

Installs Debian's slurm-wlm and munge with apt-get when they are missing (root only), writes a
slurm.conf into a temporary folder, starts its own munged (own socket, so a system munged is left
alone), slurmctld and one ``slurmd -N`` per node, and stops exactly the processes it started.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurm-wlm", "slurmctld", "slurmd", "slurm-client", "munge"]
DAEMONS = ["slurmctld", "slurmd", "munged", "sbatch"]


def ensure_installed() -> str | None:
    """Install SLURM and munge when missing; returns why it cannot, or None."""
    if all(shutil.which(d) or Path(f"/usr/sbin/{d}").exists() for d in DAEMONS):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "slurm-wlm and munge are missing and can only be installed by root with apt-get"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class LocalSlurm:
    def __init__(self, root: Path, nodes: int = 2, cpus_per_node: int = 2):
        self.root = Path(root)
        self.nodes = [f"node{i + 1}" for i in range(nodes)]
        self.cpus = cpus_per_node
        self.procs: list[subprocess.Popen] = []
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # -- configuration ----------------------------------------------------------------------------
    def write_config(self) -> None:
        host = socket.gethostname().split(".")[0]
        r = self.root
        for d in ("state", "munge", "logs", *(f"spool/{n}" for n in self.nodes)):
            (r / d).mkdir(parents=True, exist_ok=True)
        node_lines = [
            f"NodeName={n} NodeAddr=127.0.0.1 NodeHostname={host} Port={_free_port()} "
            f"CPUs={self.cpus} RealMemory=8000 State=UNKNOWN" for n in self.nodes
        ]
        self.conf.write_text("\n".join([
            "ClusterName=gensuite",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/logs/slurmctld.log",
            f"SlurmdLogFile={r}/logs/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "MpiDefault=none",
            "ReturnToService=2",
            "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "InactiveLimit=0",
            "KillWait=10",
            "MinJobAge=600",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "MessageTimeout=20",
            "SchedulerParameters=sched_interval=2",
            *node_lines,
            f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    # -- daemons ----------------------------------------------------------------------------------
    def _spawn(self, argv: list[str], log: str) -> subprocess.Popen:
        out = open(self.root / "logs" / log, "ab")
        proc = subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def start(self, timeout: float = 60) -> LocalSlurm:
        self.write_config()
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._spawn([_sbin("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                     f"--key-file={key}", f"--pid-file={self.root}/munge/munged.pid",
                     f"--log-file={self.root}/logs/munged.log", f"--seed-file={self.root}/munge/seed"],
                    "munged.out")
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged socket")
        self._spawn([_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld.out")
        for node in self.nodes:
            self._spawn([_sbin("slurmd"), "-D", "-N", node, "-f", str(self.conf)], f"slurmd-{node}.out")
        self._wait(self._nodes_idle, timeout, "nodes idle in sinfo")
        return self

    def _nodes_idle(self) -> bool:
        dead = [p.args[0] for p in self.procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{dead[0]} exited; see {self.root}/logs\n{self.logs()}")
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True)
        states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
        return all(states.get(n, "").startswith("idle") for n in self.nodes)

    @staticmethod
    def _wait(predicate, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return
            time.sleep(0.5)
        raise TimeoutError(f"local SLURM: timed out waiting for {what}")

    def logs(self) -> str:
        parts = []
        for f in sorted((self.root / "logs").glob("*")):
            parts.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(parts)

    def cancel_all(self) -> None:
        subprocess.run(["scancel", "--full", "-u", str(os.getuid())], env=self.env, capture_output=True)

    def stop(self) -> None:
        if not self.procs:
            return
        self.cancel_all()
        try:
            self._wait(lambda: not subprocess.run(["squeue", "-h"], env=self.env, capture_output=True,
                                                  text=True).stdout.strip(), 30, "jobs to end")
        except (TimeoutError, OSError):
            pass
        for proc in reversed(self.procs):  # slurmd, slurmctld, then munged
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()
