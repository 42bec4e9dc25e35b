"""The HPC peer of the benchmark: a private single-node Slurm, timed with ``srun``.

    .venv/bin/python -m bench --peers hpc        # with the rest
    .venv/bin/python -m bench.slurm [--jobs 100] [--burst 100]

Debian's slurm-wlm and munge (``apt-get install slurm-wlm munge``). Nothing
system-wide is used or changed: the bench generates a munge key, writes a
slurm.conf with free ports of its own, state and spool directories in a temp
dir, starts munged, slurmctld and slurmd in the foreground as its children
and stops them (and any slurmstepd they left) at the end. The node has the
machine's cores (``select/cons_tres``, ``CR_CPU``: one job per core at once),
``proctrack/linuxproc``, ``task/none``, no accounting: the lightest Slurm;
``sched/builtin`` with ``batch_sched_delay=0,sched_min_interval=0`` (with the
defaults, queued jobs started in steps of 3 s on the development machine;
with these, steps of about 1 s remain).

Measured: ``srun /bin/echo "Hello Grid!"`` one at a time (wall time of the
``srun`` process: allocation, step launch, output back to the submitter) and
a burst of ``srun`` processes started together (``--burst``, fewer than the
others: each is a process and a job). Unlike the other contenders, nothing is
zipped: output comes back on srun's stdout. If Slurm cannot be set up,
:class:`SlurmUnavailable` says why. Not part of the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

CPUS = os.cpu_count() or 1
ECHO = ["/bin/echo", "Hello Grid!"]


class SlurmUnavailable(RuntimeError):
    """Slurm could not be set up here; the message says why."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _memory_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 1024


class Slurm:
    """munged + slurmctld + slurmd of our own, in a temp dir."""

    def __init__(self) -> None:
        missing = [p for p in ("munged", "mungekey", "slurmctld", "slurmd", "srun") if not shutil.which(p)]
        if missing:
            raise SlurmUnavailable(f"not installed: {', '.join(missing)} (apt-get install slurm-wlm munge)")
        self.dir = Path(tempfile.mkdtemp(prefix="slurm-bench-", dir="/tmp"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.conf = self.dir / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def _write(self) -> None:
        d = self.dir
        for sub in ("munge", "state", "spool", "log"):
            (d / sub).mkdir(mode=0o700)
        subprocess.run(["mungekey", "--create", "--keyfile", str(d / "munge" / "munge.key")], check=True)
        os.chmod(d / "munge" / "munge.key", 0o400)
        host = socket.gethostname().split(".")[0]
        ctl_port, node_port = _free_port(), _free_port()
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=carodbench",
                    f"SlurmctldHost={host}(127.0.0.1)",
                    f"SlurmctldPort={ctl_port}",
                    f"SlurmdPort={node_port}",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={d}/munge/munge.socket",
                    f"StateSaveLocation={d}/state",
                    f"SlurmdSpoolDir={d}/spool",
                    f"SlurmctldPidFile={d}/slurmctld.pid",
                    f"SlurmdPidFile={d}/slurmd.pid",
                    f"SlurmctldLogFile={d}/log/slurmctld.log",
                    f"SlurmdLogFile={d}/log/slurmd.log",
                    "SlurmctldDebug=error",
                    "SlurmdDebug=error",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "JobCompType=jobcomp/none",
                    "SwitchType=switch/none",
                    "MpiDefault=none",
                    "SchedulerType=sched/builtin",
                    "SchedulerParameters=batch_sched_delay=0,sched_min_interval=0",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU",
                    "ReturnToService=2",
                    "MaxJobCount=100000",
                    "MinJobAge=2",
                    "InactiveLimit=0",
                    "KillWait=5",
                    f"NodeName=benchnode NodeHostname={host} NodeAddr=127.0.0.1 CPUs={CPUS} "
                    f"RealMemory={max(1, _memory_mib() - 512)} State=UNKNOWN",
                    "PartitionName=bench Nodes=benchnode Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
                    "",
                ]
            )
        )

    def _spawn(self, argv: list[str], log: str) -> subprocess.Popen[bytes]:
        out = open(self.dir / "log" / log, "wb")  # noqa: SIM115 - kept open for the child's lifetime
        proc = subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        self.procs.append(proc)
        return proc

    @staticmethod
    def _name(proc: subprocess.Popen[bytes]) -> str:
        return str(proc.args[0]) if isinstance(proc.args, list) else str(proc.args)

    def _log_tail(self) -> str:
        lines: list[str] = []
        for log in sorted((self.dir / "log").glob("*")):
            text = log.read_text(errors="replace").strip().splitlines()[-3:]
            lines += [f"{log.name}: {line}" for line in text]
        return "\n".join(lines)

    def start(self, timeout_s: float = 60) -> None:
        try:
            self._write()
        except (OSError, subprocess.CalledProcessError) as exc:
            raise SlurmUnavailable(f"could not write the munge key or slurm.conf: {exc}") from exc
        d = self.dir / "munge"
        self._spawn(
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={d}/munge.socket",
                f"--key-file={d}/munge.key",
                f"--pid-file={d}/munged.pid",
                f"--log-file={d}/munged.log",
                f"--seed-file={d}/munged.seed",
            ],
            "munged.out",
        )
        self._wait_for(lambda: (d / "munge.socket").exists(), timeout_s, "munged did not create its socket")
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld.out")
        self._spawn(["slurmd", "-D", "-N", "benchnode", "-f", str(self.conf)], "slurmd.out")
        self._wait_for(self._node_idle, timeout_s, "the node did not become idle")

    def _node_idle(self) -> bool:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True, check=False, timeout=10
        )
        return out.returncode == 0 and out.stdout.strip().rstrip("*") == "idle"

    def _wait_for(self, ready: Any, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            dead = [self._name(p) for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                reason = f"{', '.join(dead)} exited" if dead else f"after {timeout_s:.0f} s"
                raise SlurmUnavailable(f"{what} ({reason}):\n{self._log_tail()}")
            time.sleep(0.2)

    def srun(self) -> float:
        t0 = time.perf_counter()
        out = subprocess.run(["srun", "-n1", *ECHO], env=self.env, capture_output=True, check=False, timeout=120)
        if out.returncode != 0 or out.stdout != b"Hello Grid!\n":
            raise RuntimeError(f"srun failed ({out.returncode}): {out.stderr.decode(errors='replace')[-300:]}")
        return time.perf_counter() - t0

    def burst(self, n: int) -> float:
        t0 = time.perf_counter()
        procs = [
            subprocess.Popen(["srun", "-n1", *ECHO], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(n)
        ]
        failed = 0
        for p in procs:
            out, _ = p.communicate(timeout=600)
            failed += p.returncode != 0 or out != b"Hello Grid!\n"
        elapsed = time.perf_counter() - t0
        if failed:
            raise RuntimeError(f"{failed} of {n} srun in the burst failed")
        return n / elapsed

    def stop(self) -> list[str]:
        """Stop everything started here; returns what had to be killed (should be empty)."""
        killed: list[str] = []
        for p in reversed(self.procs):  # slurmd, slurmctld, then munged (they authenticate through it)
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                killed.append(self._name(p))
        killed += self._kill_stray_steps()
        shutil.rmtree(self.dir, ignore_errors=True)
        return killed

    def _kill_stray_steps(self) -> list[str]:
        """slurmstepd processes of our slurmd (they carry our SLURM_CONF) still alive."""
        mark = f"SLURM_CONF={self.conf}".encode()
        killed = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if mark in (proc / "environ").read_bytes().split(b"\0"):
                    os.kill(int(proc.name), signal.SIGKILL)
                    killed.append((proc / "comm").read_text().strip())
            except (OSError, ValueError):
                continue
        return killed


def run(jobs: int, burst: int) -> dict[str, Any]:
    """Latency of ``jobs`` sequential srun (after 5 of warm-up) and a burst of ``burst``. Raises SlurmUnavailable."""
    slurm = Slurm()
    try:
        slurm.start()
        for _ in range(5):
            slurm.srun()
        lat = sorted(slurm.srun() for _ in range(jobs))
        rate = slurm.burst(burst)
    finally:
        left = slurm.stop()
    if left:
        print(f"slurm: had to kill {', '.join(left)} at the end")
    return {
        "name": "slurm",
        "p50_ms": statistics.median(lat) * 1e3,
        "p99_ms": lat[int(0.99 * (len(lat) - 1))] * 1e3,
        "throughput_jobs_s": rate,
        "burst": burst,
        "latencies_ms": [x * 1e3 for x in lat],
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m bench.slurm")
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--burst", type=int, default=100)
    args = ap.parse_args()
    try:
        row = run(args.jobs, args.burst)
    except SlurmUnavailable as exc:
        raise SystemExit(f"slurm: skipped: {exc}") from None
    row.pop("latencies_ms")
    print(json.dumps(row))
