"""The ``carod`` command: a thin layer over the Server (carod.node) and the client's commands (carod.client).

    carod [--config FILE]               run the daemon in the foreground
    carod machine-ad [--config FILE]    print this node's machine ClassAd
    carod check-config FILE             validate a config, print the effective settings
    carod submit [options] CMD [ARG...] submit a job and follow it
    carod status [-l NODE] [--json]     the pool: nodes, free resources, jobs
    carod q [-af ATTR...] [-format FMT ATTR]... [-constraint EXPR] [--json]
                                        the jobs in the pool (condor_q)
    carod rm ID... | -a | -constraint EXPR [--reason TEXT]
                                        remove jobs: running ones are killed (condor_rm)
    carod hold ID... | -a | -constraint EXPR [--reason TEXT]
                                        hold jobs: kept by the broker until released (condor_hold)
    carod release ID... | -a | -constraint EXPR
                                        release held jobs: they run again (condor_release)

The client commands (submit, status, q, rm, ...) take the broker URL, the job queue
and the pool exchange from the node's config (--config FILE, $CAROD_CONFIG or
/etc/carod/carod.conf when present); their flags override it (:func:`client_settings`).

Exit codes are listed in docs/operations.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from carod import __version__
from carod import config as configuration
from carod.client import commands
from carod.client.commands import fail
from carod.edges import logs
from carod.errors import EXIT_CONFIG, EXIT_OK, ConfigError, StartupError
from carod.node import machine
from carod.node.server import Server
from carod.wire.classads import to_classad_text

DEFAULT_CONFIG = "/etc/carod/carod.conf"


def _load_config(path: str | None) -> configuration.Config:
    path = path or os.environ.get("CAROD_CONFIG")
    if path is None and Path(DEFAULT_CONFIG).exists():
        path = DEFAULT_CONFIG
    if path is None:
        return configuration.parse("", source="<defaults>")
    return configuration.load(path)


def _client_config(path: str | None) -> configuration.Config:
    """The config the client commands read: an explicit one must be readable; the default one is skipped when not."""
    path = path or os.environ.get("CAROD_CONFIG")
    if path is None and Path(DEFAULT_CONFIG).exists():
        if not os.access(DEFAULT_CONFIG, os.R_OK):
            print(
                f"carod: note: {DEFAULT_CONFIG} is not readable by this user; using the flags and defaults",
                file=sys.stderr,
            )
            return configuration.parse("", source="<defaults>")
        path = DEFAULT_CONFIG
    if path is None:
        return configuration.parse("", source="<defaults>")
    return configuration.load(path)


#: What a client command's option is called -> where its value is in the node's config, when the flag is not given.
CLIENT_SETTINGS: dict[str, Callable[[configuration.Config], str]] = {
    "url": lambda config: configuration.client_urls(config.broker),
    "queue": lambda config: config.broker.queue,
    "pool_exchange": lambda config: config.pool.exchange,
}


def client_settings(args: argparse.Namespace) -> int:
    """Fill the client options left unset on the command line from the node's config; 0, or the exit code.

    Order: the flag, then ``CAROD_BROKER_URL`` and the other ``CAROD_<SECTION>_<KEY>`` variables,
    then the config file, then the built-in defaults. Applied to every subcommand whose parser
    went through :func:`client_options`.
    """
    try:
        config = _client_config(getattr(args, "config", None))
    except ConfigError as exc:
        return fail(f"config error: {exc}", EXIT_CONFIG)
    for option, setting in CLIENT_SETTINGS.items():
        if hasattr(args, option) and getattr(args, option) is None:
            setattr(args, option, setting(config))
    return EXIT_OK


def loop_factory(event_loop: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """What makes the daemon's loop, for ``[node] event_loop``. Raises ConfigError when uvloop is not importable."""
    if event_loop == "uvloop":
        try:
            import uvloop
        except ImportError as exc:
            raise ConfigError(
                f"[node] event_loop: uvloop cannot be imported ({exc}); install it or set event_loop = asyncio"
            ) from exc
        return uvloop.new_event_loop
    return asyncio.new_event_loop


# ---------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> int:
    try:
        config = _load_config(args.config)
        new_loop = loop_factory(config.node.event_loop)
    except ConfigError as exc:
        return fail(f"config error: {exc}", EXIT_CONFIG)
    logs.setup(config.node.log_level, config.node.log_format)
    server = Server(config, config_path=None if config.source == "<defaults>" else Path(config.source))
    try:
        with asyncio.Runner(loop_factory=new_loop) as runner:
            runner.run(server.serve())
    except StartupError as exc:
        return fail(str(exc), exc.exit_code)
    return EXIT_OK


def cmd_machine_ad(args: argparse.Namespace) -> int:
    try:
        config = _load_config(args.config)
    except ConfigError as exc:
        return fail(f"config error: {exc}", EXIT_CONFIG)
    sys.stdout.write(to_classad_text(machine.detect(config)))
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = configuration.load(args.file)
    except ConfigError as exc:
        return fail(f"config error: {exc}", EXIT_CONFIG)
    sys.stdout.write(configuration.effective(config))
    sys.stdout.write("\n# machine ad\n")
    sys.stdout.write(to_classad_text(machine.detect(config)))
    return EXIT_OK


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="carod", description="carod: the execute-node agent of a low-latency grid")
    parser.add_argument("--version", action="version", version=f"carod {__version__}")
    parser.add_argument("--config", "-c", help=f"config file (default: $CAROD_CONFIG or {DEFAULT_CONFIG})")
    parser.set_defaults(func=cmd_run)
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("run", help="run the daemon in the foreground (the default)")
    p.add_argument("--config", "-c", default=argparse.SUPPRESS, help="config file")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("machine-ad", help="print this node's machine ClassAd")
    p.add_argument("--config", "-c", default=argparse.SUPPRESS, help="config file")
    p.set_defaults(func=cmd_machine_ad)

    p = sub.add_parser("check-config", help="validate a config file and print the effective settings")
    p.add_argument("file")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("submit", help="submit a job and follow its replies")
    client_options(p)
    p.add_argument("--url", default=None, help="the broker (default: the config's [broker] url)")
    p.add_argument(
        "--queue", default=None, help="job queue, published on the default exchange (default: [broker] queue)"
    )
    p.add_argument("--exchange", default="", help="publish to this exchange instead (e.g. amq.direct)")
    p.add_argument("--routing-key", default=None, help="routing key with --exchange (e.g. grid_key)")
    p.add_argument(
        "-a",
        "--attribute",
        action="append",
        default=[],
        metavar="NAME=EXPR",
        help="a job attribute as ClassAd text, e.g. -a 'Out=\"job.out\"' -a 'Requirements=TRUE'",
    )
    p.add_argument(
        "-i",
        "--input",
        action="append",
        default=[],
        metavar="PATH",
        help="a file or directory to send in the input zip",
    )
    p.add_argument("-o", "--output-dir", help="where to unpack the results (default: job-<id>/)")
    p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds (exit 124)")
    p.add_argument("--json", action="store_true", help="one JSON object per event")
    p.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="stream the job's stdout/stderr as it runs (sets StreamOut/StreamErr), like condor_tail -f",
    )
    p.add_argument("cmd")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=commands.cmd_submit)

    p = sub.add_parser("status", help="the pool: each node's state, free resources and jobs (condor_status)")
    _pool_options(p)
    p.add_argument("-l", "--long", metavar="NODE", help="the whole machine ad of one node")
    p.add_argument("--json", action="store_true", help="one advert per line, as JSON")
    p.set_defaults(func=commands.cmd_status)

    p = sub.add_parser("q", help="the jobs in the pool: running, held and idle (condor_q)")
    _pool_options(p)
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="one job per line, as JSON")
    shown.add_argument(
        "-af",
        "-autoformat",
        dest="af",
        nargs="+",
        metavar="ATTR",
        help="these attributes or expressions of each job, space separated, one job a line",
    )
    shown.add_argument(
        "-format",
        dest="format",
        nargs=2,
        action="append",
        metavar=("FMT", "ATTR"),
        help="printf-style FMT applied to ATTR for each job (repeatable; no newline unless FMT has \\n)",
    )
    p.add_argument(
        "-constraint",
        dest="constraint",
        action="append",
        metavar="EXPR",
        help="only the jobs for which this ClassAd expression is true (repeated: all must be)",
    )
    p.set_defaults(func=commands.cmd_q)

    for name, func, what, reason in (
        ("rm", commands.cmd_rm, "remove jobs: running ones are killed and answered Removed", "RemoveReason"),
        ("hold", commands.cmd_hold, "hold jobs: stopped, answered Held, kept by the broker", "HoldReason"),
        ("release", commands.cmd_release, "release held jobs: back to the job queue, to run again", "the Idle reply"),
    ):
        p = sub.add_parser(name, help=f"{what} (condor_{name})")
        _pool_options(p)
        p.add_argument("--reason", default="", help=f"why (goes into {reason})")
        p.add_argument("-a", "--all", action="store_true", help="every job you may act on (yours; all for an admin)")
        p.add_argument("-constraint", "--constraint", metavar="EXPR", help="the jobs this ClassAd expression selects")
        p.add_argument("ids", nargs="*", metavar="ID", help="the jobs' message_ids")
        p.set_defaults(func=func)
    return parser


def client_options(p: argparse.ArgumentParser) -> None:
    """``--config``, and the node's config read for the options left unset (:func:`client_settings`)."""
    p.add_argument(
        "--config",
        "-c",
        default=argparse.SUPPRESS,
        help=f"the node's config, for the broker URL, queue and pool exchange (default: $CAROD_CONFIG or "
        f"{DEFAULT_CONFIG} when present)",
    )
    p.set_defaults(client_config=True)


def _pool_options(p: argparse.ArgumentParser) -> None:
    client_options(p)
    p.add_argument("--url", default=None, help="the broker (default: the config's [broker] url)")
    p.add_argument("--queue", default=None, help="the nodes consuming this job queue (default: [broker] queue)")
    p.add_argument("--all-queues", action="store_true", help="nodes of every job queue")
    p.add_argument("--pool-exchange", default=None, help="the nodes' pool exchange (default: [pool] exchange)")
    p.add_argument("--wait", type=float, default=2.0, help="seconds to wait for nodes to answer")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "client_config", False):
        code = client_settings(args)
        if code != EXIT_OK:
            return code
    try:
        result: int = args.func(args)
    except BrokenPipeError:  # e.g. `carod machine-ad | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
