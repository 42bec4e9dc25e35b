"""Configuration: an INI file loaded into frozen dataclasses.

Unknown sections and keys, and values of the wrong type, are refused with a
:class:`~carod.errors.ConfigError` that names the key (``[node] slots``).
Environment variables ``CAROD_<SECTION>_<KEY>`` (e.g. ``CAROD_BROKER_URL``)
override the file, for containers.
"""

from __future__ import annotations

import configparser
import dataclasses
import functools
import os
import socket
import typing
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import classad2

from carod.errors import ConfigError
from carod.wire.classads import ATTRIBUTE_NAME

QUEUE_TYPES = ("quorum", "classic")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")
ISOLATIONS = ("auto", "bwrap", "none")
CGROUP_MODES = ("auto", "v2", "v1", "none")
DISK_QUOTA_MODES = ("auto", "required", "none")
EVENT_LOOPS = ("asyncio", "uvloop")
#: [sandbox] network: what a job may reach and who may reach it (docs/security.md "Network policies").
NETWORK_POLICIES = ("none", "outbound", "services", "host")
#: The values of [sandbox] network before it named a policy (yes/no): yes shared the host's namespace.
_NETWORK_BOOLS = {
    "yes": "host",
    "true": "host",
    "on": "host",
    "1": "host",
    "no": "none",
    "false": "none",
    "off": "none",
    "0": "none",
}
AUTH_MECHANISMS = ("plain", "external")
#: TLS settings aiormq would read from an amqps:// URL's query; carod takes them as [broker] keys instead.
_URL_TLS_OPTIONS = {
    "cafile": "ca_file",
    "capath": "ca_file",
    "cadata": "ca_file",
    "certfile": "cert_file",
    "keyfile": "key_file",
    "no_verify_ssl": "verify_hostname",
    "auth": "auth",
}
#: The default wall-clock limit of a job (s): one day, so a forgotten job frees its slot by itself.
DEFAULT_MAX_JOB_DURATION_S = 86400.0


@dataclass(frozen=True)
class BrokerConfig:
    #: The broker, or the nodes of a broker cluster: several URLs separated by commas or spaces,
    #: tried in a shuffled order at start and on every reconnection (docs/operations.md, "A broker cluster").
    url: str = "amqp://guest:guest@127.0.0.1:5672/"
    queue: str = "grid"
    queue_type: str = "quorum"
    exchange: str = "amq.direct"
    binding_key: str = "grid_key"
    #: Most deliveries the broker may hand this node at once; default (0) = slots.
    #: Below that, the prefetch follows the node's free resources.
    prefetch: int = 0
    #: How long to wait for the broker to confirm a reply before retrying it.
    confirm_timeout_s: float = 30.0
    #: A job this node does not match waits this long before it is offered again.
    unmatched_delay_s: float = 1.0
    #: After this many declines by any node, the job is Held as unmatched.
    max_offers: int = 60
    #: A job declined here that another node advertises it would run is passed on (its declines
    #: not counted) for at most this long after its first decline; then every decline counts.
    max_pass_s: float = 3600.0
    #: Quorum queues: deliveries of one message (requeues, node crashes) before the
    #: broker dead-letters it and a node answers it Held; 0 = no limit.
    delivery_limit: int = 20
    connect_timeout_s: float = 10.0
    #: A result zip larger than this is sent as ordered parts of this size ahead of
    #: the final reply (keep it below the broker's max_message_size: 16 MiB on RabbitMQ 4).
    result_part_mib: int = 8
    #: After losing the broker, try again this often (running jobs go on meanwhile).
    reconnect_interval_s: float = 1.0
    #: A reply the broker does not confirm (connection lost, no confirm in time) is tried
    #: again for at most this long; then an update is dropped, and a final reply stays in
    #: the journal and its job's message is requeued, to be answered on its next delivery.
    reply_retry_s: float = 300.0
    #: amqps:// only (docs/operations.md, "TLS"): the CA certificate(s) (PEM) the broker's certificate must chain
    #: to; empty = the system's trusted CAs.
    ca_file: str = ""
    #: This node's client certificate (PEM, with the chain after it) and its private key (PEM; empty = in cert_file).
    cert_file: str = ""
    key_file: str = ""
    #: The broker's certificate must name the host of [broker] url (DNS name or IP address).
    verify_hostname: bool = True
    #: plain = the user and password in the URL; external = the user is the client certificate's
    #: (RabbitMQ's EXTERNAL mechanism, plugin rabbitmq_auth_mechanism_ssl); needs cert_file.
    auth: str = "plain"

    @property
    def urls(self) -> tuple[str, ...]:
        """Each broker URL of ``url`` (one, or the nodes of a cluster), in the order written."""
        return split_urls(self.url)


def split_urls(text: str) -> tuple[str, ...]:
    """``amqp://a/, amqp://b/`` -> both URLs (commas and white space separate; a URL has neither)."""
    return tuple(part for part in text.replace(",", " ").split() if part)


@dataclass(frozen=True)
class NodeConfig:
    name: str = ""
    #: Jobs run at once; default (0) = the machine's Cpus.
    slots: int = 0
    job_user: str = "nobody"
    sandbox_root: Path = Path("/var/lib/carod/sandboxes")
    state_dir: Path = Path("/var/lib/carod")
    #: The node's own policy a job must satisfy (MY = machine, TARGET = job).
    start: str = "TRUE"
    #: On SIGTERM, running jobs get this long to finish before they are stopped.
    drain_timeout_s: float = 30.0
    #: After KillSig, a job gets this long before SIGKILL.
    kill_grace_s: float = 5.0
    max_input_mib: int = 1024
    max_input_files: int = 10_000
    #: A job whose result zip would be larger is Held (results above
    #: [broker] result_part_mib travel in parts, so this may exceed the broker's max message size).
    max_result_mib: int = 1024
    #: A job that leaves more files and directories than this in its results is Held
    #: (the result walk stops there, before zipping anything).
    max_result_files: int = 10_000
    #: Memory a job without RequestMemory reserves and is limited to (MiB).
    default_request_memory_mib: int = 128
    #: Runs started on this node (incl. ones interrupted by a crash) before the job is Held.
    max_attempts: int = 3
    #: A finished job whose delivery died waits this long for it to be redelivered here.
    redelivery_wait_s: float = 600.0
    #: How long the journal remembers finished jobs (to recognise redeliveries).
    journal_retention_s: float = 86400.0
    #: carod rm of jobs not here: at most this many remembered (for journal_retention_s), oldest dropped first.
    max_removals: int = 10_000
    #: A job ad carod cannot bound by reading it is evaluated in a child process for at most
    #: this long (seconds) and with at most this much memory (MiB); a job over either is Held.
    eval_timeout_s: float = 1.0
    eval_memory_mib: int = 256
    log_level: str = "INFO"
    log_format: str = "text"
    #: While a job runs, a JobStatus 2 reply with its usage this often; 0 = only when it starts.
    update_interval_s: float = 30.0
    #: Live output (StreamOut/StreamErr): new output is looked for this often...
    stream_interval_s: float = 0.5
    #: ...and sent in chunks of at most this size...
    stream_chunk_kib: int = 64
    #: ...at most this much per second per job; a job writing faster has the middle skipped
    #: (its whole output is still in the result zip).
    stream_rate_kib_s: int = 256
    #: The daemon's event loop: asyncio's own, or uvloop's (docs/operations.md, docs/performance.md issue 16).
    event_loop: str = "asyncio"
    #: Broker users who may rm, hold and release any job on this node (besides each job's owner),
    #: comma-separated (docs/operations.md, "Who may act on a job").
    admins: tuple[str, ...] = ()


@dataclass(frozen=True)
class SandboxConfig:
    """How jobs are isolated and limited (docs/security.md)."""

    #: auto = bubblewrap when it is installed and works; bwrap = required; none = off.
    isolation: str = "auto"
    #: auto = cgroup v2 with memory+pids controllers, else v1, else v2 without limits, else none.
    cgroups: str = "auto"
    #: What a job's network is (docs/security.md "Network policies"): none = loopback only;
    #: outbound = connections out (slirp4netns), not to the node's loopback services; services = that,
    #: and a listener on an ephemeral port is reached at $HOSTNAME:$PORT; host = the node's own
    #: namespace (loopback services included). The old yes/no mean host/none.
    network: str = "none"
    #: services: the node's ports forwarded to jobs (first-last), outside the host's ip_local_port_range.
    service_ports: str = "61000-65535"
    #: services: each sandbox's own block of service_ports: its ephemeral ports, the only ones forwarded to it.
    service_ports_per_job: int = 64
    #: Let jobs create user namespaces (e.g. for rootless containers); with bubblewrap they cannot by default.
    user_namespaces: bool = False
    #: Directories hidden from jobs (an empty tmpfs over each), e.g. where local services keep unix sockets
    #: outside /run. With bubblewrap only.
    hide_paths: tuple[str, ...] = ()
    #: Size of the job's private /tmp and /dev/shm (each), with bubblewrap.
    tmp_mib: int = 256
    #: One user per slot, so concurrent jobs cannot touch each other; empty = [node] job_user for all.
    slot_users: tuple[str, ...] = ()
    #: Processes and threads a job may have at once (cgroup pids.max).
    max_job_pids: int = 4096
    #: Longest a job may run (seconds) whatever it asks for (AllowedExecuteDuration can only
    #: shorten it); 0 = no node limit. Default: one day.
    max_job_duration_s: float = DEFAULT_MAX_JOB_DURATION_S
    #: How often a running job's disk and memory usage is checked.
    check_interval_s: float = 5.0
    #: The kernel bounds each sandbox's disk (a btrfs image with a quota group per job,
    #: carod/sandbox/diskquota.py): auto = when the host can; required = refuse to start without it;
    #: none = RLIMIT_FSIZE and the periodic check only.
    disk_quota: str = "auto"
    #: Size of that image (MiB), the most all sandboxes together can hold; 0 = half the space
    #: free on [node] state_dir's file system at start-up. The image is sparse.
    disk_image_mib: int = 0
    #: The disk limit of a job without RequestDisk (MiB); 0 = the node's Disk divided by its slots.
    default_disk_mib: int = 0
    #: Start each slot's next sandbox (directory, cgroup, bubblewrap, setpriv, the job user's waiting
    #: shell) ahead of its job, so a job starts in ~1 ms instead of ~5 (docs/performance.md).
    prestart: bool = True


@dataclass(frozen=True)
class PoolConfig:
    """How nodes see each other (docs/pool.md)."""

    #: The topic exchange every node advertises its machine ad and jobs on.
    exchange: str = "carod.nodes"
    #: A node advertises this often, and at once when its jobs change.
    advertise_interval_s: float = 5.0
    #: A node not heard from for this long is dropped from the pool.
    node_timeout_s: float = 30.0
    #: An advert larger than this (KiB) is dropped unread.
    max_advert_kib: int = 256
    #: Other nodes remembered at most; adverts of further nodes are dropped.
    max_nodes: int = 256


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus exposition (docs/operations.md)."""

    #: Serve /metrics on this TCP port; 0 = off.
    port: int = 0
    #: The address to listen on (0.0.0.0 for all).
    address: str = "127.0.0.1"


@dataclass(frozen=True)
class Config:
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    node: NodeConfig = field(default_factory=NodeConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    #: Extra or overriding machine-ad attributes: (name, ClassAd expression).
    machine: tuple[tuple[str, str], ...] = ()
    source: str = "<defaults>"

    @property
    def path(self) -> Path | None:
        """The config file this was loaded from (None when it was not read from a file)."""
        return None if self.source.startswith("<") else Path(self.source).absolute()

    @functools.cached_property
    def node_name(self) -> str:
        """[node] name, or the host's name (looked up once: every reply and advert carries it)."""
        return self.node.name or socket.gethostname()

    def slots_for(self, cpus: float) -> int:
        return self.node.slots or max(1, int(cpus))

    def prefetch_for(self, slots: int) -> int:
        return self.broker.prefetch or slots


_SECTIONS: dict[str, type] = {
    "broker": BrokerConfig,
    "node": NodeConfig,
    "sandbox": SandboxConfig,
    "pool": PoolConfig,
    "metrics": MetricsConfig,
}
#: Keys that moved, so an old config gets told where to.
_RENAMED = {
    ("sandbox", "default_memory_mib"): "[node] default_request_memory_mib (the memory a job without RequestMemory "
    "reserves and is limited to)",
}
_STRINGS = tuple[str, ...]
#: Lists whose items are names (no spaces in them): separated by commas or spaces.
_NAME_LISTS = frozenset({("node", "admins")})


def _convert(section: str, key: str, raw: str, kind: Any) -> Any:
    where = f"[{section}] {key}"
    raw = raw.strip()
    try:
        if kind is int:
            return int(raw)
        if kind is float:
            value = float(raw)
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError(raw)
            return value
        if kind is Path:
            if not raw:
                raise ValueError(raw)
            return Path(raw)
        if kind == _STRINGS and (section, key) in _NAME_LISTS:
            return tuple(raw.replace(",", " ").split())
        if kind == _STRINGS:
            return tuple(item.strip() for item in raw.split(",") if item.strip())
        if kind is bool:
            lowered = raw.lower()
            if lowered in ("1", "yes", "true", "on"):
                return True
            if lowered in ("0", "no", "false", "off"):
                return False
            raise ValueError(raw)
        return raw
    except ValueError:
        name = {int: "a whole number", float: "a number", Path: "a path", bool: "yes or no"}.get(kind, "a value")
        raise ConfigError(f"{where}: expected {name}, got {raw!r}") from None


def _section_values(cls: type, section: str, items: Mapping[str, str], environ: Mapping[str, str]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, raw in items.items():
        if (section, key) in _RENAMED:
            raise ConfigError(f"[{section}] {key}: renamed to {_RENAMED[section, key]}")
        if key not in known:
            raise ConfigError(f"[{section}] {key}: unknown key (known: {', '.join(sorted(known))})")
        values[key] = _convert(section, key, raw, hints[key])
    for key in known:
        env_name = f"CAROD_{section.upper()}_{key.upper()}"
        if env_name in environ:
            values[key] = _convert(section, key, environ[env_name], hints[key])
    if section == "sandbox" and "network" in values:
        # The old yes/no keep working: yes shared the host's namespace, no was loopback only.
        values["network"] = _NETWORK_BOOLS.get(values["network"].lower(), values["network"])
    return values


def _check(config: Config) -> None:
    b, n = config.broker, config.node
    _check_urls(b.url)
    _check_tls(b)
    if not b.queue:
        raise ConfigError("[broker] queue: must not be empty")
    if b.queue_type not in QUEUE_TYPES:
        raise ConfigError(f"[broker] queue_type: must be one of {', '.join(QUEUE_TYPES)}, got {b.queue_type!r}")
    if b.result_part_mib <= 0:
        raise ConfigError("[broker] result_part_mib: must be greater than 0")
    for key in ("prefetch", "max_offers", "delivery_limit"):
        if getattr(b, key) < 0:
            raise ConfigError(f"[broker] {key}: must not be negative")
    for key in ("confirm_timeout_s", "connect_timeout_s", "reconnect_interval_s", "max_pass_s", "reply_retry_s"):
        if getattr(b, key) <= 0:
            raise ConfigError(f"[broker] {key}: must be greater than 0")
    if b.unmatched_delay_s < 0:
        raise ConfigError("[broker] unmatched_delay_s: must not be negative")
    if n.slots < 0:
        raise ConfigError("[node] slots: must not be negative (0 means one per CPU)")
    if n.slots and b.prefetch > n.slots:
        raise ConfigError(
            f"[broker] prefetch: {b.prefetch} is more than [node] slots = {n.slots}; "
            "the node must never hold more jobs than it can run"
        )
    if not n.job_user:
        raise ConfigError("[node] job_user: must not be empty")
    if n.job_user == "root" or n.job_user == "0":
        raise ConfigError("[node] job_user: jobs must not run as root")
    for key in ("sandbox_root", "state_dir"):
        if not getattr(n, key).is_absolute():
            raise ConfigError(f"[node] {key}: must be an absolute path")
    for key in ("drain_timeout_s", "kill_grace_s", "redelivery_wait_s", "update_interval_s"):
        if getattr(n, key) < 0:
            raise ConfigError(f"[node] {key}: must not be negative")
    for key in (
        "max_input_mib",
        "max_input_files",
        "max_result_mib",
        "max_result_files",
        "max_attempts",
        "journal_retention_s",
        "default_request_memory_mib",
        "stream_interval_s",
        "stream_chunk_kib",
        "stream_rate_kib_s",
        "max_removals",
        "eval_timeout_s",
        "eval_memory_mib",
    ):
        if getattr(n, key) <= 0:
            raise ConfigError(f"[node] {key}: must be greater than 0")
    if n.log_level.upper() not in LOG_LEVELS:
        raise ConfigError(f"[node] log_level: must be one of {', '.join(LOG_LEVELS)}, got {n.log_level!r}")
    if n.log_format not in LOG_FORMATS:
        raise ConfigError(f"[node] log_format: must be one of {', '.join(LOG_FORMATS)}, got {n.log_format!r}")
    if n.event_loop not in EVENT_LOOPS:
        raise ConfigError(f"[node] event_loop: must be one of {', '.join(EVENT_LOOPS)}, got {n.event_loop!r}")
    _check_sandbox(config.sandbox, n)
    _check_pool(config.pool)
    if not 0 <= config.metrics.port <= 65535:
        raise ConfigError(f"[metrics] port: must be 0 (off) or a TCP port up to 65535, got {config.metrics.port}")
    if not config.metrics.address:
        raise ConfigError("[metrics] address: must not be empty")
    try:
        classad2.ExprTree(n.start)
    except classad2.ClassAdException as exc:
        raise ConfigError(f"[node] start: not a valid ClassAd expression: {n.start!r}") from exc
    for name, text in config.machine:
        try:
            classad2.ExprTree(text)
        except classad2.ClassAdException as exc:
            raise ConfigError(f"[machine] {name}: not a valid ClassAd expression: {text!r}") from exc


def _check_urls(text: str) -> None:
    urls = split_urls(text)
    if not urls:
        raise ConfigError("[broker] url: must name at least one broker (amqp://... or amqps://...)")
    for number, url in enumerate(urls, 1):
        if not url.startswith(("amqp://", "amqps://")):
            # never the tail of a password split at a comma
            shown = f"{redact_url(url)!r}" if "://" in url else f"URL {number} of {len(urls)}"
            raise ConfigError(
                f"[broker] url: must start with amqp:// or amqps://, got {shown} (several brokers are separated by "
                "commas or spaces; write a comma or space in a password as %2C or %20)"
            )
    if len(set(urls)) != len(urls):
        raise ConfigError(f"[broker] url: a broker is listed twice in {redact_urls(text)!r}")


def _check_tls(b: BrokerConfig) -> None:
    """[broker] ca_file, cert_file, key_file, auth: consistent with the URL(s), and the files readable now."""
    if b.auth not in AUTH_MECHANISMS:
        raise ConfigError(f"[broker] auth: must be one of {', '.join(AUTH_MECHANISMS)}, got {b.auth!r}")
    tls_keys = [key for key in ("ca_file", "cert_file", "key_file") if getattr(b, key)]
    if b.auth == "external":
        tls_keys.append("auth")
        if not b.cert_file:
            raise ConfigError("[broker] auth: external takes the user from the client certificate; set cert_file")
    for url in b.urls:
        scheme, _, rest = url.partition("://")
        authority = rest.partition("/")[0]
        if b.auth == "external" and not authority.rpartition("@")[0].partition(":")[0]:
            raise ConfigError(
                f"[broker] url: with auth = external, name the client certificate's broker user in the URL "
                f"(amqps://USER@host/, no password; it is not sent), got {redact_url(url)!r}"
            )
        if scheme != "amqps" and tls_keys:
            raise ConfigError(
                f"[broker] {tls_keys[0]}: only for amqps:// URLs, and [broker] url is {redact_url(url)!r}"
            )
        query = rest.partition("?")[2]
        for option in query.split("&") if query else ():
            name = option.partition("=")[0]
            if name in _URL_TLS_OPTIONS:
                raise ConfigError(
                    f"[broker] url: {name}= is not read from the URL; set [broker] {_URL_TLS_OPTIONS[name]}"
                )
    if b.key_file and not b.cert_file:
        raise ConfigError("[broker] key_file: set only with cert_file (the certificate it is the key of)")
    for key in ("ca_file", "cert_file", "key_file"):
        path = getattr(b, key)
        if not path:
            continue
        if not os.path.isabs(path):
            raise ConfigError(f"[broker] {key}: must be an absolute path, got {path!r}")
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"[broker] {key}: cannot read {path}: {exc.strerror}") from exc
        if not os.path.isfile(path):
            raise ConfigError(f"[broker] {key}: {path} is not a file")


def _check_sandbox(s: SandboxConfig, n: NodeConfig) -> None:
    for path in s.hide_paths:
        if not path.startswith("/") or path.rstrip("/") in ("", "/proc", "/dev"):
            raise ConfigError(f"[sandbox] hide_paths: {path!r} must be an absolute path other than /, /proc and /dev")
    if s.isolation not in ISOLATIONS:
        raise ConfigError(f"[sandbox] isolation: must be one of {', '.join(ISOLATIONS)}, got {s.isolation!r}")
    if s.cgroups not in CGROUP_MODES:
        raise ConfigError(f"[sandbox] cgroups: must be one of {', '.join(CGROUP_MODES)}, got {s.cgroups!r}")
    for key in ("tmp_mib", "max_job_pids", "check_interval_s"):
        if getattr(s, key) <= 0:
            raise ConfigError(f"[sandbox] {key}: must be greater than 0")
    if s.network not in NETWORK_POLICIES:
        raise ConfigError(
            f"[sandbox] network: must be one of {', '.join(NETWORK_POLICIES)} (or the old yes = host, no = none), "
            f"got {s.network!r}"
        )
    first, last = service_port_range(s.service_ports)
    if s.service_ports_per_job < 1 or s.service_ports_per_job > last - first + 1:
        raise ConfigError(
            f"[sandbox] service_ports_per_job: must be between 1 and the {last - first + 1} ports of service_ports, "
            f"got {s.service_ports_per_job}"
        )
    if s.disk_quota not in DISK_QUOTA_MODES:
        raise ConfigError(f"[sandbox] disk_quota: must be one of {', '.join(DISK_QUOTA_MODES)}, got {s.disk_quota!r}")
    if s.disk_image_mib and s.disk_image_mib < 256:
        raise ConfigError(
            f"[sandbox] disk_image_mib: must be 0 (half the free space) or at least 256, got {s.disk_image_mib}"
        )
    if s.default_disk_mib < 0:
        raise ConfigError("[sandbox] default_disk_mib: must not be negative (0 means the node's Disk / slots)")
    if s.max_job_duration_s < 0:
        raise ConfigError("[sandbox] max_job_duration_s: must not be negative (0 means no limit of its own)")
    for user in s.slot_users:
        if user in ("root", "0"):
            raise ConfigError("[sandbox] slot_users: jobs must not run as root")
    if len(set(s.slot_users)) != len(s.slot_users):
        raise ConfigError("[sandbox] slot_users: a user is listed twice")
    if s.slot_users and n.slots > len(s.slot_users):
        raise ConfigError(
            f"[sandbox] slot_users: {len(s.slot_users)} users for [node] slots = {n.slots}; "
            "each slot needs a user of its own"
        )


def service_port_range(text: str) -> tuple[int, int]:
    """[sandbox] service_ports "FIRST-LAST" as (first, last), unprivileged TCP ports. Raises ConfigError."""
    first_text, sep, last_text = text.partition("-")
    try:
        first, last = int(first_text), int(last_text)
    except ValueError:
        first = last = 0
    if not sep or not 1024 <= first <= last <= 65535:
        raise ConfigError(f"[sandbox] service_ports: expected FIRST-LAST, ports from 1024 to 65535, got {text!r}")
    return first, last


def _check_pool(p: PoolConfig) -> None:
    if not p.exchange or p.exchange.startswith("amq."):
        raise ConfigError(f"[pool] exchange: must be a name of carod's own (not empty, not amq.*), got {p.exchange!r}")
    for key in ("advertise_interval_s", "node_timeout_s", "max_advert_kib", "max_nodes"):
        if getattr(p, key) <= 0:
            raise ConfigError(f"[pool] {key}: must be greater than 0")
    if p.node_timeout_s <= p.advertise_interval_s:
        raise ConfigError(
            f"[pool] node_timeout_s: {p.node_timeout_s} must be longer than advertise_interval_s "
            f"({p.advertise_interval_s}), or live nodes drop out between adverts"
        )


def parse(text: str, *, source: str = "<string>", environ: Mapping[str, str] | None = None) -> Config:
    """Parse config text. ``environ`` defaults to ``os.environ``."""
    env = os.environ if environ is None else environ
    parser = configparser.ConfigParser(interpolation=None, strict=True, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keep ClassAd attribute case
    try:
        parser.read_string(text, source=source)
    except configparser.Error as exc:
        raise ConfigError(f"{source}: {exc.message}") from exc
    sections: dict[str, Any] = {}
    for section in parser.sections():
        if section == "machine":
            continue
        if section not in _SECTIONS:
            raise ConfigError(f"[{section}]: unknown section (known: {', '.join(_SECTIONS)}, machine)")
    for section, cls in _SECTIONS.items():
        items = dict(parser.items(section)) if parser.has_section(section) else {}
        sections[section] = cls(**_section_values(cls, section, items, env))
    machine = tuple(parser.items("machine")) if parser.has_section("machine") else ()
    for name, _ in machine:
        if not ATTRIBUTE_NAME.match(name):
            raise ConfigError(f"[machine] {name}: not a ClassAd attribute name")
    config = Config(
        broker=sections["broker"],
        node=sections["node"],
        sandbox=sections["sandbox"],
        pool=sections["pool"],
        metrics=sections["metrics"],
        machine=machine,
        source=source,
    )
    _check(config)
    return config


def load(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: the config file is not UTF-8") from exc
    return parse(text, source=str(path), environ=environ)


def effective(config: Config) -> str:
    """The effective settings, as INI text (passwords in the URL hidden)."""
    lines = []
    for section in _SECTIONS:
        lines.append(f"[{section}]")
        for f in dataclasses.fields(getattr(config, section)):
            value = getattr(getattr(config, section), f.name)
            if section == "broker" and f.name == "url":
                value = redact_urls(str(value))
            elif isinstance(value, tuple):
                value = ", ".join(value)
            lines.append(f"{f.name} = {value}")
        lines.append("")
    lines.append("[machine]")
    lines.extend(f"{name} = {text}" for name, text in config.machine)
    return "\n".join(lines) + "\n"


def client_urls(b: BrokerConfig) -> str:
    """``[broker] url`` for the client tools (aiormq's URL form): each amqps:// URL with the node's TLS keys.

    The client commands connect through aio-pika's URL alone, which reads ``cafile``, ``certfile``,
    ``keyfile`` and ``auth`` from its query. ``verify_hostname = no`` has no URL form: the tools
    always check the host name.
    """
    query = {"cafile": b.ca_file, "certfile": b.cert_file, "keyfile": b.key_file}
    params = {name: path for name, path in query.items() if path}
    if b.auth == "external":
        params["auth"] = "EXTERNAL"
    if not params:
        return b.url
    extra = urllib.parse.urlencode(params)
    return ", ".join(
        url + ("&" if "?" in url else "?") + extra if url.startswith("amqps://") else url for url in split_urls(b.url)
    )


def url_user(url: str) -> str:
    """The broker user an ``amqp://`` URL logs in as (aio-pika's default, ``guest``, when it names none).

    Of a list of URLs (a cluster), the first one's: list the same user in each.
    """
    urls = split_urls(url)
    url = urls[0] if urls else url
    _scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return "guest"
    creds = rest.rpartition("@")[0]
    return urllib.parse.unquote(creds.split(":", 1)[0]) or "guest"


def redact_urls(text: str) -> str:
    """Every URL of ``[broker] url``, passwords hidden, comma-separated."""
    return ", ".join(redact_url(url) for url in split_urls(text))


def broker_address(url: str) -> str:
    """Where a URL points, without its user and password: ``amqp://host:port/vhost``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    location = rest.rpartition("@")[2]
    return f"{scheme}://{location.split('?', 1)[0]}"


def redact_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"
