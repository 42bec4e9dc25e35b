"""What a job may chirp (carod.wire.chirp), the replies that carry it, and condor_chirp without a server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from carod.sandbox import chirptool
from carod.wire import chirp, replies
from carod.wire.chirp import Bucket, ChirpRefused, Request, check_set


def refused(chirped: dict[str, str], name: str, value: str) -> ChirpRefused:
    with pytest.raises(ChirpRefused) as caught:
        check_set(chirped, name, value)
    return caught.value


def test_a_quoted_string_is_kept_as_classad_text() -> None:
    assert check_set({}, "ServiceEndpoint", '"node1:5672"') == ("ServiceEndpoint", '"node1:5672"')
    assert check_set({}, "Progress", " 0.5 ") == ("Progress", "0.5")
    assert check_set({"A": "1"}, "B", "A + 1") == ("B", "A + 1")
    assert check_set({}, "Done", "true") == ("Done", "true")


@pytest.mark.parametrize(
    "name", ["JobStatus", "jobstatus", "Owner", "RemoteHost", "ExitCode", "RemoteUserCpu", "Cmd", "HoldReason"]
)
def test_the_nodes_attributes_are_refused_in_any_case(name: str) -> None:
    got = refused({}, name, "1")
    assert got.code == chirp.EACCES and "the node's attribute" in got.message


@pytest.mark.parametrize("name", ["", "1a", "a-b", "a b", "x" * 65, "é", "true", "TARGET", "a.b"])
def test_names_that_are_not_classad_names_are_refused(name: str) -> None:
    assert refused({}, name, "1").code == chirp.EINVAL


@pytest.mark.parametrize("value", ["host:1", '"unterminated', "1 +", "", "a\0b", "[ a = 1"])
def test_values_that_are_not_classad_expressions_are_refused(value: str) -> None:
    got = refused({}, "A", value)
    assert got.code == chirp.EINVAL
    if value == "host:1":
        assert 'a string needs double quotes, e.g. "host:1"' in got.message


def test_sizes_and_counts_are_bounded() -> None:
    assert refused({}, "A", '"' + "x" * chirp.MAX_VALUE_BYTES + '"').code == chirp.EFBIG
    full = {f"A{i}": "1" for i in range(chirp.MAX_ATTRS)}
    assert refused(full, "B", "1").code == chirp.ENOSPC
    assert check_set(full, "a0", "2") == ("a0", "2")  # a name already set (in any case) replaces it
    big = '"' + "x" * 900 + '"'
    many = {f"A{i}": big for i in range(chirp.MAX_TOTAL_BYTES // 900)}
    assert refused(many, "B", big).code == chirp.ENOSPC


def test_expressions_that_would_cost_too_much_to_evaluate_are_refused() -> None:
    got = refused({"A": "B + 1"}, "B", "A + 1")
    assert got.code == chirp.EINVAL and "refers to itself" in got.message
    assert "calls regexp()" in refused({}, "A", 'regexp("a*", "aaa")').message
    chain = {"A0": '"' + "x" * 100 + '"'}
    for i in range(1, 12):
        chain = dict(chirp.replaced(chain, f"A{i}", f"strcat(A{i - 1}, A{i - 1})"))
    assert "evaluating" in refused(chain, "A12", "strcat(A11, A11)").message


def test_replacing_keeps_order_and_takes_the_new_spelling() -> None:
    assert list(chirp.replaced({"A": "1", "B": "2"}, "a", "3").items()) == [("a", "3"), ("B", "2")]
    assert chirp.lookup({"Foo": "1"}, "FOO") == "1" and chirp.lookup({}, "X") is None


def test_requests_are_bounded_json_lines_and_answers_text_lines() -> None:
    line = chirp.encode_request(Request(chirp.SET, "A", '"x"'))
    assert chirp.decode_request(line) == Request(chirp.SET, "A", '"x"')
    assert chirp.decode_request(chirp.encode_request(Request(chirp.GET, "A"))) == Request(chirp.GET, "A")
    for bad in [b"x" * (chirp.MAX_LINE_BYTES + 1), b"\xff\n", b"[]\n", b'{"op":"fetch","name":"a"}\n', b'{"op":1}']:
        with pytest.raises(ChirpRefused):
            chirp.decode_request(bad)
    with pytest.raises(ChirpRefused):
        chirp.decode_request(b'{"op":"set_job_attr","name":"a","value":1}\n')
    assert chirp.decode_answer(chirp.answer_refused(ChirpRefused(13, "no\nmore"))) == (13, "no more")
    assert chirp.decode_answer(chirp.answer_ok('"a b"')) == (0, '"a b"')
    assert chirp.answer_ok() == b"ok\n"
    for line in (chirp.answer_refused(ChirpRefused(13, "é" * 10_000)), chirp.answer_ok("x" * 10_000)):
        assert len(line) <= chirp.MAX_LINE_BYTES and line.endswith(b"\n") and line.count(b"\n") == 1
        line.decode()  # never a character cut in two


@pytest.mark.parametrize("text", ['"host:1"', "a\\b", "tab\tnew\nline", "é ✓ \x7f", "\udcff", ""])
def test_the_client_s_json_is_json(text: str) -> None:
    encoded = chirptool.json_text(text)
    assert json.loads(encoded) == text
    request = (
        "{"
        + f"{chirptool.json_text('op')}: {chirptool.json_text('set_job_attr')}, "
        + (
            f"{chirptool.json_text('name')}: {chirptool.json_text('A')}, {chirptool.json_text('value')}: {encoded}"
            + "}\n"
        )
    )
    if "\udcff" not in text:
        assert chirp.decode_request(request.encode()) == Request(chirp.SET, "A", text)


def test_bucket_gives_a_burst_then_its_rate() -> None:
    bucket = Bucket.full(3, 1.0, now=100.0)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(100.5) is False and bucket.take(101.0) is True
    assert bucket.take(50.0) is False  # a clock going back gives nothing


def test_replies_carry_the_chirped_attributes_and_carod_s_own_win() -> None:
    reply = replies.chirped(sequence=3, node="n1", start_date=10.0, pid=5, run_count=1)
    reply = replies.with_attrs(reply, {"ServiceEndpoint": '"h:1"', "Sequence": "99"})
    assert reply.headers["ServiceEndpoint"] == '"h:1"' and reply.headers["Sequence"] == 3
    assert reply.headers["JobStatus"] == 2
    plain = replies.idle(sequence=1, node="n", now=1.0, reason="r", run_count=1)
    assert replies.with_attrs(plain, {}) is plain


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-IS", str(Path(chirptool.__file__)), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )


def test_condor_chirp_usage_and_a_missing_server_exit_255_with_htcondor_s_messages() -> None:
    done = run_tool()
    assert done.returncode == 255 and "condor_chirp set_job_attr job_attribute attribute_value" in done.stderr
    done = run_tool("set_job_attr", "A")
    assert done.returncode == 255 and done.stderr == "condor_chirp set_job_attr AttributeName AttributeValue\n"
    done = run_tool("ulog", "x")
    assert done.returncode == 255 and done.stderr.startswith("Unknown command ulog\n")
    done = run_tool("set_job_attr", "A", "1")
    assert done.returncode == 255 and done.stdout == ""
    assert done.stderr.startswith("cannot chirp_connect to shadow\n") and "\tError: 2 (No such file" in done.stderr
