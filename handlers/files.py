"""Files: LangBot's dashboard uploads (multipart -> a key for an `Image`/`File`/`Voice` component's `path`), and
the download of a stored file by whoever may read it (services/conversations/files.py)."""
import time
from urllib.parse import quote

from tornado import httputil

from handlers.base import BaseHandler, api
from services.wire.codes import Code
from services.wire.errors import BadRequest, NotFound

UPLOAD_MARGIN = 64 * 1024  # of a multipart body, beyond the file: boundaries, headers, the file name


class UploadHandler(BaseHandler):
    """POST /api/v1/files/images|documents, multipart/form-data with the file in the field `file` (LangBot's
    dashboard shape): `{"file_key": …}` for an image, `{"file_id": …}` for a document (its shapes), plus
    Parley's `key`, `type` and `size`."""
    body_types = ("multipart/form-data",)
    kind = None

    def body_limit(self):
        return self.services.files.max_size(self.kind) + UPLOAD_MARGIN

    async def upload(self):
        kind = self.kind
        fields, uploads = {}, {}
        httputil.parse_body_arguments(self.request.headers.get("Content-Type", ""), bytes(self.raw_body), fields,
                                      uploads, self.request.headers)
        parts = uploads.get("file")
        if not parts:
            raise BadRequest("send the file as multipart/form-data in the field `file`", code=Code.INVALID_PARAM)
        part = parts[0]
        doc = await self.services.files.save(self.identity, kind, part.body, name=part.filename or "")
        self.ok({"file_key" if kind == "image" else "file_id": doc["_id"], "key": doc["_id"], "type": doc["type"],
                 "size": doc["size"], "name": doc["name"]})


class ImageUploadHandler(UploadHandler):
    kind = "image"

    @api("upload an image (multipart/form-data, field `file`): its key, for an Image's `path`")
    async def post(self):
        await self.upload()


class DocumentUploadHandler(UploadHandler):
    kind = "document"

    @api("upload a document or voice file (multipart/form-data, field `file`): its key, for a File's `path`")
    async def post(self):
        await self.upload()


class FileHandler(BaseHandler):
    """GET /api/v1/files/image|document/<key>: the bytes, to its owner, an admin, a member of a session whose
    messages show it (credentials as for the API), or anyone with a signed link (`?exp=…&sig=…`) until it
    expires. A file never changes: it is cached privately for as long as the access lasts."""
    public = True  # checked in download(): a signed link needs no credentials
    kind = None

    async def download(self, key):
        kind = self.kind
        files = self.services.files
        exp, sig = self.get_query_argument("exp", None), self.get_query_argument("sig", None)
        if sig is not None:
            doc = await files.by_link(key, exp, sig)
            if doc is None or doc["kind"] != kind:
                raise NotFound("this link is not valid (or has expired)", code=Code.FILE_NOT_FOUND)
            access, max_age = "link", max(0, int(exp) - int(time.time()))
        else:
            identity = self.services.auth.identify(self.request)
            doc = await files.readable(identity, key, kind=kind)
            access, max_age = "member", 86400
        etag = f'"{doc["sha256"]}"'
        self.set_header("ETag", etag)
        self.set_header("Cache-Control", f"private, max-age={max_age}, immutable")
        self.set_header("Content-Security-Policy", "default-src 'none'; sandbox")
        self.set_header("Cross-Origin-Resource-Policy", "cross-origin" if access == "link" else "same-origin")
        if kind == "document":  # never rendered in Parley's origin
            self.set_header("Content-Disposition", "attachment; filename*=UTF-8''" +
                            quote(doc["name"] or doc["_id"], safe=""))
        self.services.metrics.file_served(kind, access)
        if self.request.headers.get("If-None-Match") == etag:
            self.set_status(304)
            self.clear_header("Content-Type")
            return self.finish()
        data = await self.services.store.read_file(doc)
        self.set_header("Content-Type", doc["type"])
        self.finish(data)


class ImageHandler(FileHandler):
    kind = "image"

    @api("a stored image's bytes (credentials, or a signed link's exp and sig)")
    async def get(self, key):
        await self.download(key)


class DocumentHandler(FileHandler):
    kind = "document"

    @api("a stored document's bytes, as an attachment (credentials, or a signed link's exp and sig)")
    async def get(self, key):
        await self.download(key)


KEY = r"(?P<key>[A-Za-z0-9_-]{1,64})"
default_handlers = [
    (r"/api/v1/files/images", ImageUploadHandler),
    (r"/api/v1/files/documents", DocumentUploadHandler),
    (r"/api/v1/files/image/" + KEY, ImageHandler),
    (r"/api/v1/files/document/" + KEY, DocumentHandler),
]
