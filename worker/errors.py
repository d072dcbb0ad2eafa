"""Failures a job or an inspection reports to the user, each with a stable code."""


class JobFailure(Exception):
    """A reason the job cannot succeed that the user should read (bad model, unsupported op, no GPU...)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class JobCancelled(Exception):
    """The user asked to cancel; raised at the next check."""


class JobLost(Exception):
    """Another worker took the job over (our heartbeat went stale): stop without writing anything."""
