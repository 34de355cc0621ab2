"""The FastAPI app of `histocsc serve`: routes, API key, one log line per request, JSON errors.

No traceback ever reaches a client: every error is `{"error": "..."}` with its status, and an
unexpected one is a 500 whose traceback goes to the server log only. The two health checks are
answered by the outermost middleware, before any routing, thread pool or queue, so a 1 s probe
holds under load.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from histocsc import __version__
from histocsc.errors import HistocscError
from histocsc.serve import job_routes, oip
from histocsc.serve.http import protocol_with_timeout
from histocsc.serve.metrics import CONTENT_TYPE
from histocsc.serve.schemas import clean_openapi, errors
from histocsc.serve.security import HttpError, authorized
from histocsc.serve.service import ServeSettings, Service, service
from histocsc.serve.upload import DISK_FULL

log = logging.getLogger("histocsc.serve")
LIVE, READY = "/v2/health/live", "/v2/health/ready"
OPEN_PATHS = (LIVE, READY)
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
STOP_TIMEOUT_S = 4  # uvicorn's wait for open requests on SIGTERM; the whole stop stays < 10 s


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class Gate:
    """ASGI middleware: the API key check, request metrics and one log line per request."""

    def __init__(self, app: ASGIApp, svc: Service) -> None:
        self.app = app
        self.svc = svc

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if status == 405:  # Starlette lists the first matching route's methods only
                    message["headers"] = [(k, v) for k, v in message.get("headers", [])
                                          if k.lower() != b"allow"]
                    message["headers"].append((b"allow", allowed_methods(scope).encode()))
            await send(message)

        try:
            if scope["path"] in OPEN_PATHS and scope["method"] in ("GET", "HEAD"):
                await self.health(scope, receive, send_status)
                return
            if self.svc.api_key is not None and scope["path"] not in OPEN_PATHS:
                headers = dict(scope["headers"])
                auth = headers.get(b"authorization", b"").decode("latin-1")
                if not authorized(auth, self.svc.api_key):
                    response = error(401, "missing or wrong API key: send 'Authorization: "
                                          "Bearer <key>'", {"WWW-Authenticate": "Bearer"})
                    await response(scope, receive, send_status)
                    return
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.svc.metrics.requests.labels(route=route, method=scope["method"],
                                             status=str(status)).inc()
            client = scope.get("client") or ("-", 0)
            log.info("%s %s %s %d %.1f ms", client[0], scope["method"], scope["path"], status,
                     1000 * (time.perf_counter() - start))

    async def health(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Liveness, or readiness from in-memory flags: no I/O, no thread pool."""
        if scope["path"] == LIVE:
            body, code = {"live": True}, 200
        else:
            reasons = self.svc.not_ready()
            body, code = {"ready": not reasons, "reasons": reasons}, 503 if reasons else 200
        await JSONResponse(body, status_code=code)(scope, receive, send)


def allowed_methods(scope: Scope) -> str:
    """The documented methods of the request's path (for Allow on a 405): the routes are
    matched by the OpenAPI path templates, so nested routers need no walking."""
    app = scope["app"]
    table = getattr(app.state, "allow_table", None)
    if table is None:
        table = app.state.allow_table = [
            (re.compile("^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(path)) + "$"),
             {m.upper() for m in item if m in HTTP_METHODS})
            for path, item in app.openapi()["paths"].items()]
    methods: set[str] = set()
    for pattern, allowed in table:
        if pattern.match(scope["path"]):
            methods |= allowed
    return ", ".join(sorted(methods))


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors():
        where = ".".join(str(p) for p in e.get("loc", ()))
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def add_error_handlers(app: FastAPI) -> None:
    """Every error as {"error": "..."}: 4xx with the reason, 500 without details."""

    @app.exception_handler(HttpError)
    async def _http_error(_: Request, exc: HttpError) -> JSONResponse:
        return error(exc.status, exc.message, exc.headers)

    @app.exception_handler(HistocscError)
    async def _user_error(_: Request, exc: HistocscError) -> JSONResponse:
        return error(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _starlette(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error(400, _validation_message(exc))

    @app.exception_handler(sqlite3.Error)
    async def _database(request: Request, exc: sqlite3.Error) -> JSONResponse:
        log.error("job database error on %s %s: %s", request.method, request.url.path, exc)
        return error(503, "the job database cannot be written now (disk full?); retry later",
                     {"Retry-After": "30"})

    @app.exception_handler(OSError)
    async def _disk(request: Request, exc: OSError) -> JSONResponse:
        log.error("I/O error on %s %s", request.method, request.url.path, exc_info=exc)
        if exc.errno in DISK_FULL:
            return error(507, "the server's disk is full; retry later", {"Retry-After": "30"})
        return error(503, f"the server cannot read or write its files now "
                          f"({exc.strerror or exc.__class__.__name__}); retry later",
                     {"Retry-After": "30"})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return error(500, "internal server error (details are in the server log)")


def create_app(settings: ServeSettings) -> FastAPI:
    """The app for `settings`; the model loads now, the workers start with the app."""
    svc = Service(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        svc.start()
        if svc.interrupted:
            log.warning("marked %d job(s) interrupted by the last stop as failed: %s",
                        len(svc.interrupted), ", ".join(svc.interrupted))
        if svc.orphans:
            log.warning("removed %d job folder(s) without a record (uploads cut short): %s",
                        len(svc.orphans), ", ".join(svc.orphans))
        log.info("%s; serving model %r at http://%s:%d (docs at /docs)", svc.engine.describe(),
                 settings.model_name, settings.host, settings.port)
        try:
            yield
        finally:
            svc.stop()

    app = FastAPI(title="histocsc serve", version=__version__, lifespan=lifespan,
                  description="Tile inference over the Open Inference Protocol (KServe v2 REST, "
                              "as Triton) and asynchronous whole-slide jobs.")
    app.state.service = svc
    app.include_router(oip.router)
    app.include_router(job_routes.router)

    @app.get("/metrics", tags=["Monitoring"], summary="Prometheus metrics (text format)",
             response_class=Response, responses={
                 200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
                 **errors(401)})
    def metrics(request: Request) -> Response:
        return Response(service(request).metrics.render(), media_type=CONTENT_TYPE)

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)
            app.openapi_schema = clean_openapi(json.loads(json.dumps(schema)),
                                               svc.api_key is not None)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    add_error_handlers(app)
    app.add_middleware(Gate, svc=svc)
    return app


def run_server(settings: ServeSettings) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM finish the running request and stop)."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, access_log=False,
                            log_config=None, timeout_graceful_shutdown=STOP_TIMEOUT_S,
                            http=protocol_with_timeout(settings.header_timeout_s))
    uvicorn.Server(config).run()

