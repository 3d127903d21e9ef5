"""HTTP errors of the API: `APIError` (raised anywhere in a route), the JSON error body
`{"error": {"type", "message", "field"}}`, and the handlers that give 404/405/422 the same shape.

Status codes: 400 malformed JSON, 401/403 admin auth, 408 timeout, 409 VAR or capture unavailable,
413 prompt too long, 422 invalid field, 429 queue full (Retry-After), 503 shutting down
(Retry-After). Test: `pytest tests/test_server_api.py`.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    def __init__(self, status: int, type_: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.field, self.headers = status, type_, message, field, headers


def error_response(status: int, type_: str, message: str, field: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "message": message, "field": field}}, status, headers=headers)


def timeout_error(limit: float) -> APIError:
    return APIError(408, "timeout", f"the request did not finish within request_timeout_s={limit:g}")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.type, exc.message, exc.field, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # 404 / 405 in the same shape
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, kind, f"{request.method} {request.url.path}: {exc.detail}",
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = list(exc.errors())
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request", "type": "invalid"}
        field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        if first.get("type") == "prompt_too_long":  # schemas.check_sizes: like a prompt over the token limit
            return error_response(413, "prompt_too_long", f"{field}: {first.get('msg')}", field)
        if first.get("type") == "json_invalid":
            return error_response(400, "malformed_json", f"the body is not valid JSON: {first.get('msg')}", "body")
        if field == "body" and first.get("type") in ("model_attributes_type", "dict_type", "missing"):
            return error_response(400, "malformed_json",
                                  "the body must be a JSON object (send Content-Type: application/json)", "body")
        detail = [{"field": ".".join(str(p) for p in e.get("loc", ()) if p != "body"), "message": e.get("msg")}
                  for e in errors]
        body = {"error": {"type": "invalid_request", "message": f"{field}: {first.get('msg')}", "field": field},
                "detail": detail}
        return JSONResponse(body, 422)
