"""The REST API beside the UI, for pipelines: JSON in and out, one server with the Gradio app.

    POST   /api/v1/predict                      multipart: image (file), age, sex, site, target
    GET    /api/v1/predictions                  the history filters → {"total", "items": [...]}
    GET    /api/v1/predictions.csv              the same rows as the History tab's CSV
    GET    /api/v1/predictions/{id}             one stored prediction
    GET    /api/v1/predictions/{id}/heatmap.png the stored Grad-CAM heatmap
    GET    /api/v1/predictions/{id}/report.pdf  the one-page case report
    DELETE /api/v1/predictions/{id}             delete it (204; 404 when there is none)
    GET    /api/v1/openapi.json, /api/v1/docs   the schema and its interactive page

Every route calls :class:`service.prediction.PredictionService`, the UI's and the CLIs' one code
path: the request is validated by :meth:`data_pipeline.request.PredictionRequest.build` and the
filters by :class:`db.queries.HistoryFilter`, so an API client gets the same one-line messages
(``{"error": "..."}``): a :class:`common.errors.DermError` is 400, a database failure 503, a
missing row 404, an upload above the size limit 413, a full queue 503 with the UI's busy message.

Login: when the app has logins (``--auth`` …), each route needs either HTTP Basic with one of them
or the session cookie of a browser that logged in on the app's page; failed Basic logins are
slowed down like the login form's (:class:`app.auth.LoginThrottle`). Predictions share the UI's
limits: ``--concurrency`` run at once, ``--max-queue`` more may wait, beyond that 503.
"""

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator
from typing import Annotated, Any
from urllib.parse import urlparse

from fastapi import Depends, FastAPI, File, Form, HTTPException, Path, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from app.auth import (
    Credentials,
    LoginThrottle,
    basic_credentials,
    client_of,
    route_path,
    session_user,
)
from app.config import Settings
from app.health import Lifecycle
from app.ui.common import record_files
from app.ui.demo import BUSY_MESSAGE
from common.errors import DatabaseError, DermError
from common.version import __version__
from data_pipeline.request import PredictionRequest
from db.queries import FILTER_FIELDS, HistoryFilter
from service import history
from service.prediction import PredictionService, StorageError
from service.report import case_report_pdf, report_filename

API_PREFIX = "/api/v1"
DRAINING_MESSAGE = "The server is shutting down; try again in a moment."
#: Rows one listing page may hold.
PAGE_LIMIT = 1000
#: The history filters the list and CSV endpoints take (:class:`db.queries.HistoryFilter`'s, but
#: the batch id).
_FILTER_PARAMS = tuple(name for name in FILTER_FIELDS if name != "batch_id")
#: Largest row id any backend holds (SQLite's 64-bit INTEGER).
MAX_ID = 2**63 - 1
#: Bytes of multipart framing allowed on top of the largest upload.
MULTIPART_SLACK = 64 * 1024


class MountedApi:
    """ASGI middleware handing ``API_PREFIX`` to the REST app, with or without a proxy's sub-path.

    Why not Starlette's ``Mount``: behind a proxy that strips ``/dermfusion`` the app's
    ``root_path`` is ``/dermfusion`` while request paths lack it, and a ``Mount`` then passes the
    sub-app a path its routes cannot match. Here the sub-app always gets ``root_path`` = the
    public prefix + ``/api/v1`` and a path under it, so its routes match and its docs page finds
    ``openapi.json`` at the public URL."""

    def __init__(self, app: Any, api: Any, prefix: str = API_PREFIX) -> None:
        self.app = app
        self.api = api
        self.prefix = prefix

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") == "http":
            root = str(scope.get("root_path", "") or "")
            route = route_path(scope)
            if route == self.prefix or route.startswith(self.prefix + "/"):
                child = {**scope, "root_path": root + self.prefix, "path": root + route}
                await self.api(child, receive, send)
                return
        await self.app(scope, receive, send)


class UploadLimit:
    """ASGI middleware refusing a ``POST`` body larger than ``limit`` (+ multipart framing)
    before it is read: 413 at once when ``Content-Length`` says so; a body without one that
    grows past the limit is cut off (the request then ends as a client disconnect)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit + MULTIPART_SLACK
        self.message = f"The upload is larger than the limit of {limit} bytes."

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode("latin-1")
        if declared.isdigit() and int(declared) > self.limit:
            await JSONResponse({"error": self.message}, 413)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Any:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                return {"type": "http.disconnect"}
            return message

        await self.app(scope, counted, send)


class ApiError(Exception):
    """An answer with a status and a one-line message (``{"error": message}``)."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.extra = extra


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path"))
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else err.get("msg", ""))
    return _one_line("; ".join(parts) or "invalid request")


class RestApi:
    """The API's routes around one service; :meth:`bind_gradio` lets it read browser sessions
    once the Gradio app exists (launch creates it)."""

    def __init__(
        self,
        service: PredictionService,
        settings: Settings,
        credentials: Credentials,
        throttle: LoginThrottle,
        lifecycle: Lifecycle,
    ) -> None:
        self.service = service
        self.settings = settings
        self.credentials = credentials
        self.throttle = throttle
        self.lifecycle = lifecycle
        self.gradio_app: Any = None
        self._waiting = 0
        self._slots: asyncio.Semaphore | None = None
        root = settings.root_path
        self.base = (urlparse(root).path if "://" in root else root).rstrip("/") + API_PREFIX
        self.app = self._build()
        #: What the server mounts: the API behind its upload limit.
        self.asgi = UploadLimit(self.app, settings.max_file_size)

    def bind_gradio(self, gradio_app: Any) -> None:
        self.gradio_app = gradio_app

    # --- plumbing ------------------------------------------------------------------------------

    async def user(self, request: Request) -> str | None:
        """The logged-in user (None when the app has no logins); 401 otherwise."""
        if not self.credentials:
            return None
        user = session_user(self.gradio_app, dict(request.cookies))
        if user is not None:
            return user
        pair = basic_credentials(request.headers.get("authorization"))
        if pair is not None:
            client = client_of(request.scope)
            await self.throttle.wait(client)
            if self.credentials(*pair):
                self.throttle.success(client)
                return pair[0]
            self.throttle.failure(client)
        raise HTTPException(
            status_code=401,
            detail="Log in: send HTTP Basic credentials (one of the app's --auth logins), or "
            "log in on the app's page and send its session cookie.",
            headers={"WWW-Authenticate": 'Basic realm="DermFusion"'},
        )

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """A prediction slot: ``concurrency`` at once, ``max_queue`` waiting, else busy."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.settings.concurrency)
        if self._slots.locked() and self._waiting >= self.settings.max_queue:
            raise ApiError(503, BUSY_MESSAGE)
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            yield
        finally:
            self._slots.release()

    def links(self, row_id: int | None) -> dict[str, str] | None:
        if row_id is None:
            return None
        item = f"{self.base}/predictions/{row_id}"
        return {"self": item, "heatmap": f"{item}/heatmap.png", "report": f"{item}/report.pdf"}

    def _record(self, row_id: int) -> Any:
        record = self.service.get(row_id)
        if record is None:
            raise ApiError(404, f"No stored prediction has id {row_id}.")
        return record

    # --- handlers (run in the thread pool: they decode images and touch the database) ----------

    def _predict(self, data: bytes, name: str, fields: dict[str, Any]) -> dict[str, Any]:
        request = PredictionRequest.build(data, **fields, name=name)
        try:
            stored = self.service.predict_and_store(request)
        except StorageError as exc:
            body = exc.prediction.to_dict() if exc.prediction is not None else None
            raise ApiError(503, str(exc), prediction=body) from None
        return {
            "id": stored.id,
            "stored": stored.stored,
            **stored.prediction.to_dict(),
            "links": self.links(stored.id),
        }

    def _list(self, f: HistoryFilter, limit: int, offset: int) -> dict[str, Any]:
        rows = self.service.history(f, limit=limit, offset=offset, images=False)
        return {
            "total": self.service.count(f),
            "limit": limit,
            "offset": offset,
            "items": [{**history.record_dict(r), "links": self.links(r.id)} for r in rows],
        }

    def _csv(self, f: HistoryFilter) -> str:
        buf = io.StringIO()
        records, offset = [], 0
        while True:
            page = self.service.history(f, limit=PAGE_LIMIT, offset=offset, images=False)
            records += page
            if len(page) < PAGE_LIMIT:
                break
            offset += PAGE_LIMIT
        codes = history.csv_codes(records)  # a p_ column per class of the rows' models
        rows = [history.csv_row(r, codes) for r in records]
        history.write_csv_rows(buf, history.csv_columns(codes), rows, lineterminator="\r\n")
        return buf.getvalue()

    def _delete(self, row_id: int) -> None:
        try:
            deleted = self.service.delete(row_id)
        finally:  # the files the web UI made for it (upload, panels, reports) go too
            record_files(self.service).remove(row_id)
        if not deleted:
            raise ApiError(404, f"No stored prediction has id {row_id}.")

    # --- the app -------------------------------------------------------------------------------

    def _build(self) -> FastAPI:
        api = FastAPI(
            title="DermFusion REST API",
            version=__version__,
            description="Research and education only — not a diagnosis. "
            "Same predictions, history and validation as the web app.",
            openapi_url="/openapi.json",
            docs_url="/docs",
            redoc_url=None,
        )
        User = Annotated[str | None, Depends(self.user)]

        @api.exception_handler(ApiError)
        async def api_error(_: Request, exc: ApiError) -> JSONResponse:
            return JSONResponse({"error": _one_line(str(exc)), **exc.extra}, exc.status)

        @api.exception_handler(DermError)
        async def derm_error(_: Request, exc: DermError) -> JSONResponse:
            status = 503 if isinstance(exc, DatabaseError) else 400
            return JSONResponse({"error": _one_line(str(exc))}, status)

        @api.exception_handler(HTTPException)
        async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
            return JSONResponse(
                {"error": _one_line(str(exc.detail))}, exc.status_code, headers=exc.headers
            )

        @api.exception_handler(RequestValidationError)
        async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
            return JSONResponse({"error": _validation_message(exc)}, 422)

        @api.middleware("http")
        async def in_flight(request: Request, call_next: Any) -> Any:
            if self.lifecycle.draining:
                return JSONResponse({"error": DRAINING_MESSAGE}, 503)
            with self.lifecycle.request():
                return await call_next(request)

        @api.post("/predict", summary="Predict, explain and store one image")
        async def predict(
            request: Request,
            user: User,
            image: Annotated[UploadFile, File(description="JPEG / PNG dermoscopy image")],
            age: Annotated[str | None, Form(description="years, blank: unknown")] = None,
            sex: Annotated[str | None, Form(description="male / female / unknown")] = None,
            site: Annotated[str | None, Form(description="body site, e.g. back")] = None,
            target: Annotated[str | None, Form(description="class to explain")] = None,
        ) -> dict[str, Any]:
            form = await request.form()
            unknown = sorted(set(form) - {"image", "age", "sex", "site", "target"})
            if unknown:
                raise ApiError(
                    422,
                    f"Unknown form field {unknown[0]!r}: expected image, age, sex, site, target.",
                )
            limit = self.settings.max_file_size  # (larger bodies: refused by UploadLimit)
            data = await image.read()
            if len(data) > limit:
                raise ApiError(413, f"The upload is larger than the limit of {limit} bytes.")
            fields = {"age": age, "sex": sex, "site": site, "target": target}
            async with self.slot():
                return await run_in_threadpool(
                    self._predict, data, image.filename or "image", fields
                )

        def history_filter(
            request: Request,
            since: Annotated[str | None, Query(description="YYYY-MM-DD (UTC)")] = None,
            until: Annotated[str | None, Query(description="YYYY-MM-DD, inclusive")] = None,
            classes: Annotated[list[str] | None, Query(description="top class codes")] = None,
            min_prob: Annotated[str | None, Query()] = None,
            max_prob: Annotated[str | None, Query()] = None,
            sex: Annotated[str | None, Query()] = None,
            site: Annotated[str | None, Query()] = None,
            age_min: Annotated[str | None, Query()] = None,
            age_max: Annotated[str | None, Query()] = None,
            model_version: Annotated[str | None, Query()] = None,
            confirmed: Annotated[bool | None, Query()] = None,
        ) -> HistoryFilter:
            # a misspelt filter (``?dx=mel``) must not silently list every row
            known = {*_FILTER_PARAMS, "limit", "offset"}
            unknown = sorted(set(request.query_params) - known)
            if unknown:
                raise ApiError(
                    422,
                    f"Unknown query parameter {unknown[0]!r}: expected one of "
                    f"{', '.join(sorted(known))}.",
                )
            # strings as typed: HistoryFilter parses and checks them (the UI's and CLI's rules)
            fields: dict[str, Any] = {
                "since": since,
                "until": until,
                "classes": classes or [],
                "min_prob": min_prob,
                "max_prob": max_prob,
                "sex": sex,
                "site": site,
                "age_min": age_min,
                "age_max": age_max,
                "model_version": model_version,
                "confirmed": confirmed,
            }
            return HistoryFilter(**fields)

        Filter = Annotated[HistoryFilter, Depends(history_filter)]
        Id = Annotated[int, Path(ge=1, le=MAX_ID, description="a stored prediction's id")]

        @api.get("/predictions", summary="Stored predictions, newest first")
        async def predictions(
            user: User,
            f: Filter,
            limit: Annotated[int, Query(ge=1, le=PAGE_LIMIT)] = 100,
            offset: Annotated[int, Query(ge=0)] = 0,
        ) -> dict[str, Any]:
            return await run_in_threadpool(self._list, f, limit, offset)

        @api.get("/predictions.csv", summary="The matching rows as the History tab's CSV")
        async def predictions_csv(user: User, f: Filter) -> Response:
            text = await run_in_threadpool(self._csv, f)
            return Response(
                text,
                media_type="text/csv; charset=utf-8",
                headers={"Content-Disposition": 'attachment; filename="dermfusion-history.csv"'},
            )

        @api.get("/predictions/{prediction_id}", summary="One stored prediction")
        async def prediction(user: User, prediction_id: Id) -> dict[str, Any]:
            record = await run_in_threadpool(self._record, prediction_id)
            return {**history.record_dict(record), "links": self.links(record.id)}

        @api.get("/predictions/{prediction_id}/heatmap.png", summary="The stored heatmap")
        async def heatmap(user: User, prediction_id: Id) -> Response:
            record = await run_in_threadpool(self._record, prediction_id)
            if record.heatmap_png is None:
                raise ApiError(404, f"Prediction {record.id} has no stored heatmap.")
            return Response(record.heatmap_png, media_type="image/png")

        @api.get("/predictions/{prediction_id}/report.pdf", summary="The case report")
        async def report(user: User, prediction_id: Id) -> Response:
            record = await run_in_threadpool(self._record, prediction_id)
            pdf = await run_in_threadpool(case_report_pdf, record)
            name = report_filename(record)
            return Response(
                pdf,
                media_type="application/pdf",
                headers={"Content-Disposition": f'attachment; filename="{name}"'},
            )

        @api.delete("/predictions/{prediction_id}", status_code=204, summary="Delete one")
        async def delete(user: User, prediction_id: Id) -> Response:
            await run_in_threadpool(self._delete, prediction_id)
            return Response(status_code=204)

        return api
