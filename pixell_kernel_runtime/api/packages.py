"""/runtime/packages: load by path, streamed upload, list, inspect, unload."""

from __future__ import annotations

import asyncio
import io
import os
from pathlib import Path
from typing import Any

import tornado.web
from python_multipart.multipart import MultipartParser, parse_options_header

from pixell_kernel_runtime.api.base import BaseHandler, Field
from pixell_kernel_runtime.errors import PackageError, RuntimeAPIError, ValidationFailed
from pixell_kernel_runtime.packages.archive import normalise_digest
from pixell_kernel_runtime.packages.store import InstallResult

# Uploaded bytes are handed to a worker thread in slices of this size, so that
# disk writes never run on the event loop and memory per upload stays bounded.
_FLUSH_BYTES = 1024 * 1024
_SMALL_FIELD_LIMIT = 1024


def _without_paths(doc: dict[str, Any], host: bool) -> dict[str, Any]:
    """A package's ``source`` names a host path (``path:/srv/...``): attach/admin only."""
    if not host and str(doc.get("source", "")).startswith(("path:", "packages_dir:", "examples:")):
        doc = {**doc, "source": doc["source"].split(":", 1)[0]}
    return doc


def load_answer(result: InstallResult) -> dict[str, Any]:
    pkg = result.package
    return {
        "status": "success",
        "package_id": pkg.id,
        "agents": [f"{pkg.id}/{e.name}" for e in pkg.manifest.exports],
        "sha256": pkg.sha256,
        "warnings": list(pkg.warnings),
        "result": result.status,
    }


class PackagesHandler(BaseHandler):
    route = "/runtime/packages"
    scopes = {"GET": "packages:read"}

    def get(self) -> None:
        packages = [self._shown(p.summary()) for p in self.runtime.store.list()]
        self.write_json({"packages": packages})

    def _shown(self, doc: dict[str, Any]) -> dict[str, Any]:
        return _without_paths(doc, self.can_see_host())


class PackageHandler(BaseHandler):
    route = "/runtime/packages/{id}"
    scopes = {"GET": "packages:read", "DELETE": "packages:write"}

    def get(self, package_id: str) -> None:
        detail = self.runtime.store.get(package_id).detail()
        self.write_json(_without_paths(detail, self.can_see_host()))

    async def delete(self, package_id: str) -> None:
        pkg = await self.runtime.agents.unload(package_id)
        self.write_json({"status": "success", "package_id": pkg.id, "unloaded": True})


class LoadHandler(BaseHandler):
    route = "/runtime/packages/load"
    scopes = {"POST": "packages:write"}

    async def post(self) -> None:
        body = self.json_body({"path": Field(str, required=True), "sha256": Field(str)})
        if not body["path"].strip():
            raise ValidationFailed(
                [{"loc": ["body", "path"], "msg": "must not be empty", "type": "value_error"}]
            )
        digest = normalise_digest(body["sha256"]) if body.get("sha256") else None
        try:
            path = Path(body["path"]).expanduser()
        except RuntimeError:  # `~name` of a user this host does not have
            raise PackageError(
                f"file not found: {body['path']} (no such user's home)", code="file_not_found"
            ) from None
        if self.runtime.auth.enabled:
            path = self._within_load_roots(path)
        result = await self.runtime.agents.load(
            path, sha256=digest, source=f"path:{path}", use_sidecar=True
        )
        self.write_json(load_answer(result))

    def _within_load_roots(self, path: Path) -> Path:
        """With authentication on, the server opens only what the operator put under
        LOAD_ROOTS (links resolved first). Outside them the answer is the same whether the
        file exists or not: it tells nothing about the host."""
        s = self.runtime.settings
        raw = s.load_roots if s.load_roots is not None else str(s.packages_dir or "")
        roots = [os.path.realpath(r) for r in raw.split(":") if r]
        real = os.path.realpath(path)
        if not any(real == r or real.startswith(r.rstrip("/") + "/") for r in roots):
            raise RuntimeAPIError(
                "load by path accepts only files under LOAD_ROOTS on this server; "
                "upload the package instead (POST /runtime/packages/upload)",
                status=403,
                kind="Forbidden",
                code="path_not_allowed",
            )
        return Path(real)


@tornado.web.stream_request_body
class UploadHandler(BaseHandler):
    """multipart/form-data with a ``file`` field and an optional ``sha256`` field.

    The body is parsed as it arrives and the file part streams to disk; the
    whole upload is never held in memory.
    """

    route = "/runtime/packages/upload"
    scopes = {"POST": "packages:write"}
    # Set before prepare() runs: a request refused earlier (401, 405) still ends in _cleanup.
    _out: io.BufferedWriter | None = None

    # Its own streaming parser and cap (MAX_UPLOAD_BYTES, 413 upload_too_large).
    buffers_body = False

    async def prepare(self) -> None:
        await super().prepare()  # authenticated before a byte of the body is accepted
        self._failure: RuntimeAPIError | None = None
        self._parser: MultipartParser | None = None
        self._out: io.BufferedWriter | None = None
        self._pending = bytearray()
        self._fields: dict[str, bytes] = {}
        self._file_seen = False
        self._filename = ""
        self._part_name: str | None = None
        self._part_headers: dict[bytes, bytes] = {}
        self._header_field = b""
        self._header_value = b""
        if self.request.method != "POST":
            return
        limit = self.runtime.settings.max_upload_bytes
        self.request.connection.set_max_body_size(limit)
        length = self.request.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise RuntimeAPIError(
                f"upload too large: {length} bytes (the limit is {limit})",
                status=413,
                kind="PayloadTooLarge",
                code="upload_too_large",
            )
        ctype, params = parse_options_header(self.request.headers.get("Content-Type", ""))
        boundary = params.get(b"boundary")
        if ctype != b"multipart/form-data" or not boundary:
            raise RuntimeAPIError(
                "upload must be multipart/form-data with a 'file' field",
                status=415,
                kind="UnsupportedMediaType",
                code="unsupported_media_type",
            )
        self._incoming = self.runtime.store.incoming_file()
        self._path = self._incoming.__enter__()
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
            },
        )

    # ---- multipart callbacks (run inside parser.write) ------------------

    def _on_part_begin(self) -> None:
        self._part_headers = {}
        self._part_name = None

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._part_headers[self._header_field.lower()] = self._header_value
        self._header_field = b""
        self._header_value = b""

    def _on_headers_finished(self) -> None:
        _, params = parse_options_header(self._part_headers.get(b"content-disposition", b""))
        self._part_name = params.get(b"name", b"").decode("utf-8", "replace")
        if self._part_name == "file":
            if self._file_seen:
                self._fail(
                    ValidationFailed(
                        [
                            {
                                "loc": ["body", "file"],
                                "msg": "only one file may be uploaded",
                                "type": "value_error",
                            }
                        ]
                    )
                )
                return
            self._file_seen = True
            self._filename = params.get(b"filename", b"").decode("utf-8", "replace")[:255]
            self._out = open(self._path, "xb")  # noqa: SIM115 - closed in on_part_end/finally

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part_name == "file":
            self._pending += data[start:end]
        elif self._part_name:
            value = self._fields.get(self._part_name, b"") + data[start:end]
            self._fields[self._part_name] = value[: _SMALL_FIELD_LIMIT + 1]

    def _on_part_end(self) -> None:
        self._part_name = None

    def _fail(self, exc: RuntimeAPIError) -> None:
        if self._failure is None:
            self._failure = exc

    async def _flush(self, final: bool = False) -> None:
        if self._out is None or (len(self._pending) < _FLUSH_BYTES and not final):
            return
        chunk, self._pending = bytes(self._pending), bytearray()
        if chunk:
            await asyncio.to_thread(self._out.write, chunk)

    async def data_received(self, chunk: bytes) -> None:
        if self._parser is None or self._failure is not None:
            return
        try:
            self._parser.write(chunk)
        except Exception as exc:  # the parser's own errors: a malformed body
            self._fail(RuntimeAPIError(f"malformed multipart body: {exc}", code="bad_multipart"))
            return
        await self._flush()

    async def post(self) -> None:
        try:
            if self._failure is not None:
                raise self._failure
            assert self._parser is not None
            self._parser.finalize()
            await self._flush(final=True)
            if self._out is not None:
                await asyncio.to_thread(self._out.close)
                self._out = None
            if not self._file_seen:
                raise ValidationFailed(
                    [
                        {
                            "loc": ["body", "file"],
                            "msg": "field required",
                            "type": "value_error.missing",
                        }
                    ]
                )
            raw_digest = self._fields.get("sha256", b"").decode("utf-8", "replace").strip()
            if len(raw_digest) > _SMALL_FIELD_LIMIT:
                raise PackageError("field sha256 is too long", code="invalid_digest")
            digest = normalise_digest(raw_digest) if raw_digest else None
            source = f"upload:{self._filename}" if self._filename else "upload"
            result = await self.runtime.agents.load(self._path, sha256=digest, source=source)
            self.write_json(load_answer(result))
        finally:
            self._cleanup()

    def _cleanup(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
        incoming = getattr(self, "_incoming", None)
        if incoming is not None:
            self._incoming = None
            incoming.__exit__(None, None, None)

    def on_connection_close(self) -> None:
        self._cleanup()
        super().on_connection_close()

    def on_finish(self) -> None:
        self._cleanup()
        super().on_finish()
