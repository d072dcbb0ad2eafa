"""The one catalogue of error codes, each with its HTTP status, for the API's answers and for jobs' failures alike.

A code is a stable, documented id (docs/api.md lists every one with its status and meaning; a test keeps the two
in step). The API answers a ServiceError with the status from HTTP_STATUS; a job or an inspection that fails
records the code and message on its row. Pure stdlib: the upload vetting imports this too.
"""

from enum import StrEnum


class ErrorCode(StrEnum):
    # The request itself
    BAD_REQUEST = "bad_request"
    INVALID_CURSOR = "invalid_cursor"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    INVALID_REQUEST = "invalid_request"
    TOO_LARGE = "too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    # State and limits
    CONFLICT = "conflict"
    JOB_FINISHED = "job_finished"
    JOB_ACTIVE = "job_active"
    KEY_INACTIVE = "key_inactive"
    KEY_EXPIRING = "key_expiring"
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
    MODEL_IN_USE = "model_in_use"
    DATASET_IN_USE = "dataset_in_use"
    MODEL_INVALID = "model_invalid"
    QUOTA_EXCEEDED = "quota_exceeded"
    RATE_LIMITED = "rate_limited"
    TOO_MANY_JOBS = "too_many_jobs"
    TOO_MANY_KEYS = "too_many_keys"
    TOO_MANY_STREAMS = "too_many_streams"
    # Uploaded files
    EMPTY_FILE = "empty_file"
    UNSUPPORTED_FORMAT = "unsupported_format"
    FORMAT_MISMATCH = "format_mismatch"
    PICKLED_MODEL = "pickled_model"
    UNSAFE_PICKLE = "unsafe_pickle"
    UNSAFE_WEIGHTS = "unsafe_weights"
    CORRUPT_ARCHIVE = "corrupt_archive"
    UNSAFE_ARCHIVE = "unsafe_archive"
    ARCHIVE_TOO_LARGE = "archive_too_large"
    MISSING_CONFIG = "missing_config"
    MISSING_WEIGHTS = "missing_weights"
    INVALID_CONFIG = "invalid_config"
    REMOTE_CODE_REFUSED = "remote_code_refused"
    INVALID_DATASET = "invalid_dataset"
    # What a worker finds when it opens a model or runs a job
    INVALID_MODEL = "invalid_model"
    INVALID_TOKENIZER = "invalid_tokenizer"
    WEIGHTS_MISMATCH = "weights_mismatch"
    UNSUPPORTED_MODEL = "unsupported_model"
    UNSUPPORTED_ARCHITECTURE = "unsupported_architecture"
    UNSUPPORTED_FOR_FORMAT = "unsupported_for_format"
    INVALID_RECIPE = "invalid_recipe"
    INPUT_SPEC_NEEDED = "input_spec_needed"
    MODEL_MISSING = "model_missing"
    DATASET_MISSING = "dataset_missing"
    QUANTIZATION_FAILED = "quantization_failed"
    EXPORT_FAILED = "export_failed"
    TUNING_FAILED = "tuning_failed"
    FIDELITY_COLLAPSE = "fidelity_collapse"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    WORKER_LOST = "worker_lost"
    CUDA_UNAVAILABLE = "cuda_unavailable"
    NO_WORKER = "no_worker"
    RESOURCE_LIMIT = "resource_limit"
    CRASHED = "crashed"
    # The service
    INTERNAL_ERROR = "internal_error"
    UNAVAILABLE = "unavailable"
    DATABASE_UNAVAILABLE = "database_unavailable"
    STORAGE_UNAVAILABLE = "storage_unavailable"


# For a job's failure, the status is the one the API would give the same fault in a request.
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.INVALID_CURSOR: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.MODEL_MISSING: 404,
    ErrorCode.DATASET_MISSING: 404,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.CONFLICT: 409,
    ErrorCode.JOB_FINISHED: 409,
    ErrorCode.JOB_ACTIVE: 409,
    ErrorCode.KEY_INACTIVE: 409,
    ErrorCode.KEY_EXPIRING: 409,
    ErrorCode.IDEMPOTENCY_KEY_REUSED: 409,
    ErrorCode.MODEL_IN_USE: 409,
    ErrorCode.DATASET_IN_USE: 409,
    ErrorCode.MODEL_INVALID: 409,
    ErrorCode.CANCELLED: 409,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.QUOTA_EXCEEDED: 413,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorCode.UNSUPPORTED_FORMAT: 415,
    ErrorCode.FORMAT_MISMATCH: 415,
    ErrorCode.PICKLED_MODEL: 415,
    ErrorCode.UNSAFE_PICKLE: 415,
    ErrorCode.UNSAFE_WEIGHTS: 415,
    ErrorCode.CORRUPT_ARCHIVE: 415,
    ErrorCode.UNSAFE_ARCHIVE: 415,
    ErrorCode.ARCHIVE_TOO_LARGE: 415,
    ErrorCode.MISSING_CONFIG: 415,
    ErrorCode.MISSING_WEIGHTS: 415,
    ErrorCode.INVALID_CONFIG: 415,
    ErrorCode.REMOTE_CODE_REFUSED: 415,
    ErrorCode.INVALID_REQUEST: 422,
    ErrorCode.EMPTY_FILE: 422,
    ErrorCode.INVALID_DATASET: 422,
    ErrorCode.INVALID_MODEL: 422,
    ErrorCode.INVALID_TOKENIZER: 422,
    ErrorCode.WEIGHTS_MISMATCH: 422,
    ErrorCode.UNSUPPORTED_MODEL: 422,
    ErrorCode.UNSUPPORTED_ARCHITECTURE: 422,
    ErrorCode.UNSUPPORTED_FOR_FORMAT: 422,
    ErrorCode.INVALID_RECIPE: 422,
    ErrorCode.INPUT_SPEC_NEEDED: 422,
    ErrorCode.FIDELITY_COLLAPSE: 422,
    ErrorCode.RESOURCE_LIMIT: 422,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.TOO_MANY_JOBS: 429,
    ErrorCode.TOO_MANY_KEYS: 429,
    ErrorCode.TOO_MANY_STREAMS: 429,
    ErrorCode.INTERNAL_ERROR: 500,
    ErrorCode.QUANTIZATION_FAILED: 500,
    ErrorCode.EXPORT_FAILED: 500,
    ErrorCode.TUNING_FAILED: 500,
    ErrorCode.WORKER_LOST: 500,
    ErrorCode.CRASHED: 500,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.DATABASE_UNAVAILABLE: 503,
    ErrorCode.STORAGE_UNAVAILABLE: 503,
    ErrorCode.CUDA_UNAVAILABLE: 503,
    ErrorCode.NO_WORKER: 503,
    ErrorCode.TIMEOUT: 504,
}


class ServiceError(Exception):
    """A failure the user should read: a code from the catalogue and a message that names the problem."""

    def __init__(self, code: ErrorCode, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.headers = headers

    @property
    def status_code(self) -> int:
        return HTTP_STATUS[self.code]
