"""Keyset pagination over time-ordered ids: newest first, the cursor is the last id of the page."""

import base64
import binascii
import re

from sqlalchemy import Select

from app.core.errors import ErrorCode, ServiceError

MAX_LIMIT = 200
_ID = re.compile(r"[a-z]+_[0-9a-f]{12,40}")


def encode_cursor(last_id: str) -> str:
    return base64.urlsafe_b64encode(last_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        last_id = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        last_id = ""
    if not _ID.fullmatch(last_id):
        raise ServiceError(ErrorCode.INVALID_CURSOR, "cursor: not a cursor this service returned")
    return last_id


def paginate(query: Select, id_column, limit: int, cursor: str | None) -> Select:
    if cursor:
        query = query.where(id_column < decode_cursor(cursor))
    return query.order_by(id_column.desc()).limit(limit + 1)


def page(rows: list, limit: int) -> tuple[list, str | None]:
    if len(rows) > limit:
        rows = rows[:limit]
        return rows, encode_cursor(rows[-1].id)
    return rows, None
