"""The audit app's HTTP layer: the page and a JSON API under /api/, over an `AuditService`.

FastAPI (on Starlette) gives request validation and JSON errors for little code, and its
`TestClient` tests the API without a socket; uvicorn serves it. Endpoints are plain `def`s:
FastAPI runs them in its thread pool and the service's lock lets one model call run at a time,
so concurrent requests queue rather than fail.

The service's answers are plain JSON types, so the heavy endpoints return them as a
`JSONResponse` directly: FastAPI's encoder walk costs more than the work itself on the queries
view's thousands of hits. Every refusal is a 4xx JSON body `{"error": "<one line>"}`; nothing
the app serves comes from the network (the page, its CSS and JavaScript are one packaged template).
"""

from __future__ import annotations

import json
import socket
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rept.errors import ReptError

TEMPLATES = Path(__file__).parent / "templates"
MAX_BODY_BYTES = 1 << 20   # request bodies over 1 MiB are refused before they are parsed


def render_page(service) -> str:
    import jinja2

    from rept.report import NEG, POS

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True)
    return env.get_template("app.html.j2").render(info=service.info(), mitigations=service.mitigations,
                                                  pos=POS, neg=NEG)


def create_app(service):
    """The FastAPI app over `service` (an AuditService)."""
    from fastapi import Body, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from rept.app.service import AppError

    app = FastAPI(title="rept audit app", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    page = render_page(service)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(AppError)
    async def _app_error(request: Request, exc: AppError):
        return error(exc.status, str(exc))

    @app.exception_handler(ReptError)
    async def _rept_error(request: Request, exc: ReptError):  # e.g. a query the model cannot take
        return error(422, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return error(422, "the request body is not valid JSON")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "request"
        return error(422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail))

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
            return error(413, f"request body is {int(size)} bytes; the app takes at most {MAX_BODY_BYTES}")
        return await call_next(request)

    def body_object(body: Any) -> dict:
        if not isinstance(body, dict):
            raise AppError("the request body must be a JSON object")
        return body

    def int_param(body: dict, name: str, default):
        value = body.get(name, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise AppError(f"{name} must be an integer, not {value!r}")
        return value

    def bool_param(body: dict, name: str):
        value = body.get(name)
        if value is not None and not isinstance(value, bool):
            raise AppError(f"{name} must be true or false, not {value!r}")
        return value

    def str_param(body: dict, name: str, default=None):
        value = body.get(name, default)
        if value is not None and not isinstance(value, str):
            raise AppError(f"{name} must be a string, not {value!r}")
        return value

    @app.get("/", response_class=HTMLResponse)
    def index_page():
        return HTMLResponse(page)

    @app.get("/api/info")
    def info():
        return service.info()

    @app.post("/api/generate")
    def generate(body: Any = Body(...)):
        body = body_object(body)
        corrected = bool_param(body, "corrected")
        answer = service.generate(str_param(body, "prompt", ""), int_param(body, "max_new_tokens", 64), corrected)
        return {"prompt": body["prompt"], "response": answer,
                "corrected": service.correction is not None if corrected is None else corrected}

    @app.post("/api/generate/stream")
    def generate_stream(body: Any = Body(...)):
        """NDJSON: {"text": answer so far} lines while the model writes, then {"response": answer}."""
        body = body_object(body)
        pieces = service.generate_stream(str_param(body, "prompt", ""), int_param(body, "max_new_tokens", 64),
                                         bool_param(body, "corrected"))

        def lines():
            for kind, text in pieces:
                key = {"text": "text", "done": "response", "error": "error"}[kind]
                yield json.dumps({key: text}) + "\n"
        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.post("/api/trace")
    def trace(body: Any = Body(...)):
        body = body_object(body)
        words = body.get("words", True)
        if not isinstance(words, bool):
            raise AppError(f"words must be true or false, not {words!r}")
        if bool_param(body, "against_base"):
            if body.get("mode") is not None:
                raise AppError("against_base ranks the rows by the contrast on the base model: it takes no mode")
            return JSONResponse(service.trace_against_base(str_param(body, "prompt", ""),
                                                           str_param(body, "response", ""),
                                                           k=int_param(body, "k", 10), label=str_param(body, "label"),
                                                           min_gain=body.get("min_gain"),
                                                           guess_weight=body.get("guess_weight"),
                                                           context=bool_param(body, "context")))
        return JSONResponse(service.trace(str_param(body, "prompt", ""), str_param(body, "response", ""),
                                          k=int_param(body, "k", 10), mode=str_param(body, "mode"), words=words,
                                          label=str_param(body, "label")))

    @app.post("/api/words")
    def words(body: Any = Body(...)):
        body = body_object(body)
        return JSONResponse(service.words(str_param(body, "prompt", ""), str_param(body, "response", ""),
                                          body.get("rows")))

    @app.get("/api/queries")
    def queries(k: str = "10", mode: str | None = None, label: str | None = None, search: str | None = None,
                sort: str = "flagged"):
        return JSONResponse(service.queries_view(k=_int(k, "k"), mode=mode or None, label=label or None,
                                                 search=search, sort=sort))

    @app.get("/api/groups")
    def groups(k: str = "10", mode: str | None = None, n_groups: str | None = None):
        return JSONResponse(service.groups(k=_int(k, "k"), mode=mode or None,
                                           n_groups=None if not n_groups else _int(n_groups, "n_groups")))

    @app.get("/api/rows/{row}")
    def row(row: str):
        return service.row(_int(row, "row", status=404))

    @app.get("/api/mitigations")
    def mitigations():
        return {"mitigations": [{k: (str(v) if k.endswith("_svg") and v is not None else v) for k, v in m.items()}
                                for m in service.mitigations]}

    @app.post("/api/export")
    def export(body: Any = Body(...)):
        """The marked rows as culprits.jsonl (what `rept mitigate --culprits FILE` reads)."""
        body = body_object(body)
        text = service.export(body.get("rows"))
        return Response(text, media_type="application/x-ndjson",
                        headers={"Content-Disposition": 'attachment; filename="culprits.jsonl"'})

    return app


def _int(value: str, name: str, status: int = 400) -> int:
    from rept.app.service import AppError

    try:
        return int(value)
    except (TypeError, ValueError):
        raise AppError(f"{name} must be an integer, not {value!r}", status) from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def uvicorn_server(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning"):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False))


@contextmanager
def running(app, host: str = "127.0.0.1", port: int | None = None, timeout: float = 30.0):
    """Serve `app` in a background thread for the `with` block; yields its base URL
    (tests, benchmarks and notebooks)."""
    import time

    port = port or free_port(host)
    server = uvicorn_server(app, host, port)
    thread = threading.Thread(target=server.run, daemon=True, name="rept-serve")
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the app did not start on {host}:{port}")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
