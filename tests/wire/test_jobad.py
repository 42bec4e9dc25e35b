"""carod.wire.jobad: what a job ad asks carod to run, and the resources it requests."""

from __future__ import annotations

import signal
from collections.abc import Mapping

import classad2
import pytest

from carod.errors import JobHeld
from carod.wire import jobad
from carod.wire.classads import ad_from_headers
from carod.wire.jobad import (
    JobSpec,
    Request,
    apply_defaults,
    format_args_v2,
    job_spec,
    parse_args_v1,
    parse_args_v2,
    parse_env_v1,
    parse_env_v2,
    parse_signal,
)


def q(text: str) -> str:
    """A ClassAd string literal, as MRG Grid clients put it in a header."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


CMD = {"Cmd": q("/bin/echo")}


def spec_of(headers: Mapping[str, object]) -> JobSpec:
    """The path a message takes: headers -> ad -> defaults -> spec."""
    ad = ad_from_headers(headers)
    apply_defaults(ad)
    return job_spec(ad)


def held_reason(headers: Mapping[str, object]) -> str:
    with pytest.raises(JobHeld) as info:
        spec_of(headers)
    return info.value.reason


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ()),
        ("   ", ()),
        ("a", ("a",)),
        ("a b\tc\n d", ("a", "b", "c", "d")),
        ("  lead trail  ", ("lead", "trail")),
        ("'a b' c", ("a b", "c")),
        ("'it''s'", ("it's",)),
        ("''''", ("'",)),
        ("''", ("",)),
        ("a '' b", ("a", "", "b")),
        ("pre'fix suf'fix", ("prefix suffix",)),
        ('say "hi"', ("say", '"hi"')),
        ("'  spaced  '", ("  spaced  ",)),
    ],
)
def test_parse_args_v2(text: str, expected: tuple[str, ...]) -> None:
    assert parse_args_v2(text) == expected


@pytest.mark.parametrize("text", ["'open", "a 'b c", "'it''s"])
def test_parse_args_v2_unterminated_quote_is_held(text: str) -> None:
    with pytest.raises(JobHeld) as info:
        parse_args_v2(text)
    assert "Arguments" in info.value.reason
    assert "unterminated" in info.value.reason


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ()),
        ("a  b\tc", ("a", "b", "c")),
        ('say \\"hi\\"', ("say", '"hi"')),
        ("'not grouped'", ("'not", "grouped'")),
    ],
)
def test_parse_args_v1(text: str, expected: tuple[str, ...]) -> None:
    assert parse_args_v1(text) == expected


@pytest.mark.parametrize(
    "arguments",
    [
        ["plain"],
        ["with space", "x"],
        ["it's"],
        ["''"],
        [""],
        ["", "", "a"],
        ["tab\there", "new\nline"],
        ["'quoted'", 'dq"', "back\\slash"],
        ["  ", "a'b c'd"],
        [],
    ],
)
def test_format_args_v2_round_trips(arguments: list[str]) -> None:
    assert parse_args_v2(format_args_v2(arguments)) == tuple(arguments)


def test_format_args_v2_leaves_simple_args_bare() -> None:
    assert format_args_v2(["-n", "5", "file.txt"]) == "-n 5 file.txt"


def test_job_arguments_v2() -> None:
    assert spec_of({**CMD, "Arguments": q("Hello 'big grid'")}).arguments == ("Hello", "big grid")


def test_job_args_v1() -> None:
    assert spec_of({**CMD, "Args": q('-m \\"x\\"')}).arguments == ("-m", '"x"')


def test_job_arguments_wins_over_args() -> None:
    spec = spec_of({**CMD, "Args": q("old style"), "Arguments": q("'new style'")})
    assert spec.arguments == ("new style",)


def test_job_without_arguments_has_none() -> None:
    assert spec_of(CMD).arguments == ()


def test_job_arguments_must_be_a_string() -> None:
    reason = held_reason({**CMD, "Arguments": 5})
    assert "Arguments" in reason
    assert "string" in reason


def test_job_arguments_unterminated_quote_is_held() -> None:
    assert "Arguments" in held_reason({**CMD, "Arguments": q("'oops")})


# ---------------------------------------------------------------- environment


def test_parse_env_v2() -> None:
    assert parse_env_v2("A=1 'B=x y' C='it''s' D= E=a=b") == (
        ("A", "1"),
        ("B", "x y"),
        ("C", "it's"),
        ("D", ""),
        ("E", "a=b"),
    )
    assert parse_env_v2("") == ()


def test_parse_env_v1() -> None:
    assert parse_env_v1("A=1;B=x y;;C=") == (("A", "1"), ("B", "x y"), ("C", ""))
    assert parse_env_v1("") == ()


@pytest.mark.parametrize("text", ["NOEQUALS", "=value", "A=1 junk", "A=1 =2"])
def test_parse_env_v2_bad_entry_is_held(text: str) -> None:
    with pytest.raises(JobHeld) as info:
        parse_env_v2(text)
    assert "Environment" in info.value.reason
    assert "NAME=VALUE" in info.value.reason


@pytest.mark.parametrize("text", ["A=1;junk", "=x", "A=1;=2"])
def test_parse_env_v1_bad_entry_is_held(text: str) -> None:
    with pytest.raises(JobHeld) as info:
        parse_env_v1(text)
    assert "Env" in info.value.reason
    assert "NAME=VALUE" in info.value.reason


def test_parse_env_v2_unterminated_quote_is_held() -> None:
    with pytest.raises(JobHeld, match="Environment"):
        parse_env_v2("A='x")


def test_job_environment_wins_over_env() -> None:
    spec = spec_of({**CMD, "Env": q("OLD=1"), "Environment": q("NEW=2 'SP=a b'")})
    assert spec.environment == (("NEW", "2"), ("SP", "a b"))


def test_job_env_v1() -> None:
    assert spec_of({**CMD, "Env": q("A=1;B=2")}).environment == (("A", "1"), ("B", "2"))


def test_job_bad_environment_is_held() -> None:
    assert "Environment" in held_reason({**CMD, "Environment": q("JUNK")})


# ---------------------------------------------------------------- Cmd


def test_seed_job_spec() -> None:
    spec = spec_of({"Cmd": q("/bin/echo"), "Arguments": q("Hello Grid!"), "Out": q("job.out"), "Err": q("job.err")})
    assert spec == JobSpec(
        cmd="/bin/echo",
        arguments=("Hello", "Grid!"),
        environment=(),
        stdin=None,
        stdout="job.out",
        stderr="job.err",
        transfer_output=None,
        kill_sig=int(signal.SIGTERM),
    )


def test_missing_cmd_is_held() -> None:
    reason = held_reason({"Arguments": q("x")})
    assert "Cmd" in reason


def test_empty_cmd_is_held() -> None:
    assert "Cmd" in held_reason({"Cmd": q("")})


@pytest.mark.parametrize("header", ["/bin/echo", "echo", "bin/echo"])
def test_unquoted_cmd_is_held_with_a_double_quote_hint(header: str) -> None:
    reason = held_reason({"Cmd": header})
    assert "Cmd" in reason
    assert "double quotes" in reason


def test_cmd_that_is_not_a_string_is_held() -> None:
    reason = held_reason({"Cmd": 42})
    assert "Cmd" in reason
    assert "string" in reason


def test_cmd_that_is_an_expression_yielding_a_string_is_accepted() -> None:
    assert spec_of({"Cmd": 'strcat("/bin/", "echo")'}).cmd == "/bin/echo"


# ---------------------------------------------------------------- stdio


@pytest.mark.parametrize("name", ["In", "Out", "Err"])
def test_stdio_unset_or_dev_null_is_none(name: str) -> None:
    attr = {"In": "stdin", "Out": "stdout", "Err": "stderr"}[name]
    assert getattr(spec_of(CMD), attr) is None
    assert getattr(spec_of({**CMD, name: q("/dev/null")}), attr) is None
    assert getattr(spec_of({**CMD, name: q("")}), attr) is None


@pytest.mark.parametrize("name", ["In", "Out", "Err"])
def test_stdio_relative_path_kept_and_normalised(name: str) -> None:
    attr = {"In": "stdin", "Out": "stdout", "Err": "stderr"}[name]
    assert getattr(spec_of({**CMD, name: q("job.txt")}), attr) == "job.txt"
    assert getattr(spec_of({**CMD, name: q("./logs//job.txt")}), attr) == "logs/job.txt"


@pytest.mark.parametrize("name", ["In", "Out", "Err"])
@pytest.mark.parametrize("path", ["/etc/passwd", "/tmp/x", "../x", "a/../../x", "a/.."])
def test_stdio_outside_the_sandbox_is_held(name: str, path: str) -> None:
    reason = held_reason({**CMD, name: q(path)})
    assert name in reason
    assert "sandbox" in reason


def test_stdio_naming_no_file_is_held() -> None:
    assert "Out" in held_reason({**CMD, "Out": q("./")})


def test_stdio_must_be_a_string() -> None:
    assert "Out" in held_reason({**CMD, "Out": 1})


# ---------------------------------------------------------------- TransferOutput


def test_transfer_output_unset_means_everything() -> None:
    assert spec_of(CMD).transfer_output is None


def test_transfer_output_list_is_parsed_and_normalised() -> None:
    spec = spec_of({**CMD, "TransferOutput": q(" a.txt, ./out//b.dat ,, dir/ ")})
    assert spec.transfer_output == ("a.txt", "out/b.dat", "dir")


def test_transfer_output_empty_means_nothing_listed() -> None:
    assert spec_of({**CMD, "TransferOutput": q("")}).transfer_output == ()


@pytest.mark.parametrize("text", ["ok.txt, ../escape", "a/../../b", "/etc/shadow"])
def test_transfer_output_outside_the_sandbox_is_held(text: str) -> None:
    assert "TransferOutput" in held_reason({**CMD, "TransferOutput": q(text)})


# ---------------------------------------------------------------- KillSig


def test_kill_sig_defaults_to_sigterm() -> None:
    assert spec_of(CMD).kill_sig == signal.SIGTERM


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (q("SIGKILL"), signal.SIGKILL),
        (q("TERM"), signal.SIGTERM),
        (q("sigint"), signal.SIGINT),
        (q(" SIGUSR1 "), signal.SIGUSR1),
        (9, signal.SIGKILL),
        (q("9"), signal.SIGKILL),
        ("2", signal.SIGINT),
    ],
)
def test_kill_sig_names_and_numbers(header: object, expected: int) -> None:
    assert spec_of({**CMD, "KillSig": header}).kill_sig == int(expected)


@pytest.mark.parametrize("header", [q("SIGFOO"), q("FOO"), 0, 999, -9, q("-9"), q(""), 9.0, True, "UndefinedThing"])
def test_kill_sig_invalid_is_held(header: object) -> None:
    assert "KillSig" in held_reason({**CMD, "KillSig": header})


def test_parse_signal_reports_the_text() -> None:
    with pytest.raises(JobHeld, match="SIGFOO"):
        parse_signal("SIGFOO", text='"SIGFOO"')


# ---------------------------------------------------------------- universe and defaults


@pytest.mark.parametrize("universe", [1, 7, 9, q("vanilla")])
def test_non_vanilla_universe_is_held(universe: object) -> None:
    reason = held_reason({**CMD, "JobUniverse": universe})
    assert "JobUniverse" in reason


def test_vanilla_universe_is_accepted() -> None:
    assert spec_of({**CMD, "JobUniverse": 5}).cmd == "/bin/echo"


def test_apply_defaults_fills_only_absent_attributes() -> None:
    ad = classad2.ClassAd()
    apply_defaults(ad)
    assert ad["JobUniverse"] == 5
    assert ad["Owner"] == "nobody"

    ad = ad_from_headers({"JobUniverse": 9, "Owner": q("alice")})
    apply_defaults(ad)
    assert ad["JobUniverse"] == 9
    assert ad["Owner"] == "alice"


def test_apply_defaults_keeps_a_present_owner_expression() -> None:
    ad = ad_from_headers({"Owner": 'strcat("al", "ice")'})
    apply_defaults(ad)
    assert ad.eval("Owner") == "alice"


# ---------------------------------------------------------------- requests


def test_request_defaults_come_from_the_node() -> None:
    spec = job_spec(ad_from_headers({"Cmd": '"/bin/true"'}))
    request = Request.for_job(spec, 256)
    assert (request.cpus, request.memory_mib, request.disk_kib) == (1, 256, 0)
    assert "default_request_memory_mib" in request.memory_source
    asked = Request.for_job(job_spec(ad_from_headers({"Cmd": '"/bin/true"', "RequestMemory": 64})), 256)
    assert (asked.memory_mib, asked.memory_source) == (64, "RequestMemory")


def spec(**attrs: str) -> jobad.JobSpec:
    ad = ad_from_headers({"Cmd": '"/bin/true"', **attrs})
    return jobad.job_spec(ad)


@pytest.mark.parametrize(
    ("attr", "value"),
    [("RequestMemory", '"lots"'), ("RequestCpus", "0"), ("RequestDisk", "-1"), ("AllowedExecuteDuration", "TRUE")],
)
def test_bad_requests_are_held_naming_the_attribute(attr: str, value: str) -> None:
    with pytest.raises(JobHeld, match=attr):
        spec(**{attr: value})


def test_the_verified_owner_is_written_over_the_headers_owner() -> None:
    ad = classad2.ClassAd({"Owner": "mallory"})
    jobad.set_owner(ad, "alice")
    assert ad["Owner"] == "alice" and ad["OwnerVerified"] is True
    ad = classad2.ClassAd({"Owner": "mallory"})
    jobad.set_owner(ad, None)  # no user_id: what the headers say, not verified
    assert ad["Owner"] == "mallory" and ad["OwnerVerified"] is False
