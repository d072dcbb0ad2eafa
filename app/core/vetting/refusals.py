"""The refusals model-file vetting raises, shared by every vetting module and caught by the API and the worker.

Pure stdlib, like the rest of the model-file vetting: the API process imports it.
"""

from __future__ import annotations

from app.core.errors import ErrorCode, ServiceError


class UnsupportedModelFile(ServiceError):
    """An upload we refuse, with the catalogue's code for why."""


class UnsafeModelFile(UnsupportedModelFile):
    """Pickled content that could run code when loaded, or that we cannot vet."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.UNSAFE_PICKLE, message)
