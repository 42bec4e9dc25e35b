"""carod.node.machine: the machine ad's totals from the config, and the live ad's free and total resources."""

from __future__ import annotations

import classad2
import pytest

from carod import config as configuration
from carod.errors import ConfigError
from carod.node import machine
from carod.node.resources import Resources, Totals
from carod.wire.jobad import Request


def config_with(**machine_attrs: str) -> configuration.Config:
    text = "[machine]\n" + "".join(f"{k} = {v}\n" for k, v in machine_attrs.items())
    return configuration.parse(text, environ={})


def test_totals_come_from_the_configured_ad() -> None:
    cfg = config_with(Cpus="3", Memory="2048", Disk="100")
    totals = machine.totals(machine.detect(cfg), cfg)
    assert totals == Totals(cpus=3, memory_mib=2048, disk_kib=100, slots=3)
    assert machine.disk_is_fixed(cfg)


@pytest.mark.parametrize(("name", "value"), [("Cpus", "0"), ("Memory", '"lots"'), ("Disk", "-1")])
def test_totals_refuse_what_is_not_a_resource(name: str, value: str) -> None:
    cfg = config_with(**{name: value})
    with pytest.raises(ConfigError, match=f"\\[machine\\] {name}"):
        machine.totals(machine.detect(cfg), cfg)


def test_live_ad_shows_free_and_total() -> None:
    cfg = config_with(Cpus="4", Memory="4096", Disk="1000000", BigFree="Memory >= 4000")
    ad = machine.detect(cfg)
    res = Resources(machine.totals(ad, cfg))
    res.reserve("job", Request(cpus=1.5, memory_mib=1000))
    machine.update(ad, res, disk_available_kib=None)
    values = {k: ad.eval(k) for k in ("Cpus", "Memory", "TotalCpus", "TotalMemory", "JobsRunning", "BigFree", "State")}
    assert values == {
        "Cpus": 2.5,
        "Memory": 3096,
        "TotalCpus": 4,
        "TotalMemory": 4096,
        "JobsRunning": 1,
        "BigFree": False,
        "State": "Claimed",
    }
    assert 0 <= ad.eval("ClockMin") < 1440 and 0 <= ad.eval("ClockDay") <= 6
    machine.update(ad, res, disk_available_kib=None, idle=True)
    assert (ad.eval("Cpus"), ad.eval("JobsRunning"), ad.eval("BigFree")) == (4, 0, True)


@pytest.mark.parametrize("policy", ["none", "outbound", "services", "host"])
def test_the_ad_says_the_network_policy_so_requirements_can_ask_for_it(policy: str) -> None:
    cfg = configuration.parse(f"[sandbox]\nnetwork = {policy}\n", environ={})
    ad = machine.detect(cfg)
    assert ad.eval("NetworkPolicy") == policy
    ad["WantsServices"] = classad2.ExprTree('NetworkPolicy == "services"')
    assert ad.eval("WantsServices") is (policy == "services")


def test_the_network_policy_is_what_jobs_really_get_unless_machine_sets_it() -> None:
    cfg = configuration.parse("[sandbox]\nnetwork = none\n", environ={})
    ad = machine.detect(cfg)
    machine.set_network_policy(ad, cfg, "host")  # no bubblewrap: jobs share the host's namespace
    assert ad.eval("NetworkPolicy") == "host"
    cfg = configuration.parse('[sandbox]\nnetwork = none\n[machine]\nNetworkPolicy = "audited"\n', environ={})
    ad = machine.detect(cfg)
    machine.set_network_policy(ad, cfg, "host")
    assert ad.eval("NetworkPolicy") == "audited"
