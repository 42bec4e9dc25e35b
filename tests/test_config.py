"""carod.config: the INI file, its checks (the [sandbox] section's too) and the environment overrides.

Every call passes ``environ`` explicitly so the host's CAROD_* variables
cannot change the outcome.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from carod import config
from carod import config as configuration
from carod.config import BrokerConfig, Config, NodeConfig
from carod.errors import ConfigError

NO_ENV: Mapping[str, str] = {}


def parse(text: str, environ: Mapping[str, str] = NO_ENV) -> Config:
    return config.parse(text, source="test.ini", environ=environ)


def refused(text: str, environ: Mapping[str, str] = NO_ENV) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text, environ)
    return str(info.value)


@pytest.fixture
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="carod-config-") as path:
        yield Path(path)


# ---------------------------------------------------------------- defaults


def test_empty_text_gives_the_defaults() -> None:
    cfg = parse("")
    assert cfg.broker == BrokerConfig()
    assert cfg.node == NodeConfig()
    assert cfg.machine == ()
    assert cfg.source == "test.ini"
    assert cfg.broker.url == "amqp://guest:guest@127.0.0.1:5672/"
    assert cfg.broker.queue_type == "quorum"
    assert cfg.node.job_user == "nobody"
    assert cfg.node.start == "TRUE"


def test_values_are_converted_to_their_types() -> None:
    cfg = parse(
        "[broker]\nqueue = jobs\nprefetch = 2\nconfirm_timeout_s = 2.5\n"
        '[node]\nslots = 4\nsandbox_root = /srv/boxes\nname = n1\nstart = TARGET.Owner == "alice"\n'
    )
    assert cfg.broker.queue == "jobs"
    assert cfg.broker.prefetch == 2
    assert cfg.broker.confirm_timeout_s == 2.5
    assert cfg.node.slots == 4
    assert cfg.node.sandbox_root == Path("/srv/boxes")
    assert cfg.node_name == "n1"
    assert cfg.node.start == 'TARGET.Owner == "alice"'


def test_the_node_name_defaults_to_the_host_name() -> None:
    cfg = parse("")
    assert cfg.node_name == socket.gethostname()


def test_slots_and_prefetch_defaults_follow_the_machine() -> None:
    cfg = parse("")
    assert cfg.slots_for(8) == 8
    assert cfg.slots_for(0) == 1
    assert cfg.prefetch_for(3) == 3
    cfg = parse("[node]\nslots = 4\n[broker]\nprefetch = 2\n")
    assert cfg.slots_for(8) == 4
    assert cfg.prefetch_for(4) == 2


# ---------------------------------------------------------------- unknown names


def test_unknown_section_is_refused() -> None:
    message = refused("[nodes]\nslots = 2\n")
    assert "[nodes]" in message
    assert "unknown section" in message


def test_unknown_key_is_refused_naming_it() -> None:
    message = refused("[node]\nslotz = 2\n")
    assert "[node] slotz" in message
    assert "unknown key" in message


def test_unknown_broker_key_is_refused_naming_it() -> None:
    assert "[broker] uri" in refused("[broker]\nuri = amqp://x/\n")


def test_keys_are_case_sensitive() -> None:
    assert "[node] Slots" in refused("[node]\nSlots = 2\n")


def test_syntax_error_names_the_source() -> None:
    assert "test.ini" in refused("slots = 2\n")
    assert "test.ini" in refused("[node]\nslots = 2\nslots = 3\n")


# ---------------------------------------------------------------- types


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[node]\nslots = many\n", "[node] slots"),
        ("[node]\nslots = 2.5\n", "[node] slots"),
        ("[broker]\nprefetch = \n", "[broker] prefetch"),
        ("[broker]\nconfirm_timeout_s = soon\n", "[broker] confirm_timeout_s"),
        ("[broker]\nconfirm_timeout_s = nan\n", "[broker] confirm_timeout_s"),
        ("[node]\nkill_grace_s = inf\n", "[node] kill_grace_s"),
        ("[node]\nsandbox_root =\n", "[node] sandbox_root"),
    ],
)
def test_wrong_type_is_refused_naming_the_key(text: str, key: str) -> None:
    message = refused(text)
    assert key in message
    assert "expected" in message


def test_wrong_type_message_shows_the_value() -> None:
    assert "'many'" in refused("[node]\nslots = many\n")


# ---------------------------------------------------------------- checks


def test_prefetch_above_slots_is_refused() -> None:
    message = refused("[node]\nslots = 2\n[broker]\nprefetch = 3\n")
    assert "[broker] prefetch" in message
    assert "[node] slots" in message


def test_prefetch_equal_to_slots_is_fine() -> None:
    assert parse("[node]\nslots = 2\n[broker]\nprefetch = 2\n").broker.prefetch == 2


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_queue_types_accepted(queue_type: str) -> None:
    assert parse(f"[broker]\nqueue_type = {queue_type}\n").broker.queue_type == queue_type


@pytest.mark.parametrize("queue_type", ["stream", "lazy", "Quorum", ""])
def test_other_queue_types_refused(queue_type: str) -> None:
    assert "[broker] queue_type" in refused(f"[broker]\nqueue_type = {queue_type}\n")


@pytest.mark.parametrize("user", ["root", "0", ""])
def test_job_user_root_or_empty_is_refused(user: str) -> None:
    assert "[node] job_user" in refused(f"[node]\njob_user = {user}\n")


@pytest.mark.parametrize("key", ["sandbox_root", "state_dir"])
def test_relative_directories_are_refused(key: str) -> None:
    message = refused(f"[node]\n{key} = var/lib/carod\n")
    assert f"[node] {key}" in message
    assert "absolute" in message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[broker]\nurl = http://example.org/\n", "[broker] url"),
        ("[broker]\nqueue =\n", "[broker] queue"),
        ("[broker]\nprefetch = -1\n", "[broker] prefetch"),
        ("[broker]\nmax_offers = -1\n", "[broker] max_offers"),
        ("[broker]\nconfirm_timeout_s = 0\n", "[broker] confirm_timeout_s"),
        ("[broker]\nconnect_timeout_s = -1\n", "[broker] connect_timeout_s"),
        ("[broker]\nunmatched_delay_s = -0.5\n", "[broker] unmatched_delay_s"),
        ("[node]\nslots = -1\n", "[node] slots"),
        ("[node]\ndrain_timeout_s = -1\n", "[node] drain_timeout_s"),
        ("[node]\nkill_grace_s = -1\n", "[node] kill_grace_s"),
        ("[node]\nmax_input_mib = 0\n", "[node] max_input_mib"),
        ("[node]\nmax_input_files = 0\n", "[node] max_input_files"),
        ("[node]\nmax_result_mib = -5\n", "[node] max_result_mib"),
        ("[node]\nlog_level = LOUD\n", "[node] log_level"),
        ("[node]\nlog_format = xml\n", "[node] log_format"),
        ("[node]\nevent_loop = trio\n", "[node] event_loop"),
        ("[node]\nevent_loop = UVLOOP\n", "[node] event_loop"),
        ("[node]\ndefault_request_memory_mib = 0\n", "[node] default_request_memory_mib"),
        ("[broker]\ndelivery_limit = -1\n", "[broker] delivery_limit"),
        ("[pool]\nexchange = amq.topic\n", "[pool] exchange"),
        ("[pool]\nadvertise_interval_s = 0\n", "[pool] advertise_interval_s"),
        ("[pool]\nadvertise_interval_s = 10\nnode_timeout_s = 5\n", "[pool] node_timeout_s"),
        ("[pool]\ncolour = blue\n", "[pool] colour"),
    ],
)
def test_out_of_range_values_are_refused_naming_the_key(text: str, key: str) -> None:
    assert key in refused(text)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_event_loops_accepted(loop: str) -> None:
    assert parse(f"[node]\nevent_loop = {loop}\n").node.event_loop == loop


def test_a_renamed_key_says_where_it_went() -> None:
    message = refused("[sandbox]\ndefault_memory_mib = 256\n")
    assert "[sandbox] default_memory_mib: renamed to [node] default_request_memory_mib" in message


@pytest.mark.parametrize("start", ["TARGET.Owner ==", "(", "&& TRUE"])
def test_bad_start_expression_is_refused(start: str) -> None:
    message = refused(f"[node]\nstart = {start}\n")
    assert "[node] start" in message
    assert "ClassAd expression" in message


def test_bad_machine_expression_is_refused_naming_the_key() -> None:
    message = refused('[machine]\nHasGpu = TRUE\nPool = "blue" &&\n')
    assert "[machine] Pool" in message
    assert "HasGpu" not in message


def test_bad_machine_attribute_name_is_refused() -> None:
    assert "[machine] has-gpu" in refused("[machine]\nhas-gpu = TRUE\n")


def test_machine_keys_keep_their_case_and_order() -> None:
    cfg = parse('[machine]\nHasGPU = TRUE\nPoolName = "blue"\nmemory = 4096\n')
    assert cfg.machine == (("HasGPU", "TRUE"), ("PoolName", '"blue"'), ("memory", "4096"))


# ---------------------------------------------------------------- environment


def test_environment_overrides_the_file() -> None:
    env = {"CAROD_BROKER_URL": "amqps://u:p@broker.example:5671/vh", "CAROD_NODE_SLOTS": "3"}
    cfg = parse("[broker]\nurl = amqp://guest:guest@localhost/\n[node]\nslots = 8\n", env)
    assert cfg.broker.url == "amqps://u:p@broker.example:5671/vh"
    assert cfg.node.slots == 3


def test_environment_applies_without_a_file() -> None:
    cfg = parse("", {"CAROD_BROKER_QUEUE": "other"})
    assert cfg.broker.queue == "other"


def test_unrelated_environment_is_ignored() -> None:
    cfg = parse("", {"CAROD_NODE_BOGUS": "1", "BROKER_URL": "http://nope/", "carod_broker_url": "http://nope/"})
    assert cfg == parse("")


def test_bad_environment_value_names_the_key() -> None:
    assert "[node] slots" in refused("", {"CAROD_NODE_SLOTS": "lots"})
    assert "[broker] url" in refused("", {"CAROD_BROKER_URL": "http://example.org/"})


def test_empty_environ_means_no_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("CAROD_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CAROD_BROKER_QUEUE", "from-os-environ")
    assert parse("").broker.queue == "grid"
    # Without environ, os.environ is read.
    assert config.parse("", source="x").broker.queue == "from-os-environ"


# ---------------------------------------------------------------- effective


def test_effective_hides_the_password() -> None:
    cfg = parse("[broker]\nurl = amqp://carod:s3cr3t@broker.example:5672/grid\n")
    text = config.effective(cfg)
    assert "s3cr3t" not in text
    assert "url = amqp://carod:***@broker.example:5672/grid" in text


def test_effective_lists_every_section() -> None:
    cfg = parse("[node]\nslots = 2\n[machine]\nHasGpu = TRUE\n")
    text = config.effective(cfg)
    assert "[broker]\n" in text
    assert "[node]\n" in text
    assert "slots = 2\n" in text
    assert "[machine]\nHasGpu = TRUE\n" in text


def test_effective_is_parseable_again() -> None:
    cfg = parse('[node]\nslots = 2\nstart = TARGET.Owner =?= "alice"\n[machine]\nHasGpu = TRUE\n')
    again = config.parse(config.effective(cfg), source="again", environ=NO_ENV)
    assert again.node == cfg.node
    assert again.machine == cfg.machine


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("amqp://u:pw@h/", "amqp://u:***@h/"),
        ("amqp://u:p@ss@h:5672/", "amqp://u:***@h:5672/"),
        ("amqp://h:5672/", "amqp://h:5672/"),
        ("not a url", "not a url"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert config.redact_url(url) == expected


# ---------------------------------------------------------------- load


def test_load_reads_a_file(scratch: Path) -> None:
    path = scratch / "carod.ini"
    path.write_text("[node]\nslots = 3\n", encoding="utf-8")
    cfg = config.load(path, environ=NO_ENV)
    assert cfg.node.slots == 3
    assert cfg.source == str(path)


def test_load_missing_file_names_the_path(scratch: Path) -> None:
    path = scratch / "missing.ini"
    with pytest.raises(ConfigError) as info:
        config.load(path, environ=NO_ENV)
    assert str(path) in str(info.value)


def test_load_non_utf8_file_names_the_path(scratch: Path) -> None:
    path = scratch / "latin1.ini"
    path.write_bytes(b"[node]\nname = caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        config.load(path, environ=NO_ENV)
    assert str(path) in str(info.value)
    assert "UTF-8" in str(info.value)


def test_load_errors_name_the_file_and_key(scratch: Path) -> None:
    path = scratch / "bad.ini"
    path.write_text("[node]\nslotz = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"\[node\] slotz"):
        config.load(os.fspath(path), environ=NO_ENV)


# ---------------------------------------------------------------- [sandbox]


@pytest.mark.parametrize(
    ("text", "policy"),
    [
        ("", "none"),
        ("network = none\n", "none"),
        ("network = outbound\n", "outbound"),
        ("network = services\n", "services"),
        ("network = host\n", "host"),
        # Old files keep working: the boolean of before meant the host's namespace or loopback only.
        ("network = yes\n", "host"),
        ("network = True\n", "host"),
        ("network = no\n", "none"),
        ("network = off\n", "none"),
    ],
)
def test_network_policy(text: str, policy: str) -> None:
    cfg = configuration.parse(f"[sandbox]\n{text}", environ={})
    assert cfg.sandbox.network == policy
    assert f"network = {policy}" in configuration.effective(cfg)


def test_network_policy_from_the_environment() -> None:
    cfg = configuration.parse("", environ={"CAROD_SANDBOX_NETWORK": "outbound"})
    assert cfg.sandbox.network == "outbound"
    assert configuration.service_port_range(cfg.sandbox.service_ports) == (61000, 65535)


def test_sandbox_section_parses() -> None:
    cfg = configuration.parse(
        "[node]\nslots = 2\n[sandbox]\nisolation = none\ncgroups = v1\nnetwork = services\n"
        "slot_users = carod1, carod2\nmax_job_duration_s = 3600\n",
        environ={},
    )
    assert cfg.sandbox.isolation == "none" and cfg.sandbox.cgroups == "v1" and cfg.sandbox.network == "services"
    assert cfg.sandbox.slot_users == ("carod1", "carod2")
    assert "slot_users = carod1, carod2" in configuration.effective(cfg)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[sandbox]\nisolation = docker\n", "[sandbox] isolation"),
        ("[sandbox]\ncgroups = v3\n", "[sandbox] cgroups"),
        ("[sandbox]\nnetwork = maybe\n", "[sandbox] network"),
        ("[sandbox]\nnetwork = 2\n", "[sandbox] network"),
        ("[sandbox]\nservice_ports = 61000\n", "[sandbox] service_ports"),
        ("[sandbox]\nservice_ports = 1000-2000\n", "[sandbox] service_ports"),
        ("[sandbox]\nservice_ports = 62000-61000\n", "[sandbox] service_ports"),
        ("[sandbox]\nservice_ports = 61000-70000\n", "[sandbox] service_ports"),
        ("[sandbox]\nservice_ports_per_job = 0\n", "[sandbox] service_ports_per_job"),
        ("[sandbox]\nservice_ports = 61000-61009\nservice_ports_per_job = 11\n", "[sandbox] service_ports_per_job"),
        ("[sandbox]\ntmp_mib = 0\n", "[sandbox] tmp_mib"),
        ("[sandbox]\nmax_job_duration_s = -1\n", "[sandbox] max_job_duration_s"),
        ("[sandbox]\nslot_users = a, root\n", "[sandbox] slot_users"),
        ("[sandbox]\nslot_users = a, a\n", "[sandbox] slot_users"),
        ("[node]\nslots = 3\n[sandbox]\nslot_users = a, b\n", "[sandbox] slot_users"),
        ("[sandbox]\nbogus = 1\n", "[sandbox] bogus"),
    ],
)
def test_bad_sandbox_settings_name_the_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        configuration.parse(text, environ={})


# ---------------------------------------------------------------- [sandbox] disk (issue 14)


@pytest.mark.parametrize(
    ("line", "key"),
    [("disk_quota = sometimes", "[sandbox] disk_quota"), ("disk_image_mib = 100", "[sandbox] disk_image_mib")],
)
def test_bad_disk_settings_name_their_key(line: str, key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        configuration.parse(f"[broker]\nurl = amqp://x/\n[sandbox]\n{line}\n")


def test_admins_are_broker_user_names_separated_by_commas_or_spaces() -> None:
    config = configuration.parse("[node]\nadmins = ops, alice  bob,\n", source="test", environ={})
    assert config.node.admins == ("ops", "alice", "bob")
    assert configuration.parse("", source="test", environ={}).node.admins == ()
    assert configuration.url_user("amqp://ops:secret@broker:5672/") == "ops"
    assert configuration.url_user("amqp://al%40ice:pw@broker/") == "al@ice"
    assert configuration.url_user("amqp://broker/") == "guest"  # as aio-pika logs in without one
    assert configuration.url_user("amqp://ops:pw@a:5672/, amqp://ops:pw@b:5673/") == "ops"  # a cluster's list


# ---------------------------------------------------------------- a broker cluster (issue 19)


def test_one_broker_url_is_one_broker() -> None:
    cfg = parse("[broker]\nurl = amqp://u:p@broker.example:5672/vh\n")
    assert cfg.broker.urls == ("amqp://u:p@broker.example:5672/vh",)


@pytest.mark.parametrize(
    "value",
    [
        "amqp://u:p@a:5672/, amqp://u:p@b:5673/, amqps://u:p@c:5671/",
        "amqp://u:p@a:5672/ amqp://u:p@b:5673/  amqps://u:p@c:5671/",
        "amqp://u:p@a:5672/,amqp://u:p@b:5673/,\n  amqps://u:p@c:5671/",
    ],
)
def test_several_broker_urls_separated_by_commas_spaces_or_lines(value: str) -> None:
    cfg = parse(f"[broker]\nurl = {value}\n")
    assert cfg.broker.urls == ("amqp://u:p@a:5672/", "amqp://u:p@b:5673/", "amqps://u:p@c:5671/")


def test_several_broker_urls_from_the_environment() -> None:
    cfg = parse("[broker]\nurl = amqp://u:p@a/\n", {"CAROD_BROKER_URL": "amqp://u:p@b:1/,amqp://u:p@c:2/"})
    assert cfg.broker.urls == ("amqp://u:p@b:1/", "amqp://u:p@c:2/")


def test_a_broker_listed_twice_is_refused() -> None:
    message = refused("[broker]\nurl = amqp://u:secret@a/, amqp://u:secret@a/\n")
    assert "[broker] url" in message and "twice" in message
    assert "secret" not in message


@pytest.mark.parametrize("value", ["", " , ,", "amqp://u:p@a/, http://b/", "amqp://u:p@a/, b:5672"])
def test_every_broker_url_must_be_amqp(value: str) -> None:
    assert "[broker] url" in refused(f"[broker]\nurl = {value}\n")


def test_a_password_with_a_comma_is_not_shown_when_refused() -> None:
    """An unescaped comma splits the URL; the error must not print the password's tail."""
    message = refused("[broker]\nurl = amqp://carod:pass,word-tail@a:5672/\n")
    assert "[broker] url" in message and "%2C" in message
    assert "word-tail" not in message and "pass" not in message.replace("password", "")


def test_effective_hides_every_password_of_a_cluster() -> None:
    cfg = parse("[broker]\nurl = amqp://carod:s3cr3t@a:5672/, amqp://carod:s3cr3t@b:5673/\n")
    text = config.effective(cfg)
    assert "s3cr3t" not in text
    assert "url = amqp://carod:***@a:5672/, amqp://carod:***@b:5673/" in text
    assert config.parse(text, source="again", environ=NO_ENV).broker.urls == (
        "amqp://carod:***@a:5672/",
        "amqp://carod:***@b:5673/",
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("amqp://u:pw@h:5672/vh", "amqp://h:5672/vh"),
        ("amqps://u:p@ss@h/?heartbeat=5", "amqps://h/"),
        ("amqp://h:5672/", "amqp://h:5672/"),
    ],
)
def test_broker_address_has_no_credentials(url: str, expected: str) -> None:
    assert config.broker_address(url) == expected


# ---------------------------------------------------------------- TLS keys (docs/operations.md, "TLS")

TLS_URL = "amqps://node:pw@broker.example:5671/"


def test_tls_keys_default_to_none_and_hostname_verification_on() -> None:
    b = parse("").broker
    assert (b.ca_file, b.cert_file, b.key_file, b.verify_hostname, b.auth) == ("", "", "", True, "plain")


def test_tls_keys_parse(scratch: Path) -> None:
    for name in ("ca.pem", "node.pem", "node.key"):
        (scratch / name).write_text("x")
    b = parse(
        f"[broker]\nurl = amqps://node-1@broker.example/\nca_file = {scratch}/ca.pem\ncert_file = {scratch}/node.pem\n"
        f"key_file = {scratch}/node.key\nverify_hostname = no\nauth = external\n"
    ).broker
    assert (b.ca_file, b.cert_file, b.key_file) == (f"{scratch}/ca.pem", f"{scratch}/node.pem", f"{scratch}/node.key")
    assert b.verify_hostname is False and b.auth == "external"


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ("ca_file = /nonexistent/ca.pem", "[broker] ca_file: cannot read /nonexistent/ca.pem: No such file"),
        ("cert_file = /nonexistent/c.pem", "[broker] cert_file: cannot read /nonexistent/c.pem"),
        ("ca_file = ca.pem", "[broker] ca_file: must be an absolute path"),
        ("ca_file = /tmp", "[broker] ca_file: cannot read /tmp: Is a directory"),
        ("key_file = /etc/hostname", "[broker] key_file: set only with cert_file"),
        ("auth = external", "[broker] auth: external takes the user from the client certificate; set cert_file"),
        ("auth = kerberos", "[broker] auth: must be one of plain, external"),
        ("verify_hostname = maybe", "[broker] verify_hostname: expected yes or no"),
    ],
)
def test_bad_tls_keys_name_the_key(lines: str, message: str) -> None:
    assert message in refused(f"[broker]\nurl = {TLS_URL}\n{lines}\n")


@pytest.mark.parametrize("url", ["amqps://broker.example/", "amqps://:pw@broker.example/", "amqps://b/x@y"])
def test_external_needs_the_certificates_user_in_the_url(url: str) -> None:
    said = refused(f"[broker]\nurl = {url}\ncert_file = /etc/hostname\nauth = external\n")
    assert said.startswith("[broker] url: with auth = external, name the client certificate's broker user")
    assert parse("[broker]\nurl = amqps://node-1@b/\ncert_file = /etc/hostname\nauth = external\n").broker.auth == (
        "external"
    )
    assert configuration.url_user("amqps://node-1@b/") == "node-1"


def test_tls_keys_need_an_amqps_url() -> None:
    said = refused("[broker]\nurl = amqp://node:pw@broker.example/\nca_file = /etc/hostname\n")
    assert said == "[broker] ca_file: only for amqps:// URLs, and [broker] url is 'amqp://node:***@broker.example/'"


@pytest.mark.parametrize(
    ("query", "key"),
    [
        ("cafile=/x", "ca_file"),
        ("certfile=/x", "cert_file"),
        ("no_verify_ssl=1", "verify_hostname"),
        ("auth=EXTERNAL", "auth"),
    ],
)
def test_tls_options_in_the_url_are_refused(query: str, key: str) -> None:
    name = query.partition("=")[0]
    said = refused(f"[broker]\nurl = {TLS_URL}?heartbeat=30&{query}\n")
    assert said == f"[broker] url: {name}= is not read from the URL; set [broker] {key}"


def test_tls_keys_come_from_the_environment_too() -> None:
    env = {"CAROD_BROKER_URL": TLS_URL, "CAROD_BROKER_CA_FILE": "/etc/hostname"}
    assert parse("", env).broker.ca_file == "/etc/hostname"


def test_the_client_tools_get_the_nodes_tls_keys_in_their_url() -> None:
    b = configuration.BrokerConfig(
        url="amqps://node1@a:5671/, amqp://u:p@b/", ca_file="/etc/ca.pem", cert_file="/etc/c.pem", auth="external"
    )
    assert configuration.client_urls(b) == (
        "amqps://node1@a:5671/?cafile=%2Fetc%2Fca.pem&certfile=%2Fetc%2Fc.pem&auth=EXTERNAL, amqp://u:p@b/"
    )
    assert configuration.client_urls(configuration.BrokerConfig(url="amqp://u:p@h/")) == "amqp://u:p@h/"
