"""carod.sandbox.network: the service ports' blocks, slirp4netns' command line, the tools' detection."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from carod import config as configuration
from carod.errors import StartupError
from carod.sandbox import network

TOOLS = network.Tools("/usr/bin/slirp4netns", "/usr/bin/unshare", "/usr/bin/nsenter", services=True)


def test_blocks_are_disjoint_and_come_back() -> None:
    blocks = network.PortBlocks(61000, 61255, 64)
    taken = [blocks.take() for _ in range(4)]
    assert taken == [range(61000, 61064), range(61064, 61128), range(61128, 61192), range(61192, 61256)]
    assert blocks.take() is None  # every port is some sandbox's: nobody shares one
    blocks.give_back(range(61064, 61128))
    assert blocks.take() == range(61064, 61128)


def test_a_partial_block_at_the_end_is_not_used() -> None:
    blocks = network.PortBlocks(61000, 61100, 64)
    assert blocks.total == 1 and blocks.take() == range(61000, 61064) and blocks.take() is None


def test_the_node_needs_a_block_per_running_job_and_per_sandbox_started_ahead() -> None:
    cfg = configuration.parse("[sandbox]\nservice_ports = 61000-61639\nservice_ports_per_job = 64\n", environ={})
    assert network.PortBlocks.for_node(cfg, 4).total == 10
    with pytest.raises(StartupError, match=r"\[sandbox\] service_ports: .* 5 slots need 11") as caught:
        network.PortBlocks.for_node(cfg, 5)
    assert caught.value.exit_code == 78


def test_slirp4netns_runs_private_mounts_no_host_loopback() -> None:
    argv = network.slirp_argv(TOOLS, netns_fd=7, ready_fd=8, exit_fd=9, api_socket=Path("/tmp/x/api.sock"))
    # Its --enable-sandbox unmounts what it does not need: in a private mount namespace, never the host's.
    assert argv[:5] == ["/usr/bin/unshare", "--mount", "--propagation", "private", "--"]
    slirp = argv[5:]
    assert slirp[0] == "/usr/bin/slirp4netns"
    for flag in ("--disable-host-loopback", "--enable-sandbox", "--enable-seccomp", "--configure"):
        assert flag in slirp
    assert slirp[slirp.index("--exit-fd") + 1] == "9" and slirp[slirp.index("--ready-fd") + 1] == "8"
    assert slirp[-2:] == ["/proc/self/fd/7", "tap0"]


def test_the_port_block_becomes_the_sandboxs_ephemeral_ports() -> None:
    argv = network.port_range_script(range(61064, 61128))
    assert argv[-2:] == ["61064", "61127"]
    assert "/proc/sys/net/ipv4/ip_local_port_range" in argv[2]


@pytest.mark.parametrize("policy", ["none", "host"])
def test_no_helper_for_none_and_host(policy: str) -> None:
    cfg = configuration.parse(f"[sandbox]\nnetwork = {policy}\n", environ={})
    assert network.detect(cfg, bwrap=None, bash=None) is None


@pytest.mark.parametrize("policy", ["outbound", "services"])
def test_helped_policies_need_bubblewrap_and_bash(policy: str) -> None:
    cfg = configuration.parse(f"[sandbox]\nnetwork = {policy}\n", environ={})
    with pytest.raises(StartupError, match=rf"\[sandbox\] network = {policy} needs bubblewrap") as caught:
        network.detect(cfg, bwrap=None, bash="/bin/bash")
    assert caught.value.exit_code == 78
    with pytest.raises(StartupError, match=rf"\[sandbox\] network = {policy} needs bash"):
        network.detect(cfg, bwrap="/usr/bin/bwrap", bash=None)


def test_missing_slirp4netns_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(network, "_ROOT_PATH", "/nonexistent")
    cfg = configuration.parse("[sandbox]\nnetwork = outbound\n", environ={})
    with pytest.raises(StartupError, match=r"\[sandbox\] network = outbound: slirp4netns is not installed"):
        network.detect(cfg, bwrap="/usr/bin/bwrap", bash="/bin/bash")


def test_service_ports_must_avoid_the_hosts_ephemeral_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(network, "host_ephemeral_range", lambda: (32768, 60999))
    cfg = configuration.parse("[sandbox]\nnetwork = services\nservice_ports = 60000-61000\n", environ={})
    if shutil.which("slirp4netns", path=network._ROOT_PATH) is None:
        pytest.fail("slirp4netns is not installed (scripts/bootstrap installs it)")
    with pytest.raises(StartupError, match=r"\[sandbox\] service_ports: 60000-61000 overlaps") as caught:
        network.detect(cfg, bwrap="/usr/bin/bwrap", bash="/bin/bash")
    assert caught.value.exit_code == 78


def test_host_ephemeral_range_reads_the_kernel(tmp_path: Path) -> None:
    path = tmp_path / "range"
    path.write_text("40000\t50000\n")
    assert network.host_ephemeral_range(path) == (40000, 50000)
    assert network.host_ephemeral_range(tmp_path / "missing") == (32768, 60999)
