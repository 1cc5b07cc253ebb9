"""A throw-away single-machine Slurm cluster for tests (and for trying the sbatch scripts by hand).

Everything lives in one directory: a private munge key, socket and daemon, a ``slurm.conf`` for
this host (its real short hostname, CPUs/RealMemory as reported by ``slurmd -C``,
``select/cons_tres``), state/spool/log directories and free TCP ports, so it never touches a
system Slurm or munge that may already run on the machine. Client commands find it through the
``SLURM_CONF`` variable in :attr:`SlurmCluster.env`.

Usage::

    if why := slurm_unavailable(): pytest.skip(why)
    with SlurmCluster(tmp_path / "slurm") as cl:
        jid = cl.sbatch(["--ntasks=2", "job.sbatch"])
        cl.wait_state(jid, {"COMPLETED"}, timeout=120)

By hand: ``python tests/slurm_env.py start /tmp/slurm`` prints ``export SLURM_CONF=...``;
``python tests/slurm_env.py stop /tmp/slurm`` stops the daemons again.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from promoe_ds.parallel.launch import free_port

SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")
# Terminal job states (scontrol's JobState); a requeued job passes through REQUEUED -> PENDING.
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


def which(name: str) -> str | None:
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(SBIN_DIRS)
    return shutil.which(name, path=path)


def _missing() -> list[str]:
    return [n for n in DAEMONS + CLIENTS if which(n) is None]


def ensure_installed(timeout: float = 900) -> str | None:
    """Install ``slurm-wlm`` and ``munge`` with apt-get if any binary is missing.

    Returns None when everything is there, else a one-line reason why it could not be installed.
    """
    if not _missing():
        return None
    apt = shutil.which("apt-get")
    if apt is None:
        return f"Slurm binaries missing ({', '.join(_missing())}) and no apt-get to install slurm-wlm"
    prefix: list[str] = []
    if os.geteuid() != 0:
        sudo = shutil.which("sudo")
        if sudo is None or subprocess.run([sudo, "-n", "true"], capture_output=True).returncode != 0:
            return "Slurm binaries missing and not root (no password-less sudo) to apt-get install slurm-wlm"
        prefix = [sudo, "-n", "env", "DEBIAN_FRONTEND=noninteractive"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in ([apt, "update", "-qq"],
                [apt, "install", "-y", "-qq", "--no-install-recommends", "slurm-wlm", "munge"]):
        r = subprocess.run(prefix + cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
            return f"`{' '.join(cmd[:2])}` failed (rc {r.returncode}): {' | '.join(tail)}"
    if _missing():
        return f"apt-get installed slurm-wlm but still missing: {', '.join(_missing())}"
    return None


def slurm_unavailable() -> str | None:
    """Reason a local Slurm cannot be run here (None = it can)."""
    why = ensure_installed()
    if why is None and os.geteuid() != 0:
        why = "slurmd must run as root to launch job steps (run the test as root, e.g. in CI)"
    return why


def _node_line() -> dict[str, str]:
    """``slurmd -C``: this machine's NodeName/CPUs/Sockets/Cores/Threads/RealMemory."""
    out = subprocess.run([which("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    first = out.strip().splitlines()[0]
    return dict(kv.split("=", 1) for kv in first.split())


class SlurmError(RuntimeError):
    pass


class SlurmCluster:
    """munged + slurmctld + slurmd on localhost, all state under ``root``."""

    def __init__(self, root: str | os.PathLike, cluster_name: str = "promoetest"):
        self.root = Path(root).resolve()
        self.cluster_name = cluster_name
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.logs = self.root / "log"
        self.pids: dict[str, Path] = {
            "munged": self.root / "run" / "munged.pid",
            "slurmctld": self.root / "run" / "slurmctld.pid",
            "slurmd": self.root / "run" / "slurmd.pid",
        }
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for k in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if k != "SLURM_CONF":
                del self.env[k]  # a test run inside a Slurm job must not leak that job's settings
        self.env["PATH"] = os.pathsep.join([self.env.get("PATH", ""), *SBIN_DIRS])
        self.node: dict[str, str] = {}
        self.partition = "debug"

    # ------------------------------------------------------------------ setup
    def write_config(self) -> None:
        for d in ("etc", "munge", "run", "log", "state", "spool"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.node = _node_line()
        node = self.node
        # slurmd -C reports the short hostname slurmd will register under; use it verbatim.
        hostname = node["NodeName"]
        ctld_port, slurmd_port = free_port(), free_port()
        r = self.root
        lines = f"""\
# generated by tests/slurm_env.py: a one-node test cluster, all state under {r}
ClusterName={self.cluster_name}
SlurmctldHost={hostname}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={self.pids['slurmctld']}
SlurmdPidFile={self.pids['slurmd']}
SlurmctldLogFile={self.logs}/slurmctld.log
SlurmdLogFile={self.logs}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=30
InactiveLimit=0
SlurmctldTimeout=60
SlurmdTimeout=120
MessageTimeout=20
NodeName={hostname} NodeAddr=127.0.0.1 CPUs={node['CPUs']} Boards={node.get('Boards', 1)} \
SocketsPerBoard={node.get('SocketsPerBoard', 1)} CoresPerSocket={node.get('CoresPerSocket', node['CPUs'])} \
ThreadsPerCore={node.get('ThreadsPerCore', 1)} RealMemory={node['RealMemory']} State=UNKNOWN
PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        self.conf.write_text(lines)
        # An empty cgroup.conf keeps slurmd from reading the system one (cgroups are not used).
        (self.conf.parent / "cgroup.conf").write_text("")

    def _run(self, cmd: list[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} -> rc {r.returncode}: {r.stderr.strip() or r.stdout.strip()}")
        return r

    def start(self, timeout: float = 60) -> SlurmCluster:
        self.write_config()
        m = self.root / "munge"
        self._run([which("munged"), "--force", f"--socket={self.munge_socket}",
                   f"--key-file={m / 'munge.key'}", f"--pid-file={self.pids['munged']}",
                   f"--log-file={self.logs / 'munged.log'}", f"--seed-file={m / 'munged.seed'}"])
        self._wait_pidfile("munged")
        # -c: start from a clean state (the state dir is fresh anyway); -i: ignore unreadable state.
        self._run([which("slurmctld"), "-c", "-i", "-f", str(self.conf)])
        self._wait_pidfile("slurmctld")
        self._run([which("slurmd"), "-f", str(self.conf)])
        self._wait_pidfile("slurmd")
        self.wait_node_idle(timeout)
        return self

    def _wait_pidfile(self, name: str, timeout: float = 20) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            pid = self._pid(name)
            if pid:
                return pid
            time.sleep(0.2)
        raise SlurmError(f"{name} did not start (no pid file after {timeout}s)\n{self.log_tail(name)}")

    def _pid(self, name: str) -> int | None:
        try:
            pid = int(self.pids[name].read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def wait_node_idle(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            r = self._run([which("sinfo"), "-h", "-N", "-o", "%T"], check=False)
            state = r.stdout.strip().lower()
            if state.startswith("idle"):
                return
            if any(s in state for s in ("drain", "down")) and "*" not in state:
                self._run([which("scontrol"), "update", f"NodeName={self.node['NodeName']}", "State=RESUME"],
                          check=False)
            time.sleep(0.5)
        raise SlurmError(f"node not idle after {timeout}s (state {state!r})\n{self.log_tail('slurmctld')}"
                         f"\n{self.log_tail('slurmd')}")

    def stop(self, timeout: float = 30) -> None:
        """Cancel leftover jobs and stop the three daemons this object started (by their pid files)."""
        if self._pid("slurmctld"):
            self._run([which("scancel"), "--full", "--user", str(os.getuid())], check=False)
            self._run([which("scancel"), "--user", str(os.getuid())], check=False)
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self._pid(name)
            if not pid:
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.time() + timeout
            while time.time() < deadline and self._alive(pid):
                time.sleep(0.2)
            if self._alive(pid):
                os.kill(pid, signal.SIGKILL)
        # Job steps slurmd launched are its grandchildren: kill any slurmstepd still holding our spool.
        for pid in self._stepds():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        try:  # a zombie child counts as gone
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(") ", 1)[1][0] != "Z"
        except OSError:
            return False

    def _stepds(self) -> list[int]:
        """slurmstepd processes whose command line or environment names our config (ours only)."""
        out = []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                cmd = (p / "cmdline").read_bytes()
                if b"slurmstepd" not in cmd:
                    continue
                if str(self.root).encode() in cmd or str(self.conf).encode() in (p / "environ").read_bytes():
                    out.append(int(p.name))
            except OSError:
                continue
        return out

    def __enter__(self) -> SlurmCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ jobs
    def sbatch(self, args: list[str], env: dict | None = None, cwd: str | None = None) -> int:
        r = subprocess.run([which("sbatch"), "--parsable", *args], env={**self.env, **(env or {})},
                           capture_output=True, text=True, cwd=cwd, timeout=60)
        if r.returncode != 0:
            raise SlurmError(f"sbatch {' '.join(args)} -> rc {r.returncode}: {r.stderr.strip()}")
        return int(r.stdout.strip().split(";")[0].split("_")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, Restarts, ExitCode, ...); {} once purged."""
        r = self._run([which("scontrol"), "show", "job", "-o", str(job_id)], check=False)
        if r.returncode != 0 or not r.stdout.strip():
            return {}
        info = {}
        for m in re.finditer(r"(\w[\w:/]*)=(\S*)", r.stdout.strip().splitlines()[0]):
            info.setdefault(m.group(1), m.group(2))
        return info

    def state(self, job_id: int) -> str:
        return self.job_info(job_id).get("JobState", "")

    def wait_state(self, job_id: int, states: set[str], timeout: float, poll: float = 1.0) -> dict[str, str]:
        """Poll until the job reaches one of ``states`` or a finished state; return its info."""
        deadline = time.time() + timeout
        info: dict[str, str] = {}
        while time.time() < deadline:
            info = self.job_info(job_id)
            st = info.get("JobState", "")
            if st in states or st in FINISHED:
                return info
            time.sleep(poll)
        raise SlurmError(f"job {job_id} not in {sorted(states)} after {timeout}s: {info.get('JobState')} "
                         f"({info.get('Reason')})")

    def node_state(self) -> str:
        return self._run([which("sinfo"), "-h", "-N", "-o", "%T"], check=False).stdout.strip().lower()

    def release_requeued(self, job_id: int, timeout: float = 60, **updates: str) -> dict[str, str]:
        """Start a requeued job now instead of after Slurm's fixed 120 s requeue delay (BeginTime).

        Waits until the job is PENDING again and the node has no completing job left (starting it
        while the node still holds the previous run's revoked credential kills it), then sets
        StartTime=now plus any other ``scontrol update`` fields given (e.g. TimeLimit="30").
        """
        deadline = time.time() + timeout
        info = self.job_info(job_id)
        while time.time() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState") == "PENDING" and self.node_state().startswith("idle"):
                break
            time.sleep(0.5)
        else:
            raise SlurmError(f"job {job_id} not pending on an idle node after {timeout}s: "
                             f"{info.get('JobState')} / node {self.node_state()}")
        time.sleep(2)  # let slurmd forget the previous run's credential
        fields = [f"{k}={v}" for k, v in updates.items()]
        self._run([which("scontrol"), "update", f"JobId={job_id}", "StartTime=now", *fields])
        return info

    def scontrol(self, *args: str, check: bool = True) -> str:
        return self._run([which("scontrol"), *args], check=check).stdout

    def scancel(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return self._run([which("scancel"), *args], check=False, timeout=timeout)

    def log_tail(self, name: str, lines: int = 30) -> str:
        p = self.logs / f"{name}.log"
        if not p.exists():
            return f"[{p} missing]"
        return f"--- {p} (tail) ---\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:])


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: python tests/slurm_env.py start|stop DIR", file=sys.stderr)
        return 2
    cl = SlurmCluster(argv[1])
    if argv[0] == "start":
        why = slurm_unavailable()
        if why:
            print(f"cannot start Slurm: {why}", file=sys.stderr)
            return 1
        cl.start()
        print(f"export SLURM_CONF={cl.conf}")
        print(f"export PATH=$PATH:{':'.join(SBIN_DIRS)}")
    else:
        if not cl.conf.exists():
            print(f"no cluster under {cl.root}", file=sys.stderr)
            return 1
        cl.stop()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
