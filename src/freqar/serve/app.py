"""The ASGI app of ``freqar serve``: one static page plus a small JSON API over :class:`Studio`.

Routes (all state lives in ``app.state.studio``, nothing is global):

- ``GET /`` and ``GET /static/<file>``: the page (plain HTML/JS shipped as package data);
- ``GET /api/models``: the models the server was started with, their defaults and policy knobs;
- ``POST /api/generate``: generate and answer when done (JSON, or the PNG itself with ``Accept: image/png``);
- ``POST /api/jobs``: queue and answer at once (202); ``GET /api/jobs/<id>`` to poll progress and result;
- ``GET /api/jobs/<id>/{image,masks,dense}.png``: the pictures.

Errors are JSON ``{"error": {"field": ..., "message": ...}}``; a full queue is 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..pipeline import Pipeline
from .studio import FieldError, GenerateRequest, QueueFull, ServeSettings, Studio

STATIC = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
PICTURES = ("image", "masks", "dense")
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; "
        b"connect-src 'self'; frame-ancestors 'none'",
    ),
]


class SecurityHeaders:
    """Adds the headers that keep other sites from framing the page or sniffing the API's answers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers)


def error(
    status: int, field: str | None, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"field": field, "message": message}}, status, headers=headers)


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, refusing non-JSON content types and bodies over ``limit`` bytes (413)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        # Requiring JSON also makes a cross-site form post a CORS-preflighted request, which we never allow.
        raise FieldError("body", "Content-Type must be application/json", 415)
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise FieldError("body", f"request body over {limit} bytes", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise FieldError("body", f"request body over {limit} bytes", 413)
        chunks.append(chunk)

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not allowed")

    try:
        return json.loads(b"".join(chunks), parse_constant=no_constants)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError; nesting bombs recurse
        raise FieldError("body", f"the body is not valid JSON ({str(e)[:80]})", 400) from None


async def _admit(request: Request) -> tuple[GenerateRequest, Any, Any]:
    studio: Studio = request.app.state.studio
    body = await read_json(request, studio.settings.max_body)
    req = studio.parse(body)
    job, fut = studio.submit(req)
    return req, job, fut


def _refusal(e: Exception) -> JSONResponse:
    if isinstance(e, QueueFull):
        return error(503, None, str(e), {"Retry-After": str(e.retry_after)})
    assert isinstance(e, FieldError)
    return error(e.status, e.field, e.message)


async def api_generate(request: Request) -> Response:
    """Generate and answer when done; ``Accept: image/png`` returns the picture with settings in headers."""
    try:
        req, job, fut = await _admit(request)
    except (FieldError, QueueFull) as e:
        return _refusal(e)
    await asyncio.wrap_future(fut)
    view = job.view()
    if job.status != "done":
        return JSONResponse(view, 500)
    accept = request.headers.get("accept", "")
    if "image/png" in accept and "application/json" not in accept:
        headers = {
            "X-Freqar-Job": job.id,
            "X-Freqar-Seed": str(req.seed),
            "X-Freqar-Label": str(view["label"]),
            "X-Freqar-Settings": json.dumps(req.settings(), separators=(",", ":")),
        }
        return Response(job.files["image"], media_type="image/png", headers=headers)
    return JSONResponse(view)


async def api_jobs_create(request: Request) -> Response:
    """Queue a generation and answer at once (202); the page then polls the job."""
    try:
        _, job, _ = await _admit(request)
    except (FieldError, QueueFull) as e:
        return _refusal(e)
    return JSONResponse(job.view(), 202, headers={"Location": f"/api/jobs/{job.id}"})


async def api_job(request: Request) -> Response:
    job = request.app.state.studio.job(request.path_params["job_id"])
    if job is None:
        return error(404, None, "no such job (finished jobs are kept for a while, then dropped)")
    return JSONResponse(job.view(), headers={"Cache-Control": "no-store"})


async def api_picture(request: Request) -> Response:
    job = request.app.state.studio.job(request.path_params["job_id"])
    name = request.path_params["name"]
    if job is None or name not in PICTURES or name not in job.files:
        return error(404, None, "no such picture")
    return Response(
        job.files[name], media_type="image/png", headers={"Cache-Control": "private, max-age=3600"}
    )


async def api_models(request: Request) -> Response:
    studio: Studio = request.app.state.studio
    s = studio.settings
    limits = {"max_body": s.max_body, "concurrency": s.concurrency, "queue": s.queue}
    return JSONResponse({"models": studio.models_info(), "limits": limits})


async def static(request: Request) -> Response:
    name = request.path_params.get("name", "index.html")
    files: dict[str, bytes] = request.app.state.static
    if name not in files:
        return error(404, None, "not found")
    return Response(files[name], media_type=STATIC[name], headers={"Cache-Control": "no-cache"})


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error(exc.status_code, None, exc.detail, getattr(exc, "headers", None))


def load_static() -> dict[str, bytes]:
    """The page's files, read once from package data (a fixed list: no path ever comes from a request)."""
    root = resources.files("freqar.serve").joinpath("static")
    return {name: root.joinpath(name).read_bytes() for name in STATIC}


def create_app(
    models: dict[str, Pipeline],
    settings: ServeSettings | None = None,
    allowed_hosts: list[str] | None = None,
) -> Starlette:
    """Build the app for the given (already loaded) models; ``allowed_hosts`` guards against DNS rebinding."""
    studio = Studio(models, settings)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        studio.close()

    middleware = [Middleware(SecurityHeaders)]
    if allowed_hosts:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts))
    app = Starlette(
        routes=[
            Route("/", static, methods=["GET"]),
            Route("/static/{name}", static, methods=["GET"]),
            Route("/api/models", api_models, methods=["GET"]),
            Route("/api/generate", api_generate, methods=["POST"]),
            Route("/api/jobs", api_jobs_create, methods=["POST"]),
            Route("/api/jobs/{job_id}", api_job, methods=["GET"]),
            Route("/api/jobs/{job_id}/{name}.png", api_picture, methods=["GET"]),
        ],
        middleware=middleware,
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.studio = studio
    app.state.static = load_static()
    return app
