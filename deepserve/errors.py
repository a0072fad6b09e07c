"""The exception tree. Every dialect maps it to its own error envelope in exactly one place.

    DeepserveError (500, server_error)
    ├── InvalidRequestError (400)         bad parameter value, malformed body
    │   └── ContextLengthError (400)      prompt + max_tokens do not fit the context window
    ├── PayloadTooLargeError (413)
    ├── AuthenticationError (401)         missing, unknown, expired or revoked key
    ├── InsufficientBalanceError (402)    the account cannot cover this request's worst-case cost
    ├── PermissionDeniedError (403)       the key may not use this model (or the admin API)
    ├── NotFoundError (404)               unknown model or route
    │   └── ModelNotFoundError (404)
    ├── ConflictError (409)               the same Idempotency-Key is still being answered
    ├── IdempotencyMismatchError (422)    an Idempotency-Key reused for a different request
    ├── QueueFullError (429)              the engine's waiting queue is full: retry later
    ├── RateLimitError (429)              the key's requests or tokens per minute are used up
    ├── EngineError (500)                 the engine failed this request (others keep running)
    └── ServiceUnavailableError (503)     not ready or shutting down
"""

from __future__ import annotations


class DeepserveError(Exception):
    status_code = 500
    error_type = "server_error"
    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.headers: dict[str, str] = {}
        self.details: list[str] = []  # the separate problems, when there are several (one per invalid field)


class InvalidRequestError(DeepserveError):
    status_code = 400
    error_type = "invalid_request_error"


class NotSupportedError(DeepserveError):
    """The request asks for what this model cannot do (llama-server's 501 not_supported_error)."""

    status_code = 501
    error_type = "not_supported_error"


class ContextLengthError(InvalidRequestError):
    default_code = "context_length_exceeded"

    def __init__(self, message: str, *, param: str | None = None, num_prompt_tokens: int | None = None,
                 ctx_size: int | None = None):
        super().__init__(message, param=param)
        self.num_prompt_tokens = num_prompt_tokens  # llama-server's n_prompt_tokens and n_ctx, where known
        self.ctx_size = ctx_size


class PayloadTooLargeError(DeepserveError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class AuthenticationError(DeepserveError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class InsufficientBalanceError(DeepserveError):
    """DeepSeek answers 402 {"error": {"message": "Insufficient Balance", ...}}; each dialect maps it."""

    status_code = 402
    error_type = "insufficient_quota"
    default_code = "insufficient_balance"


class PermissionDeniedError(DeepserveError):
    status_code = 403
    error_type = "permission_error"
    default_code = "permission_denied"


class NotFoundError(DeepserveError):
    status_code = 404
    error_type = "not_found_error"


class ModelNotFoundError(NotFoundError):
    error_type = "invalid_request_error"
    default_code = "model_not_found"


class QueueFullError(DeepserveError):
    status_code = 429
    error_type = "rate_limit_error"
    default_code = "queue_full"

    def __init__(self, message: str, *, retry_after_s: int = 1):
        super().__init__(message)
        self.headers["Retry-After"] = str(retry_after_s)


class RateLimitError(DeepserveError):
    """A key's own limit (requests or tokens per minute); `headers` carry Retry-After and x-ratelimit-*."""

    status_code = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class ConflictError(DeepserveError):
    status_code = 409
    error_type = "invalid_request_error"
    default_code = "idempotency_key_in_use"


class IdempotencyMismatchError(DeepserveError):
    status_code = 422
    error_type = "invalid_request_error"
    default_code = "idempotency_key_reused"


class EngineError(DeepserveError):
    status_code = 500
    error_type = "server_error"
    default_code = "engine_error"


class ServiceUnavailableError(DeepserveError):
    status_code = 503
    error_type = "service_unavailable"
    default_code = "service_unavailable"
