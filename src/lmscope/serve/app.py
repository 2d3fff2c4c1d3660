"""`lmscope serve`: a web app over one suite (pages + JSON API), bound to loopback by default.

>>> app = create_app("runs/quick/suite")   # then: uvicorn.run(app, host="127.0.0.1", port=8000)

Every error reaches the client as a message it can act on: JSON ``{"error": ...}`` under ``/api/``,
an error page elsewhere, with a 4xx status for a bad request and never a traceback.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from lmscope.errors import LmscopeError
from lmscope.serve import api, pages
from lmscope.serve.engine import Engine, Limits, ServeError
from lmscope.serve.graphs import Explorer
from lmscope.suite import Suite

log = logging.getLogger("lmscope.serve")
STATIC = Path(__file__).parent / "static"
# Pages load only their own script and styles; inline style attributes carry the token colours.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")  # fmt: skip


def create_app(
    suite: Suite | str | Path, *, device: str | None = None, limits: Limits | None = None
) -> FastAPI:
    """The app for one suite; the model and SAEs load on the first request that needs them."""
    suite = suite if isinstance(suite, Suite) else Suite.open(suite)
    suite.require_site_saes("serve")
    app = FastAPI(
        title="lmscope",
        summary=f"Browse the SAE suite {suite.path.name} of {suite.model}",
        description="JSON API of `lmscope serve`: the suite, its SAEs and features, the inspector, "
        "the steering playground and the graph explorer. "
        'Errors are `{"error": message}` with a 4xx status.',
        version="1",
        redoc_url=None,
    )
    app.state.engine = Engine(suite, device=device, limits=limits)
    app.state.explorer = Explorer(app.state.engine)
    app.state.templates = pages.make_env()
    app.include_router(api.router)
    app.include_router(pages.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _add_error_handlers(app)

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        if not request.url.path.startswith("/docs"):
            response.headers.setdefault("Content-Security-Policy", CSP)
        return response

    return app


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run ``app`` on a background thread (port 0: a free one); yields its base URL, stops on exit.

    >>> with serve_in_thread(create_app("runs/quick/suite")) as url:
    ...     httpx.get(url + "/api/suite").json()
    """
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="lmscope-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise ServeError(f"the server did not start on {host}:{port}", 500)
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _wants_json(request: Request) -> bool:
    path = request.url.path
    return path.startswith("/api/") or path.endswith(".json") or "application/json" in request.headers.get("accept", "")  # fmt: skip


def _reply(request: Request, status: int, message: str) -> Response:
    response = _error_response(request, status, message)
    # a 500 leaves through Starlette's outermost middleware, past security_headers: set them here
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Content-Security-Policy", CSP)
    return response


def _error_response(request: Request, status: int, message: str) -> Response:
    if _wants_json(request):
        return JSONResponse({"error": message}, status_code=status)
    env = request.app.state.templates
    html = env.get_template("error.html").render(status=status, message=message, path=request.url.path,
                                                 suite_name=request.app.state.engine.suite.path.name,
                                                 model=request.app.state.engine.suite.model)  # fmt: skip
    return HTMLResponse(html, status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path"))
        parts.append(f"{where or 'request'}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError) -> Response:
        return _reply(request, exc.status, str(exc))

    @app.exception_handler(LmscopeError)
    async def lmscope_error(request: Request, exc: LmscopeError) -> Response:
        return _reply(request, 400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        return _reply(request, 422, _validation_message(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 404:
            path = request.url.path if len(request.url.path) <= 80 else request.url.path[:80] + "…"
            msg = f"no page at {path!r}; start at / (pages) or /api (the JSON API)"
        else:
            msg = str(exc.detail)
        return _reply(request, exc.status_code, msg)

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> Response:
        log.exception("error serving %s", request.url.path)
        return _reply(request, 500, f"the server failed on this request ({type(exc).__name__}: {exc}); see the server log")  # fmt: skip
