"""The one exception the client raises for a refused request or an unreachable service."""

import httpx

# Codes the client gives to failures that never got an error body from the service.
CONNECTION_FAILED = "connection_failed"
UNEXPECTED_RESPONSE = "unexpected_response"
CHECKSUM_MISMATCH = "checksum_mismatch"


class ApiError(Exception):
    """The service's `{"error": {"code", "message"}}` with its HTTP status; `status` is None when no answer came
    (code `connection_failed`)."""

    def __init__(self, code: str, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(f"{code}: {message}" if status is None else f"{status} {code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.retry_after = retry_after

    @property
    def is_connection_error(self) -> bool:
        return self.status is None or self.code in ("unavailable", "database_unavailable", "storage_unavailable")

    @classmethod
    def from_response(cls, response: httpx.Response) -> "ApiError":
        """The error body when there is one; otherwise (a proxy's page, an empty body) the status and some text."""
        code, message = f"http_{response.status_code}", (response.text or response.reason_phrase or "")[:300]
        try:
            error = response.json()["error"]
            code, message = str(error["code"]), str(error["message"])
        except (ValueError, KeyError, TypeError):
            pass
        return cls(code, message, response.status_code, retry_after_seconds(response))


def retry_after_seconds(response: httpx.Response) -> float | None:
    """`Retry-After` in seconds (the service sends whole seconds; an HTTP date is not used by it)."""
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
