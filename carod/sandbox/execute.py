"""sandbox -> run -> results: one job's execution on this node, without the broker or the journal.

:class:`Executor` holds what the node decided at start-up (the isolation
layers, the job users) and does, for each job: create its sandbox, unpack
the input, open stdio, check the command, create its cgroup with its limits,
start it, watch its limits, zip its results, and clean everything up. The
node (carod.node) calls these steps in order and journals and answers
between them. Problems the job caused come out as :class:`JobHeld`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from carod import units, unzip
from carod.config import Config
from carod.errors import JobHeld
from carod.holdcodes import HoldCode
from carod.sandbox import cgroup, chirpdir, limits, network
from carod.sandbox import workdir as sandbox
from carod.sandbox.cgroup import CgroupError, JobCgroup
from carod.sandbox.diskquota import DiskQuota, kernel_limit_bytes, limit_slack_bytes
from carod.sandbox.isolation import Layers, job_exec
from carod.sandbox.limits import JobLimits
from carod.sandbox.results import Results, collect_results
from carod.sandbox.runner import JobProcess, check_command, job_environment, kill_leftover, kill_stopped_gates, rlimits
from carod.sandbox.users import JobUser, UserPool
from carod.sandbox.warm import Warm, WarmPool
from carod.sandbox.warm import fields as warm_fields
from carod.sandbox.workdir import Stdio
from carod.wire.jobad import JobSpec, Request
from carod.wire.replies import ExitInfo

log = logging.getLogger("carod.execute")


@dataclass
class Run:
    """One attempt of a job: its user, sandbox, cgroup, limits and process."""

    user: JobUser
    ended: bool = False
    box: Path | None = None
    #: the sandbox's quota group (carod.sandbox.diskquota), when the kernel bounds its disk
    quota_group: int | None = None
    cgroup: JobCgroup | None = None
    limits: JobLimits | None = None
    process: JobProcess | None = None
    skipped: tuple[str, ...] = field(default=())
    #: live output: stream name -> a read-only descriptor of its file (carod.node.progress)
    streams: dict[str, int] = field(default_factory=dict)
    #: the sandbox started ahead this attempt runs in (carod.sandbox.warm), None for a cold start
    warm: Warm | None = None
    #: the job's chirp socket path on the host when it wants chirp (carod.sandbox.chirpdir)
    chirp: Path | None = None


class Executor:
    def __init__(self, config: Config, layers: Layers, users: UserPool) -> None:
        self.config = config
        self.layers = layers
        self.users = users
        self.results_dir = config.node.state_dir / "results"
        #: set by use_disk at start-up
        self.quota: DiskQuota | None = None
        self.default_disk_kib = 0.0
        #: sandboxes started ahead of their jobs (start_ahead), None = every job starts cold
        self.warm: WarmPool | None = None
        #: network = services: each sandbox's block of service ports (start_ahead)
        self.ports: network.PortBlocks | None = None

    async def start_ahead(self, slots: int) -> int:
        """Start each slot's sandbox ahead of its job ([sandbox] prestart). Returns how many are ready.

        With network = outbound/services every job runs in such a sandbox (its
        network is attached to the waiting chain): without prestart, each is made
        when its job comes. Raises StartupError when service_ports cannot serve ``slots``.
        """
        net = self.layers.net
        if net is not None and net.services:
            self.ports = network.PortBlocks.for_node(self.config, slots)
        ahead = self.config.sandbox.prestart and self.layers.bash is not None
        if not ahead and net is None:
            return 0
        dedicated = self.users.dedicated
        self.warm = WarmPool(
            self.layers,
            self.users.users,
            (1 if dedicated else slots) if ahead else 0,
            make_box=self._make_warm_box,
            remove_box=self._remove_box,
            refill_on_take=not dedicated or not ahead,
            attach_net=None if net is None else functools.partial(network.attach, net, blocks=self.ports),
        )
        self.warm.start()
        return await self.warm.ready()

    async def close(self) -> None:
        """At shutdown: remove the sandboxes started ahead that no job took."""
        if self.warm is not None:
            await self.warm.close()
            pool = self.warm
            log.info(
                "sandboxes started ahead: %d jobs found theirs ready, %d waited for it, %d started cold",
                pool.hits,
                pool.waits,
                pool.misses,
            )

    def _make_warm_box(self, user: JobUser) -> tuple[Path, int | None]:
        run = Run(user)
        return self._create_box(run, "warm"), run.quota_group

    @property
    def _sweep_at_exit(self) -> bool:
        """Sweep a slot user's processes as the job's main process exits, before its results are read?

        Only when the sweep is all that finds the job's processes (no cgroup, no
        PID namespace). Otherwise every process of the job is killed with its
        cgroup or namespace, and the sweep (a scan of /proc) runs in :meth:`end`,
        after the final reply went out and before the user is handed on.
        """
        return self.users.dedicated and self.layers.cgroups is None and self.layers.bwrap is None

    @property
    def _sweep_at_end(self) -> bool:
        """Sweep a slot user's processes when the attempt ends (alongside the final reply)?

        Not when the job had both a PID namespace and a cgroup: every process it
        made is in both and died with them, and a process of the slot user outside
        them could only come from a privileged helper acting for the user (cron
        and at need setgid programs, which no_new_privs defuses; a systemd user
        manager runs only for a logged-in or lingering user). A sweep reads
        /proc/PID/status of every process on the host (~4.6 ms of CPU with 260
        processes), per job.
        """
        both = self.layers.cgroups is not None and self.layers.bwrap is not None
        return self.users.dedicated and not self._sweep_at_exit and not both

    def use_disk(self, quota: DiskQuota | None, default_disk_kib: float) -> None:
        """How sandboxes are bounded: the kernel's quota (or None), and the limit of a job without RequestDisk."""
        self.quota = quota
        self.default_disk_kib = default_disk_kib

    async def begin(self) -> Run:
        """A job user for one attempt (waits when every slot user is busy)."""
        return Run(await self.users.acquire())

    async def create_box(self, run: Run, message_id: str) -> Path:
        """The attempt's sandbox: one started ahead for its user when there is one, else a new directory."""
        if self.warm is not None and (warm := await self.warm.take(run.user)) is not None:
            run.warm = warm
            run.box, run.quota_group, run.cgroup = warm.box, warm.quota_group, warm.cgroup
            return warm.box
        if self.layers.net is not None:  # its network is attached to a waiting chain only
            warm = await self.warm.prepare_now(run.user) if self.warm is not None else None
            if warm is None:
                raise JobHeld(
                    f"carod could not set up the job's network ([sandbox] network = {self.layers.network})",
                    HoldCode.FAILED_TO_CREATE_PROCESS,
                )
            run.warm = warm
            run.box, run.quota_group, run.cgroup = warm.box, warm.quota_group, warm.cgroup
            return warm.box
        run.box = await asyncio.to_thread(self._create_box, run, message_id)
        return run.box

    def _create_box(self, run: Run, message_id: str) -> Path:
        """The sandbox (blocking), with its chirp directory when the node has chirp."""
        box = self._create_dir(run, message_id)
        if self.layers.chirp_root is not None:
            try:
                chirpdir.make(self.layers.chirp_root, box)
            except OSError as exc:
                self._remove_box(box, run.quota_group)
                run.box = None  # removed: not again at the end
                raise JobHeld(
                    f"carod could not create the job's sandbox: {exc.strerror}", HoldCode.IWD_ERROR, exc.errno or 0
                ) from exc
        return box

    def _create_dir(self, run: Run, message_id: str) -> Path:
        """The sandbox's directory, or a subvolume in a quota group of its own (blocking)."""
        root = self.config.node.sandbox_root
        if self.quota is None:
            return sandbox.create(root, message_id, run.user.owner)
        box = sandbox.create(root, message_id, run.user.owner, make_dir=self.quota.make_box)
        run.box = box  # removed by end() whatever happens next
        try:
            run.quota_group = self.quota.attach(box)
        except OSError as exc:
            raise JobHeld(
                f"carod could not set up the job's disk limit: {exc.strerror}", HoldCode.IWD_ERROR, exc.errno or 0
            ) from exc
        return box

    async def chirp(self, run: Run) -> Path:
        """The job wants chirp: put the tools in its sandbox. Returns its socket's path. Raises JobHeld."""
        if run.box is None:
            raise RuntimeError("chirp() before create_box()")
        if self.layers.chirp_root is None:
            if self.layers.bwrap is None:
                why = "isolation = none" if self.config.sandbox.isolation == "none" else "no bubblewrap"
            else:
                why = "see carod's log at start-up"
            raise JobHeld(
                f"the job wants chirp (WantIOProxy), which this node does not offer ({why})",
                HoldCode.FAILED_TO_CREATE_PROCESS,
            )
        try:
            run.chirp = await asyncio.to_thread(chirpdir.install, self.layers.chirp_root, run.box)
        except OSError as exc:
            raise JobHeld(
                f"carod could not set up chirp for the job: {exc.strerror}",
                HoldCode.FAILED_TO_CREATE_PROCESS,
                exc.errno or 0,
            ) from exc
        return run.chirp

    def _environment(self, run: Run, spec: JobSpec, box: Path) -> dict[str, str]:
        env = job_environment(spec, box, run.user)
        if run.chirp is not None:  # the chirp tools first, whatever PATH the job set
            env["PATH"] = f"{chirpdir.MOUNT}:{env['PATH']}" if env.get("PATH") else chirpdir.MOUNT
        return env

    async def start(self, run: Run, spec: JobSpec, body: bytes, request: Request) -> JobProcess:
        """Unpack, check, limit and start the job. Raises JobHeld."""
        if run.box is None:
            raise RuntimeError("start() before create_box()")
        run.limits = limits.limits_for(spec, self.config.sandbox, request, self.default_disk_kib)
        if run.warm is not None:
            # The file work and the word to start, in one thread hop.
            await asyncio.to_thread(self._release_warm, run, run.warm, run.box, run.limits, spec, body)
            run.process = JobProcess(
                run.warm.popen,
                run.user,
                run.cgroup,
                sweep=self._sweep_at_exit,
                status_from_code=self.layers.bwrap is not None,
            )
            return run.process
        # The file work in one thread hop; the spawn on the loop's thread (runner.py).
        executable, stdio = await asyncio.to_thread(self._prepare, run, run.box, run.limits, spec, body)
        cgroups = self.layers.cgroups
        try:
            run.process = await JobProcess.start(
                [executable, *spec.arguments],
                box=run.box,
                env=self._environment(run, spec, run.box),
                stdio=stdio,
                user=run.user,
                layers=self.layers,
                cgroup=run.cgroup,
                limits=rlimits(run.limits, run.cgroup, cgroups.controllers if cgroups else frozenset()),
                sweep=self._sweep_at_exit,
            )
        finally:
            stdio.close()
        return run.process

    def _release_warm(self, run: Run, warm: Warm, box: Path, job_limits: JobLimits, spec: JobSpec, body: bytes) -> None:
        """Prepare the job in its sandbox started ahead, then send it to the waiting shell (blocking)."""
        executable = self._unpack_and_check(run, box, job_limits, spec, body)
        if run.cgroup is not None:
            try:
                run.cgroup.apply(job_limits.cgroup())
            except OSError as exc:
                raise JobHeld(
                    f"carod could not set up the job's limits: {exc.strerror}",
                    HoldCode.FAILED_TO_CREATE_PROCESS,
                    exc.errno or 0,
                ) from exc
        stdio = self._open_stdio(run, box, spec)
        stdio.close()  # the files are made and checked; the job user's shell opens them again by name
        cgroups = self.layers.cgroups
        argv = [executable, *spec.arguments]
        try:
            warm.send(
                warm_fields(
                    *sandbox.stdio_paths(spec, box),
                    limits=rlimits(job_limits, run.cgroup, cgroups.controllers if cgroups else frozenset()),
                    argv=job_exec(self.layers, box, argv, self._environment(run, spec, box)),
                )
            )
        except ValueError as exc:
            raise JobHeld(f"carod could not start the job: {exc}", HoldCode.FAILED_TO_CREATE_PROCESS) from exc
        except OSError as exc:
            raise JobHeld(
                f"carod could not start the job in the sandbox prepared for it: {exc.strerror or exc}",
                HoldCode.FAILED_TO_CREATE_PROCESS,
                exc.errno or 0,
            ) from exc

    def _prepare(self, run: Run, box: Path, job_limits: JobLimits, spec: JobSpec, body: bytes) -> tuple[str, Stdio]:
        """Unpack the input, check the command, create the cgroup, open stdio (blocking)."""
        executable = self._unpack_and_check(run, box, job_limits, spec, body)
        if self.layers.cgroups is not None:
            try:
                run.cgroup = self.layers.cgroups.create(f"job-{box.name}", job_limits.cgroup())
            except CgroupError as exc:
                raise JobHeld(
                    f"carod could not set up the job's limits: {exc}", HoldCode.FAILED_TO_CREATE_PROCESS
                ) from exc
        return executable, self._open_stdio(run, box, spec)

    def _unpack_and_check(self, run: Run, box: Path, job_limits: JobLimits, spec: JobSpec, body: bytes) -> str:
        """Set the disk limit, unpack the input, check the command (blocking). Returns the executable."""
        node = self.config.node
        owner = run.user.owner
        if self.quota is not None and run.quota_group is not None and job_limits.disk_bytes is not None:
            try:  # before the input is unpacked: it counts too
                self.quota.limit(run.quota_group, job_limits.disk_bytes)
            except OSError as exc:
                raise JobHeld(
                    f"carod could not set the job's disk limit: {exc.strerror}",
                    HoldCode.FAILED_TO_CREATE_PROCESS,
                    exc.errno or 0,
                ) from exc
        if body:
            unzip.unpack_input(
                body, box, owner, max_files=node.max_input_files, max_bytes=node.max_input_mib * units.MIB
            )
        return check_command(spec, box, run.user, self.layers.job_view(box))

    def _open_stdio(self, run: Run, box: Path, spec: JobSpec) -> Stdio:
        stdio = sandbox.open_stdio(spec, box, run.user.owner)
        try:
            run.streams = sandbox.open_streams(spec, stdio)
        except JobHeld:
            stdio.close()
            raise
        return stdio

    async def watch(self, run: Run, kill_sig: int) -> tuple[ExitInfo, JobHeld | None]:
        """Until the job ends; a limit it broke comes back as JobHeld (the job is stopped)."""
        if run.process is None or run.limits is None or run.box is None:
            raise RuntimeError("watch() before start()")
        try:
            return await limits.enforce(
                run.process,
                run.limits,
                self._disk_meter(run, run.box),
                interval_s=self.config.sandbox.check_interval_s,
                kill_sig=kill_sig,
                grace_s=self.config.node.kill_grace_s,
            )
        finally:
            # Its service ports close with the job, before anyone is told it ended.
            if run.warm is not None and run.warm.net is not None:
                await asyncio.to_thread(run.warm.stop_network)

    def _disk_meter(self, run: Run, box: Path) -> limits.DiskMeter:
        quota, group = self.quota, run.quota_group
        if quota is None or group is None or run.limits is None or run.limits.disk_bytes is None:
            return limits.walk_meter(box)
        limit = kernel_limit_bytes(run.limits.disk_bytes)
        return limits.DiskMeter(lambda: quota.used_bytes(group), limit_slack_bytes(limit), min_limit_bytes=limit)

    async def collect(self, run: Run, spec: JobSpec) -> tuple[Path, Results]:
        """Zip the results into the state directory. Raises JobHeld."""
        if run.box is None:
            raise RuntimeError("collect() before create_box()")
        result_zip = self.results_dir / f"{run.box.name}.zip"
        try:
            results = await asyncio.to_thread(
                collect_results,
                spec,
                run.box,
                result_zip,
                max_bytes=self.config.node.max_result_mib * units.MIB,
                owner=run.user.owner,
                max_files=self.config.node.max_result_files,
            )
        except JobHeld:
            result_zip.unlink(missing_ok=True)
            raise
        except OSError as exc:
            result_zip.unlink(missing_ok=True)
            raise JobHeld(
                f"carod could not write the job's results: {exc.strerror}",
                HoldCode.TRANSFER_OUTPUT_ERROR,
                exc.errno or 0,
            ) from exc
        except (struct.error, ValueError, zipfile.LargeZipFile) as exc:
            # zipfile refuses what a zip cannot hold (a name past 65,535 bytes, too many entries...):
            # the job's results, not carod, are at fault.
            result_zip.unlink(missing_ok=True)
            raise JobHeld(
                f"carod could not zip the job's results: {str(exc)[:200]}", HoldCode.TRANSFER_OUTPUT_ERROR
            ) from exc
        return result_zip, results

    async def end(self, run: Run) -> None:
        """Kill what is left of the attempt, remove its cgroup and sandbox, free its user. Idempotent."""
        if run.ended:
            return
        run.ended = True
        for fd in run.streams.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        run.streams.clear()
        try:
            if run.process is not None:
                run.process.kill()
                await run.process.wait()
            elif run.warm is not None:  # the job never got it
                await asyncio.to_thread(run.warm.stop)
            if run.warm is not None and run.warm.net is not None:
                await asyncio.to_thread(run.warm.stop_network)
            if self._sweep_at_end:
                killed = await asyncio.to_thread(cgroup.sweep_user, run.user.uid)
                if killed:
                    log.info("killed %d leftover processes of slot user %s", killed, run.user.name)
            if run.cgroup is not None:
                await asyncio.to_thread(run.cgroup.remove)
            if run.box is not None:
                await asyncio.to_thread(self._remove_box, run.box, run.quota_group)
        finally:
            self.users.release(run.user)
            if self.warm is not None:
                self.warm.refill(run.user)

    def _remove_box(self, box: Path, group: int | None) -> None:
        """A subvolume goes at once, whatever it holds; otherwise (or when refused) file by file."""
        if self.layers.chirp_root is not None:
            chirpdir.remove(self.layers.chirp_root, box)
        if self.quota is not None and self.quota.destroy(box, group):
            return
        sandbox.remove(box)

    async def clean_interrupted(self, pid: int | None, pid_start: str | None, box: str | None) -> bool:
        """Kill the processes of a run carod lost track of. True when something was killed.

        Never fails the node: what cannot be cleaned up is logged and left.
        """
        killed = False
        try:
            if pid is not None:
                killed = await asyncio.to_thread(kill_leftover, pid, pid_start)
            if box and self.layers.cgroups is not None:
                group = self.layers.cgroups.job(f"job-{Path(box).name}")
                if group.pids():
                    killed = True
                await asyncio.to_thread(group.kill)
                await asyncio.to_thread(group.remove)
        except (OSError, CgroupError) as exc:
            log.warning("could not clean up after an interrupted job (pid %s, sandbox %s): %s", pid, box, exc)
        if box:
            await asyncio.to_thread(sandbox.remove, Path(box))
        return killed

    async def clean_host(self) -> int:
        """At start-up, before any job: kill what earlier runs of carod left. Returns processes killed."""
        killed = 0
        if self.layers.cgroups is not None:
            for group in await asyncio.to_thread(self.layers.cgroups.leftovers):
                killed += len(group.pids())
                await asyncio.to_thread(group.kill)
                await asyncio.to_thread(group.remove)
        if self.users.dedicated:
            for user in self.users.users:
                killed += await asyncio.to_thread(cgroup.sweep_user, user.uid)
        killed += await asyncio.to_thread(kill_stopped_gates, self.config.node.sandbox_root)
        return killed
