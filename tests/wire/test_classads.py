"""carod.wire.classads: AMQP headers -> ClassAds, reply values, two-way matching."""

from __future__ import annotations

import classad2
import pytest

from carod.errors import JobHeld
from carod.wire import classads
from carod.wire.classads import ERROR, UNDEFINED, ad_from_headers, format_headers, format_value, header_to_value, match


def q(text: str) -> str:
    """A ClassAd string literal, as MRG Grid clients put it in a header."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def make_ad(**attrs: object) -> classad2.ClassAd:
    """An ad from Python values; a str is ClassAd *expression text* (like a header)."""
    ad = classad2.ClassAd()
    for name, value in attrs.items():
        ad[name] = classad2.ExprTree(value) if isinstance(value, str) else value
    return ad


# ---------------------------------------------------------------- headers -> ad


def test_quoted_string_header_is_the_string_literal() -> None:
    ad = ad_from_headers({"Cmd": '"/bin/echo"'})
    assert classads.evaluate(ad, "Cmd") == "/bin/echo"


def test_string_header_with_escapes_is_unescaped() -> None:
    ad = ad_from_headers({"Arguments": q('say "hi" \\o/')})
    assert classads.evaluate(ad, "Arguments") == 'say "hi" \\o/'


def test_unquoted_string_header_is_an_expression() -> None:
    ad = ad_from_headers({"Requirements": "TRUE", "Twice": "Half * 2", "Half": 21})
    assert classads.evaluate(ad, "Requirements") is True
    assert classads.evaluate(ad, "Twice") == 42
    assert str(ad.lookup("Twice")) == "Half * 2"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(7, 7), (-3, -3), (2.5, 2.5), (True, True), (False, False)],
)
def test_int_float_bool_headers_are_literals(value: object, expected: object) -> None:
    ad = ad_from_headers({"X": value})
    result = classads.evaluate(ad, "X")
    assert result == expected
    assert type(result) is type(expected)


def test_bool_header_is_not_turned_into_a_number() -> None:
    assert header_to_value("X", True) is True
    assert header_to_value("X", 1) == 1
    assert header_to_value("X", 1) is not True


def test_bytes_header_is_decoded_as_utf8() -> None:
    ad = ad_from_headers({"Owner": q("zoë").encode("utf-8"), "Flag": bytearray(b"TRUE")})
    assert classads.evaluate(ad, "Owner") == "zoë"
    assert classads.evaluate(ad, "Flag") is True


def test_undecodable_bytes_header_is_held_naming_the_attribute() -> None:
    with pytest.raises(JobHeld) as info:
        ad_from_headers({"Cmd": q("ok"), "Owner": b'"\xff\xfe"'})
    assert "Owner" in info.value.reason
    assert "UTF-8" in info.value.reason


@pytest.mark.parametrize("value", [["a", "b"], {"k": "v"}, None], ids=["list", "dict", "none"])
def test_unreadable_header_type_is_held_naming_the_attribute(value: object) -> None:
    with pytest.raises(JobHeld) as info:
        ad_from_headers({"Cmd": q("/bin/true"), "MyArgs": value})
    assert "MyArgs" in info.value.reason
    assert "Cmd" not in info.value.reason


@pytest.mark.parametrize("text", ["foo &&", "(1 + ", "[a = ", '"unterminated'])
def test_malformed_expression_is_held_naming_the_attribute(text: str) -> None:
    with pytest.raises(JobHeld) as info:
        ad_from_headers({"Requirements": text})
    assert "Requirements" in info.value.reason
    assert "not a valid ClassAd expression" in info.value.reason


@pytest.mark.parametrize("value", ['"/bin/echo\0x"', b'"/bin/echo\0x"'], ids=["str", "bytes"])
def test_header_with_nul_character_is_held_naming_the_attribute(value: object) -> None:
    with pytest.raises(JobHeld) as info:
        ad_from_headers({"Cmd": value})
    assert "Cmd" in info.value.reason


def test_transport_headers_are_not_job_attributes() -> None:
    headers = {
        "Cmd": q("/bin/echo"),
        "x-death": [{"count": 1, "queue": "grid"}],
        "x-carod-offers": 3,
        "x-delivery-count": 2,
        "has space": "TRUE",
        "1digit": "TRUE",
    }
    ad = ad_from_headers(headers)
    assert sorted(ad.keys()) == ["Cmd"]


def test_attribute_name_pattern() -> None:
    assert classads.ATTRIBUTE_NAME.match("Requirements")
    assert classads.ATTRIBUTE_NAME.match("_private9")
    assert not classads.ATTRIBUTE_NAME.match("x-death")
    assert not classads.ATTRIBUTE_NAME.match("9lives")
    assert not classads.ATTRIBUTE_NAME.match("Name\n")


# ---------------------------------------------------------------- evaluate


def test_evaluate_missing_undefined_and_error() -> None:
    ad = make_ad(Undef="NoSuchThing", Err='1 + "a"', Ok=3)
    assert classads.evaluate(ad, "Missing") is UNDEFINED
    assert classads.evaluate(ad, "Undef") is UNDEFINED
    assert classads.evaluate(ad, "Err") is ERROR
    assert classads.evaluate(ad, "Ok") == 3
    assert repr(UNDEFINED) == "UNDEFINED"
    assert repr(ERROR) == "ERROR"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), (False, False), (1, True), (0, False), (0.5, True), (0.0, False), ("TRUE", False)],
)
def test_is_true_follows_evalbool(value: object, expected: bool) -> None:
    assert classads.is_true(value) is expected


def test_is_true_undefined_and_error_are_false() -> None:
    assert classads.is_true(UNDEFINED) is False
    assert classads.is_true(ERROR) is False


# ---------------------------------------------------------------- reply values


def test_format_value_bools_are_classad_keywords() -> None:
    assert format_value(True) == "TRUE"
    assert format_value(False) == "FALSE"


def test_format_value_numbers_stay_native() -> None:
    assert format_value(42) == 42
    assert type(format_value(42)) is int
    assert format_value(1.25) == 1.25
    assert type(format_value(1.25)) is float


@pytest.mark.parametrize(
    ("text", "expected"),
    [("Running", '"Running"'), ('a "b"', '"a \\"b\\""'), ("back\\slash", '"back\\\\slash"'), ("", '""')],
)
def test_format_value_quotes_strings(text: str, expected: str) -> None:
    assert format_value(text) == expected


@pytest.mark.parametrize("text", ["plain", 'quo"te', "back\\slash", "new\nline", "tab\t", "zoë", "", "it's"])
def test_format_value_strings_read_back_as_the_same_string(text: str) -> None:
    formatted = format_value(text)
    assert isinstance(formatted, str)
    assert formatted.startswith('"')
    assert classad2.ExprTree(formatted).eval() == text


def test_format_value_expression_is_its_text() -> None:
    assert format_value(classad2.ExprTree("TARGET.Memory > 10")) == "TARGET.Memory > 10"


def test_format_headers_maps_every_value() -> None:
    assert format_headers({"A": 1, "B": "x", "C": False, "D": 0.5}) == {"A": 1, "B": '"x"', "C": "FALSE", "D": 0.5}


def test_expr_text_and_long_form() -> None:
    ad = make_ad(b="1 + 2", A=q("x"))
    assert classads.expr_text(ad, "b") == "1 + 2"
    assert classads.expr_text(ad, "Requirements") == "TRUE"
    assert classads.to_classad_text(ad) == 'A = "x"\nb = 1 + 2\n'


def test_ad_from_expressions_names_the_bad_key() -> None:
    ad = classads.ad_from_expressions([("HasGpu", "TRUE"), ("Pool", q("blue"))], section="machine")
    assert classads.evaluate(ad, "HasGpu") is True
    assert classads.evaluate(ad, "Pool") == "blue"
    with pytest.raises(ValueError, match=r"\[machine\] Broken"):
        classads.ad_from_expressions([("Broken", "1 +")], section="machine")
    with pytest.raises(ValueError, match=r"\[machine\] bad-name"):
        classads.ad_from_expressions([("bad-name", "1")], section="machine")


# ---------------------------------------------------------------- match


def test_job_requirements_true_matches() -> None:
    result = match(make_ad(Requirements='TARGET.Arch == "X86_64"'), make_ad(Arch=q("X86_64")))
    assert result.ok
    assert result.job_accepts and result.machine_accepts
    assert result.reason == "matched"


def test_job_requirements_false_does_not_match() -> None:
    result = match(make_ad(Requirements="TARGET.Memory >= 4096"), make_ad(Memory=2048))
    assert not result.ok
    assert not result.job_accepts
    assert result.machine_accepts
    assert "Requirements" in result.reason
    assert "job" in result.reason
    assert "start policy" not in result.reason


def test_job_requirements_undefined_is_no_match() -> None:
    result = match(make_ad(Requirements="TARGET.HasGpu"), make_ad(Memory=2048))
    assert not result.ok
    assert not result.job_accepts


def test_job_requirements_error_is_no_match() -> None:
    assert not match(make_ad(Requirements='TARGET.Memory + "x"'), make_ad(Memory=1)).ok


def test_missing_requirements_matches() -> None:
    result = match(make_ad(Owner=q("alice")), make_ad(Memory=1))
    assert result.ok
    assert result.reason == "matched"


def test_numeric_requirements_follow_evalbool() -> None:
    assert match(make_ad(Requirements="1"), make_ad()).ok
    assert not match(make_ad(Requirements="0"), make_ad()).ok
    assert not match(make_ad(Requirements=q("yes")), make_ad()).ok


def test_machine_start_refusing_the_job() -> None:
    machine = make_ad(Start='TARGET.Owner == "alice"')
    refused = match(make_ad(Owner=q("bob"), Requirements="TRUE"), machine)
    assert not refused.ok
    assert refused.job_accepts
    assert not refused.machine_accepts
    assert "start policy" in refused.reason
    assert "machine" in refused.reason
    assert "Requirements" not in refused.reason
    assert match(make_ad(Owner=q("alice"), Requirements="TRUE"), machine).ok


def test_machine_start_undefined_refuses() -> None:
    # The job has no Owner: TARGET.Owner is UNDEFINED, so Start is not true.
    assert not match(make_ad(Requirements="TRUE"), make_ad(Start='TARGET.Owner == "alice"')).machine_accepts


def test_machine_start_my_is_the_machine() -> None:
    machine = make_ad(Start="MY.Memory >= TARGET.RequestMemory", Memory=2048)
    assert match(make_ad(RequestMemory=1024), machine).ok
    assert not match(make_ad(RequestMemory=4096), machine).ok


def test_machine_start_unscoped_reference_reaches_the_job() -> None:
    machine = make_ad(Start='Owner == "alice"')
    assert match(make_ad(Owner=q("alice")), machine).ok
    assert not match(make_ad(Owner=q("bob")), machine).ok


def test_both_sides_refusing_names_both() -> None:
    result = match(make_ad(Requirements="FALSE"), make_ad(Start="FALSE"))
    assert not result.job_accepts
    assert not result.machine_accepts
    assert "Requirements" in result.reason
    assert "start policy" in result.reason


def test_unscoped_reference_falls_back_to_the_machine() -> None:
    job = make_ad(Requirements="Memory >= 1024")
    assert match(job, make_ad(Memory=2048)).ok
    assert not match(job, make_ad(Memory=512)).ok


def test_unscoped_reference_resolves_in_my_ad_first() -> None:
    # The job's own Memory shadows the machine's for an unscoped reference ...
    job = make_ad(Memory=512, Requirements="Memory >= 1024")
    assert not match(job, make_ad(Memory=2048)).ok
    # ... while TARGET.Memory still reaches the machine's.
    job = make_ad(Memory=512, Requirements="TARGET.Memory >= 1024")
    assert match(job, make_ad(Memory=2048)).ok


def test_my_scope_in_requirements_is_the_job() -> None:
    job = make_ad(RequestMemory=1024, Requirements="TARGET.Memory >= MY.RequestMemory")
    assert match(job, make_ad(Memory=1024)).ok
    assert not match(job, make_ad(Memory=1023)).ok


def test_evaluate_in_match_missing_attribute_is_undefined() -> None:
    assert classads.evaluate_in_match(make_ad(), make_ad(Memory=1), "Requirements") is UNDEFINED


def test_match_does_not_modify_the_ads() -> None:
    job = make_ad(Requirements="Memory >= 1024")
    machine = make_ad(Memory=2048, Start="TRUE")
    match(job, machine)
    assert sorted(job.keys()) == ["Requirements"]
    assert sorted(machine.keys()) == ["Memory", "Start"]


def test_unscoped_reference_to_a_derived_machine_attribute() -> None:
    machine = make_ad(TotalMemory=4096, BigMem="TotalMemory > 2048", Memory="TotalMemory / 2")
    # TARGET.BigMem works; the unscoped spelling must behave the same way.
    assert match(make_ad(Requirements="TARGET.BigMem"), machine).ok
    assert match(make_ad(Requirements="BigMem"), machine).ok
    assert match(make_ad(Requirements="Memory >= 1024"), machine).ok


def test_cyclic_requirements_is_no_match_not_a_crash() -> None:
    job = classad2.ClassAd()
    job["Requirements"] = classad2.ExprTree("Requirements")
    assert not match(job, classad2.ClassAd({"Memory": 1})).ok
