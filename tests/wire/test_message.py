"""carod.wire.message: the envelope of a job message and its reply address."""

from __future__ import annotations

import datetime

import pytest

from carod.wire.message import FIRST_OFFER_HEADER, OFFERS_HEADER, ReplyAddress, parse_envelope, parse_reply_to

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
