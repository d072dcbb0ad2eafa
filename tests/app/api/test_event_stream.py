"""The stream machinery: which event ids are settled (holes wait, then count as rolled back), the Last-Event-ID
header, and the wire format of one event."""

import json

import pytest

from app.api.event_stream import MAX_LAST_EVENT_ID, SettledIds, parse_last_event_id, sse
from app.core.errors import ServiceError


def test_settled_ids_move_over_committed_ids():
    ids = SettledIds(start=10, gap_wait=2.0)
    assert ids.advance([11, 12, 13], now=0.0) == 13
    assert ids.advance([], now=1.0) == 13


def test_a_hole_holds_the_mark_until_it_fills():
    ids = SettledIds(start=10, gap_wait=2.0)
    assert ids.advance([11, 13, 14], now=0.0) == 11  # 12 is still being written
    assert ids.advance([13, 14], now=1.0) == 11
    assert ids.advance([12, 13, 14], now=1.5) == 14  # it committed: nothing was skipped
    assert ids.holes == {}


def test_a_hole_older_than_the_wait_is_taken_for_a_rolled_back_write():
    ids = SettledIds(start=10, gap_wait=2.0)
    assert ids.advance([11, 13, 16], now=0.0) == 11
    assert ids.advance([13, 16], now=1.9) == 11
    assert ids.advance([13, 16], now=2.0) == 16  # 12, 14 and 15 each waited since first seen
    assert ids.holes == {}


def test_holes_seen_later_wait_their_own_time():
    ids = SettledIds(start=0, gap_wait=2.0)
    assert ids.advance([1, 3], now=0.0) == 1
    assert ids.advance([3, 5], now=1.0) == 1
    assert ids.advance([3, 5], now=2.0) == 3  # 2 waited long enough, 4 was first seen at 1.0
    assert ids.advance([5], now=3.0) == 5


def test_last_event_id_header():
    assert parse_last_event_id(None) is None and parse_last_event_id("  ") is None
    assert parse_last_event_id("0") == 0 and parse_last_event_id(" 42 ") == 42
    assert parse_last_event_id(str(MAX_LAST_EVENT_ID)) == MAX_LAST_EVENT_ID
    for bad in ("-1", "1.5", "abc", "1e3", "٣", str(MAX_LAST_EVENT_ID + 1), "9" * 100):
        with pytest.raises(ServiceError) as caught:
            parse_last_event_id(bad)
        assert caught.value.status_code == 400 and "Last-Event-ID" in caught.value.message


def test_an_event_is_an_id_a_kind_and_one_line_of_compact_json():
    wire = sse(7, "progress", {"message": "line one\nline two", "fraction": 0.5})
    assert wire == b'id: 7\nevent: progress\ndata: {"message":"line one\\nline two","fraction":0.5}\n\n'
    assert json.loads(wire.decode().split("data: ", 1)[1])["message"] == "line one\nline two"
