"""Server-Sent Events read from lines of text (the WHATWG event-stream rules the service's `/events` routes follow):
`field: value` lines, a blank line ends an event, lines starting with `:` are comments (the service's heartbeats)."""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class ServerEvent:
    event: str
    data: str
    id: str | None  # the stream's last event id once this event arrived: what `Last-Event-ID` resumes after
    retry_ms: int | None = None


def parse_events(lines: Iterable[str]) -> Iterator[ServerEvent]:
    """Events as they complete. An event still open when the lines end is dropped, as a browser drops it: the
    connection broke before the event was whole."""
    event, data, last_id, retry = "", [], None, None
    for line in lines:
        line = line.rstrip("\r\n")
        if not line:
            if data:
                yield ServerEvent(event or "message", "\n".join(data), last_id, retry)
            event, data, retry = "", [], None
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id" and "\0" not in value:
            last_id = value
        elif name == "retry" and value.isdigit():
            retry = int(value)
