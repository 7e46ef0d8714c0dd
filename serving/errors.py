"""Every failure a request can meet, mapped to an HTTP status in this one module.

Handlers raise :class:`ServingError` subclasses (or let a domain exception propagate);
:func:`to_serving_error` turns anything else into one, and :func:`install_handlers` makes FastAPI
answer with OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``.
An unexpected exception becomes a 500 with a generic message and is logged; no input is meant
to reach that path.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1


class ServingError(Exception):
    """A request failure with its HTTP status and OpenAI error fields."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class InvalidRequest(ServingError):
    status, type, code = 400, "invalid_request_error", "invalid_value"


class ValidationFailed(InvalidRequest):
    status, code = 422, "validation_error"


class Unauthorized(ServingError):
    status, type, code = 401, "authentication_error", "invalid_api_key"

    def __init__(self, message: str = "missing or invalid API key: send 'Authorization: Bearer <key>'"):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class ModelNotFound(ServingError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class RouteNotFound(ServingError):
    status, type, code = 404, "invalid_request_error", "not_found"


class MethodNotAllowed(ServingError):
    status, type, code = 405, "invalid_request_error", "method_not_allowed"


class PayloadTooLarge(ServingError):
    status, type, code = 413, "invalid_request_error", "payload_too_large"


class Overloaded(ServingError):
    status, type, code = 503, "overloaded_error", "overloaded"

    def __init__(self, message: str = "the server is at capacity; retry shortly",
                 retry_after_s: int = RETRY_AFTER_S) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class NotReady(Overloaded):
    code = "not_ready"


class SessionLost(Overloaded):
    """An ensemble session's replica went away (restart or a miss-routed call)."""

    code = "session_lost"


def to_serving_error(exc: BaseException) -> ServingError:
    """Map any exception (domain, Ray, validation) to the ServingError the client should see."""
    from ray import exceptions as ray_exc
    from ray.serve import exceptions as serve_exc

    from experts.checkpoint import CheckpointError

    if isinstance(exc, ServingError):
        return exc
    if isinstance(exc, ray_exc.RayTaskError):  # an exception raised inside a replica
        cause = exc.as_instanceof_cause()
        if not isinstance(cause, ray_exc.RayTaskError):
            return to_serving_error(cause)
    if isinstance(exc, serve_exc.BackPressureError):
        return Overloaded(f"the server is at capacity ({exc.message}); retry shortly")
    if isinstance(exc, (serve_exc.DeploymentUnavailableError, serve_exc.ReplicaUnavailableError,
                        ray_exc.RayActorError)):  # RayActorError: ActorDiedError, ActorUnavailableError
        return NotReady(f"a model replica is unavailable ({type(exc).__name__}); retry shortly")
    if isinstance(exc, CheckpointError):
        log.error("checkpoint error while serving: %s", exc)
        return NotReady("a model checkpoint could not be loaded; see the server log")
    if isinstance(exc, KeyError) and str(exc).startswith("'session"):
        return SessionLost(f"ensemble session lost ({exc}); retry the request")
    if isinstance(exc, ValueError):  # bad sampling parameters and the like
        return InvalidRequest(str(exc))
    log.exception("unexpected error while serving", exc_info=exc)
    return ServingError("internal server error")


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "list", "dict"})


def _validation_error(exc: RequestValidationError) -> ServingError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return InvalidRequest(f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip(),
                              code="invalid_json")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # drop list indices and pydantic's union-member tags ("str", "list[int]", "constrained-str",
    # "function-after[...]") so `param` names the field; our field names have no "[" or "-"
    field_path = [p for p in loc if not (p.isdigit() or "[" in p or "-" in p or p in _TYPE_TAGS)]
    param = ".".join(field_path) or None
    message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                        for e in errors[:3])
    return ValidationFailed(message, param=param)


def install_handlers(app: FastAPI) -> None:
    """Make every error path of ``app`` answer with an OpenAI-style error body."""

    @app.exception_handler(ServingError)
    async def _serving(_: Request, exc: ServingError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: RouteNotFound, 405: MethodNotAllowed, 413: PayloadTooLarge}
        err = kinds.get(exc.status_code, InvalidRequest)(str(exc.detail))
        if exc.status_code not in kinds:
            err.status = exc.status_code
        return err.response()

    @app.exception_handler(Exception)
    async def _other(_: Request, exc: Exception) -> JSONResponse:
        return to_serving_error(exc).response()
