"""The error catalogue: every code has a status, and docs/api.md lists exactly the codes that exist."""

import re
from pathlib import Path

from app.core.errors import HTTP_STATUS, ErrorCode, ServiceError

DOCS = Path(__file__).resolve().parents[3] / "docs" / "api.md"
ROW = re.compile(r"^\| `([a-z_]+)` \| (\d{3}) \| [^|]+ \| [^|]+ \|$")


def documented() -> dict[str, int]:
    text = DOCS.read_text()
    section = text[text.index("## Errors"):]
    section = section[:section.index("\n## ", 1)]
    return {m.group(1): int(m.group(2)) for line in section.splitlines() if (m := ROW.match(line))}


def test_every_code_has_a_status() -> None:
    assert set(HTTP_STATUS) == set(ErrorCode)
    assert all(400 <= status < 600 for status in HTTP_STATUS.values())


def test_docs_list_every_code_with_its_status_and_nothing_else() -> None:
    docs = documented()
    assert sorted(set(ErrorCode) - set(docs)) == [], "codes missing from docs/api.md"
    assert sorted(set(docs) - set(ErrorCode)) == [], "docs/api.md names codes that do not exist"
    assert {code: status for code, status in docs.items()} == {code.value: s for code, s in HTTP_STATUS.items()}


def test_the_status_comes_from_the_code() -> None:
    error = ServiceError(ErrorCode.QUOTA_EXCEEDED, "full")
    assert (error.status_code, error.code, error.message) == (413, "quota_exceeded", "full")
    assert ServiceError("not_found", "gone").code is ErrorCode.NOT_FOUND
