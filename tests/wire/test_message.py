"""carod.wire.message: the envelope of a job message and its reply address."""

from __future__ import annotations

import datetime

import pytest

from carod.errors import CarodError
from carod.wire.message import (
    FIRST_OFFER_HEADER,
    OFFERS_HEADER,
    OWNER_HEADER,
    RUNS_HEADER,
    SEQUENCE_HEADER,
    ReplyAddress,
    ReplyAddressError,
    parse_envelope,
    parse_reply_to,
    verified_owner,
)

# ---------------------------------------------------------------- reply_to


@pytest.mark.parametrize(
    ("text", "exchange", "key"),
    [
        ("amq.direct/my_grid_results_key", "amq.direct", "my_grid_results_key"),
        ("my_queue", "", "my_queue"),
        ("  my_queue  ", "", "my_queue"),
        ("amq.rabbitmq.reply-to.abc/def==", "", "amq.rabbitmq.reply-to.abc/def=="),
        ("amq.rabbitmq.reply-to", "", "amq.rabbitmq.reply-to"),
        ("amq.direct/results; {create: always, node: {type: topic}}", "amq.direct", "results"),
        ("my_queue; {create: always}", "", "my_queue"),
        ("amq.topic/a/b", "amq.topic", "a/b"),
        (" amq.direct / key ", "amq.direct", "key"),
        ("/key", "", "key"),
    ],
)
def test_parse_reply_to(text: str, exchange: str, key: str) -> None:
    assert parse_reply_to(text) == ReplyAddress(exchange, key)


@pytest.mark.parametrize("text", ["", "   ", "; {create: always}", "/", " / ; {x: 1}"])
def test_parse_reply_to_nothing_left_is_none(text: str) -> None:
    assert parse_reply_to(text) is None


# RabbitMQ's AMQP 1.0 address forms


@pytest.mark.parametrize(
    ("text", "exchange", "key"),
    [
        ("/exchange/amq.direct/results", "amq.direct", "results"),
        ("/exchange/amq.topic/a/b.c", "amq.topic", "a/b.c"),
        ("/exchange/fan", "fan", ""),
        ("/exchange/fan/", "fan", ""),
        ("/queue/my_queue", "", "my_queue"),
        ("/amq/queue/my_queue", "", "my_queue"),
        ("/topic/grid.results", "amq.topic", "grid.results"),
        ("/topic/a/b", "amq.topic", "a/b"),
        ("  /queue/my_queue  ", "", "my_queue"),
        ("/queue/amq.rabbitmq.reply-to.abc", "", "amq.rabbitmq.reply-to.abc"),
        # read exactly: no Qpid options, a routing key may hold ';' and spaces
        ("/exchange/amq.direct/a;b", "amq.direct", "a;b"),
        ("/exchange/amq.direct/ key", "amq.direct", " key"),
    ],
)
def test_parse_reply_to_rabbitmq_forms(text: str, exchange: str, key: str) -> None:
    assert parse_reply_to(text) == ReplyAddress(exchange, key)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("/foo/bar", "none of RabbitMQ's address forms"),
        ("/nonsense/x", "none of RabbitMQ's address forms"),
        ("/exchanges/amq.direct/k", "none of RabbitMQ's address forms"),
        ("/amq/topic/k", "none of RabbitMQ's address forms"),
        ("/a/b; {create: always}", "none of RabbitMQ's address forms"),
        ("/queue/", "a RabbitMQ /queue/ address without a queue name"),
        ("/queue", "a RabbitMQ /queue/ address without a queue name"),
        ("/queue; {create: always}", "a RabbitMQ /queue/ address without a queue name"),
        ("/queue/a/b", "a RabbitMQ /queue/ address with a '/' in its queue name"),
        ("/amq/queue/", "a RabbitMQ /amq/queue/ address without a queue name"),
        ("/amq/queue", "a RabbitMQ /amq/queue/ address without a queue name"),
        ("/amq/queue/a/b", "a RabbitMQ /amq/queue/ address with a '/' in its queue name"),
        ("/exchange/", "a RabbitMQ /exchange/ address without an exchange name"),
        ("/exchange", "a RabbitMQ /exchange/ address without an exchange name"),
        ("/exchange//key", "a RabbitMQ /exchange/ address without an exchange name"),
        ("/topic/", "a RabbitMQ /topic/ address without a routing key"),
        ("/topic", "a RabbitMQ /topic/ address without a routing key"),
    ],
)
def test_parse_reply_to_refuses_other_addresses_starting_with_slash(text: str, why: str) -> None:
    with pytest.raises(ReplyAddressError) as caught:
        parse_reply_to(text)
    assert isinstance(caught.value, CarodError)
    assert caught.value.address == text.strip()
    assert why in caught.value.reason
    assert str(caught.value) == f"'{text.strip()}' ({caught.value.reason})"


def test_refused_address_is_bounded_in_what_is_shown() -> None:
    text = "/nonsense/" + "x" * 5000
    with pytest.raises(ReplyAddressError) as caught:
        parse_reply_to(text)
    assert caught.value.address == text[:200] + "... [5010 characters]"
    assert len(str(caught.value)) < 400


@pytest.mark.parametrize("text", ["/key", "/amq", "/key; {node: {x-declare: {arguments: {a/b: 1}}}}"])
def test_parse_reply_to_slash_and_one_name_is_still_the_qpid_form(text: str) -> None:
    assert parse_reply_to(text) == ReplyAddress("", text[1:].split(";")[0])


def test_reply_address_str() -> None:
    assert str(ReplyAddress("amq.direct", "k")) == "amq.direct/k"
    assert str(ReplyAddress("", "my_queue")) == "my_queue"


# ---------------------------------------------------------------- envelope


def test_parse_envelope_reads_everything() -> None:
    env = parse_envelope("job-1", "amq.direct/results", {OFFERS_HEADER: 4, "Cmd": '"/bin/echo"'})
    assert env.message_id == "job-1"
    assert env.reply_to == ReplyAddress("amq.direct", "results")
    assert env.offers == 4
    assert env.label == "job-1"


def test_offers_header_name() -> None:
    assert OFFERS_HEADER == "x-carod-offers"


@pytest.mark.parametrize("message_id", [None, "", "   "])
def test_parse_envelope_missing_or_blank_message_id_is_none(message_id: str | None) -> None:
    env = parse_envelope(message_id, "q", {})
    assert env.message_id is None
    assert env.label == "<no message_id>"


def test_parse_envelope_strips_message_id() -> None:
    assert parse_envelope("  id-7 \n", "q", {}).message_id == "id-7"


@pytest.mark.parametrize("reply_to", [None, "", "   "])
def test_parse_envelope_without_reply_to(reply_to: str | None) -> None:
    assert parse_envelope("id", reply_to, {}).reply_to is None


def test_parse_envelope_with_a_refused_reply_to_says_why() -> None:
    env = parse_envelope("id", "/foo/bar", {})
    assert env.reply_to is None
    assert env.reply_to_problem == (
        "'/foo/bar' (it starts with '/' but is none of RabbitMQ's address forms /exchange/X/KEY, /exchange/X, "
        "/queue/Q, /amq/queue/Q, /topic/KEY)"
    )


@pytest.mark.parametrize("reply_to", [None, "", "q", "/exchange/amq.direct/k"])
def test_parse_envelope_usable_or_missing_reply_to_has_no_problem(reply_to: str | None) -> None:
    assert parse_envelope("id", reply_to, {}).reply_to_problem is None


def test_parse_envelope_without_offers_header_is_zero() -> None:
    assert parse_envelope("id", "q", {}).offers == 0


@pytest.mark.parametrize("offers", ["3", 2.0, True, -1, None, b"3", [1]])
def test_parse_envelope_bad_offers_are_ignored(offers: object) -> None:
    assert parse_envelope("id", "q", {OFFERS_HEADER: offers}).offers == 0


# ---------------------------------------------------------------- carod's own headers


def test_offers_and_first_offer_come_from_carods_headers() -> None:
    env = parse_envelope("m", "q", {OFFERS_HEADER: 3, FIRST_OFFER_HEADER: 1_700_000_000})
    assert (env.offers, env.first_offer, env.delivery_limited, env.deliveries) == (3, 1_700_000_000.0, 0, 0)


def test_delivery_limit_deaths_of_the_job_queue_are_counted() -> None:
    when = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    death = [
        {"queue": "grid", "reason": "delivery_limit", "count": 1, "time": when},
        {"queue": "grid.unmatched", "reason": "expired", "count": 1, "time": when},
        {"queue": "other", "reason": "delivery_limit", "count": 5},
    ]
    env = parse_envelope("m", "q", {"x-death": death, "x-delivery-count": 2}, queue="grid")
    assert (env.delivery_limited, env.deliveries) == (1, 2)
    assert parse_envelope("m", "q", {"x-death": "junk"}).delivery_limited == 0


# ---------------------------------------------------------------- owners (issue 17)


def test_the_owner_is_the_validated_user_id_and_a_nodes_republished_owner_is_honoured_from_the_node_only() -> None:
    assert verified_owner("alice", {}, "carod") == "alice"
    assert verified_owner(None, {OWNER_HEADER: "alice"}, "carod") is None, "a header alone proves nothing"
    assert verified_owner("", {}, "carod") is None
    # The same header from another user is not believed: that user is the owner.
    assert verified_owner("eve", {OWNER_HEADER: "alice"}, "carod") == "eve"
    # From the nodes' own user (a released job): its owner, or nobody.
    assert verified_owner("carod", {OWNER_HEADER: "alice"}, "carod") == "alice"
    assert verified_owner("carod", {OWNER_HEADER: b"alice"}, "carod") == "alice"
    assert verified_owner("carod", {OWNER_HEADER: ""}, "carod") is None
    assert verified_owner("carod", {}, "carod") == "carod"
    counters = {RUNS_HEADER: 2, SEQUENCE_HEADER: 7}
    env = parse_envelope("m", "q", counters, user_id="carod", node_user="carod")
    assert (env.user_id, env.owner, env.runs, env.sequence) == ("carod", "carod", 2, 7)
    env = parse_envelope("m", "q", counters, user_id="eve", node_user="carod")
    assert (env.owner, env.runs, env.sequence) == ("eve", 0, 0), "counters only from a node's republished copy"
    env = parse_envelope("m", "q", {RUNS_HEADER: 2**40}, user_id="carod", node_user="carod")
    assert env.runs == 2**31 - 1
