"""Typed errors. Each says what was expected and what was found; `status_code` is the one
place that maps an error to HTTP (the server's exception handler reads it)."""


class PrefixServeError(Exception):
    """Base of every error we raise on purpose."""

    status_code = 500
    code = "internal_error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ConfigError(PrefixServeError):
    """A configuration value is out of range or inconsistent."""

    code = "invalid_config"


class ModelLoadError(PrefixServeError):
    """The backbone cannot be found, read or understood."""

    code = "model_load_error"


class InvalidRequestError(PrefixServeError):
    """A request's prompt or sampling parameters are not acceptable."""

    status_code = 400
    code = "invalid_request"


class AdapterError(InvalidRequestError):
    """An adapter artifact or PEFT upload is malformed, unsafe, or does not fit this backbone."""

    code = "invalid_adapter"


class AdapterFailedError(PrefixServeError):
    """A task version passed validation but failed while being served (compiled onto the device or run
    in a step); it is quarantined on this server, and only its own requests end with this error."""

    status_code = 422
    code = "adapter_failed"


class PayloadTooLargeError(InvalidRequestError):
    """An upload is larger than the configured limit."""

    status_code = 413
    code = "payload_too_large"


class TaskNotFoundError(PrefixServeError):
    """A request names a task that is not registered (for this tenant)."""

    status_code = 404
    code = "task_not_found"


class StoreUnavailableError(PrefixServeError):
    """The adapter store cannot be reached (e.g. Redis is down); already-loaded tasks keep serving."""

    status_code = 503
    code = "store_unavailable"
    retry_after_s = 1.0


class StoreCorruptError(PrefixServeError):
    """A stored blob's bytes no longer hash to its version (disk or operator damage)."""

    code = "store_corrupt"


class RequestTimeoutError(PrefixServeError):
    """A request ran past the server's per-request time limit; it was aborted and its pages freed."""

    status_code = 504
    code = "timeout"


class BodyTooSlowError(InvalidRequestError):
    """A request body arrived slower than the server's minimum rate (a stalled or slow-loris upload
    would otherwise hold a connection and its handler for as long as it likes)."""

    status_code = 408
    code = "body_too_slow"


class NotAvailableError(PrefixServeError):
    """The endpoint exists in the API but this server cannot serve it yet."""

    status_code = 501
    code = "not_implemented"


class EngineOverloadedError(PrefixServeError):
    """The engine's bounded waiting queue is full; the caller should retry later."""

    status_code = 503
    code = "overloaded"

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineDeadError(PrefixServeError):
    """The engine loop stopped (crash or shutdown); no request can be served."""

    status_code = 503
    code = "engine_dead"


class UnauthorizedError(PrefixServeError):
    """A missing or unknown API key (the message never says which keys exist)."""

    status_code = 401
    code = "unauthorized"


class ForbiddenError(PrefixServeError):
    """A valid key asked for something only the admin key may do."""

    status_code = 403
    code = "forbidden"


class RateLimitedError(PrefixServeError):
    """A tenant is over one of its limits (requests/min, tokens/min, concurrency, tasks, bytes)."""

    status_code = 429
    code = "rate_limited"

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TrainingDataError(InvalidRequestError):
    """A training job's data or hyperparameters cannot be trained on (says which line or field)."""

    code = "invalid_training_data"


class TrainingFailedError(PrefixServeError):
    """A training job stopped without a usable adapter (e.g. the loss became NaN); nothing was published."""

    status_code = 422
    code = "training_failed"


class JobNotFoundError(PrefixServeError):
    """No training job with that id (for this tenant)."""

    status_code = 404
    code = "job_not_found"


def expect(condition: bool, error: type[PrefixServeError], message: str) -> None:
    """Raise `error(message)` unless `condition` holds (input validation, never `assert`)."""
    if not condition:
        raise error(message)
