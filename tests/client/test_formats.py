"""carod.client.formats: what `carod q -af`, `-format` and `-constraint` print, byte for byte."""

from __future__ import annotations

import classad2
import pytest

from carod.client import formats
from carod.wire import adverts


def job(attrs: dict[str, str]) -> adverts.JobInfo:
    return adverts.JobInfo("m1", "alice", "/bin/sh", 1000.0, 1.0, 128.0, 2, 990.0, attrs)


def ad(**attrs: str) -> classad2.ClassAd:
    return adverts.query_ad("node1", job(attrs))


def test_autoformat_prints_values_space_separated_strings_bare_and_undefined() -> None:
    chosen = formats.selection(autoformat=["Owner", "Missing", "N", "RequestCpus * 1.5", "Endpoint", "JobStatus == 2"])
    line = chosen.line(ad(N="3", Endpoint='"h:1234"'))
    assert line == "alice undefined 3 1.5 h:1234 true\n"


def test_autoformat_lists_reals_and_errors() -> None:
    chosen = formats.selection(autoformat=['{1, "a"}', "0.25", "1/0", "RemoteHost", "QDate"])
    assert chosen.line(ad()) == '{ 1, "a" } 0.25 error node1 990\n'


def test_format_walkthrough_line_and_skipped_when_undefined() -> None:
    chosen = formats.selection(formats=[("service running at %s\\n", "ServiceEndpoint")])
    assert chosen.line(ad(ServiceEndpoint='"node1:40123"')) == "service running at node1:40123\n"
    assert chosen.line(ad()) == ""  # no ServiceEndpoint: the whole format prints nothing, as condor_q


def test_format_printf_conversions() -> None:
    chosen = formats.selection(
        formats=[
            ("%d.", "JobStatus"),
            ("%-6s|", "Owner"),
            ("%5.2f|", "N"),
            ("%x|", "N * 5"),
            ("%03d|", "RequestCpus"),
            ("%d|", "Missing"),
            ("%d|", "Owner"),
            ("%s|", "JobStatus"),
            ("%V|", "Owner"),
            ("%v|", "Missing"),
            ("%.3e|", "N"),
            ("100%%", "Owner"),
            ("\\t%s\\n", "Cmd"),
        ]
    )
    assert chosen.line(ad(N="3")) == '2.alice | 3.00|f|001|2|"alice"|undefined|3.000e+00|100%\t/bin/sh\n'


def test_format_booleans_and_reals_in_integer_conversions() -> None:
    chosen = formats.selection(formats=[("%d ", "JobStatus == 2"), ("%d ", "2.9"), ("%.1f", "7")])
    assert chosen.line(ad()) == "1 2 7.0"


def test_constraint_selects_with_evalbool() -> None:
    assert formats.selection(["JobStatus == 2 && N > 2"]).wants(ad(N="3"))
    assert not formats.selection(["JobStatus == 2 && N > 2"]).wants(ad(N="1"))
    assert not formats.selection(["Missing"]).wants(ad())  # UNDEFINED is not true
    assert formats.selection(["N"]).wants(ad(N="5"))  # a non-zero number is
    assert not formats.selection(['Owner == "alice"', "JobStatus == 5"]).wants(ad())  # all must hold
    assert formats.selection(['regexp("^node", RemoteHost)']).wants(ad())  # the user's own expression


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"constraints": ["JobStatus =="]}, "-constraint 'JobStatus =='"),
        ({"autoformat": ["a b"]}, "-af 'a b'"),
        ({"formats": [("%s %d", "Owner")]}, "more than one conversion"),
        ({"formats": [("%99999s", "Owner")]}, "width over"),
        ({"formats": [("%s", "Owner +")]}, "-format 'Owner +'"),
    ],
)
def test_bad_arguments_are_refused_up_front(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(formats.FormatError, match=message.replace("(", r"\(").replace("+", r"\+")):
        formats.selection(**kwargs)  # type: ignore[arg-type]


def test_foreign_values_cannot_add_lines_or_terminal_escapes() -> None:
    hostile = ad(Note='"two\\nlines \\033[2J"')
    assert formats.selection(autoformat=["Note"]).line(hostile) == "two\\nlines \\x1b[2J\n"
    assert formats.selection(formats=[("%s\\n", "Note")]).line(hostile) == "two\\nlines \\x1b[2J\n"


def test_unescape_reads_c_escapes() -> None:
    assert formats.unescape(r"a\nb\tc\\d\"e\101\x42\q") == 'a\nb\tc\\d"eAB\\q'


def test_q_ad_leaves_out_attributes_whose_evaluation_is_not_bounded() -> None:
    doubling = {"A0": '"' + "x" * 1000 + '"', **{f"A{i}": f"strcat(A{i - 1}, A{i - 1})" for i in range(1, 40)}}
    forged = adverts.query_ad("n", job({"Ok": '"fine"', "Calls": 'sprintf("%s", 1)', "Bad": "not valid (", **doubling}))
    assert forged["Ok"] == "fine"
    assert "Calls" not in forged and "Bad" not in forged and "A39" not in forged
    assert "A0" in forged  # the start of the chain is cheap on its own
    chosen = formats.selection(["A39 =!= undefined"], ["A39"])
    assert not chosen.wants(forged) and chosen.line(forged) == "undefined\n"


def test_q_ad_fixed_attributes_cannot_be_overridden() -> None:
    forged = adverts.query_ad("n", job({"Owner": '"mallory"', "jobstatus": "5", "RemoteHost": '"elsewhere"'}))
    assert formats.selection(autoformat=["Owner", "JobStatus", "RemoteHost"]).line(forged) == "alice 2 n\n"


def test_json_shape() -> None:
    info = job({"ServiceEndpoint": '"h:1"', "Bad": "("})
    data = formats.job_json("node1", info.to_json(), adverts.query_ad("node1", info))
    assert data["node"] == "node1" and data["message_id"] == "m1" and data["status"] == 2
    assert data["attrs"] == {"ServiceEndpoint": '"h:1"', "Bad": "("}  # as advertised
    assert data["ad"]["ServiceEndpoint"] == "h:1" and data["ad"]["JobStatus"] == 2 and "Bad" not in data["ad"]
