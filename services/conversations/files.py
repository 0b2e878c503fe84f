"""Files: images and documents stored once, outside messages, referenced from a chain by key (`path`).

An upload (`POST /api/v1/files/images|documents`) or an inline `base64` component becomes a stored file; the
stored chain keeps `{"type": "Image", "path": key}`, so a history page and a fanned-out message stay small
whatever the image weighs. The bytes decide a file's type (magic bytes), never its name or label. Who may read
a file: its owner, an admin, and the members of any session whose messages reference it (the reference is
recorded before the message is stored, so no member ever sees a message whose file they may not read), or
anyone holding a signed link (`link()`: what an upstream model or an <img> outside Parley gets).
"""
import base64
import hashlib
import logging
import secrets
import time
from dataclasses import dataclass, field

from services.access.signing import expiry
from services.storage.store import utcnow
from services.wire.codes import Code
from services.wire.errors import BadRequest, NotFound, PayloadTooLarge

log = logging.getLogger(__name__)

KINDS = ("image", "document")
IMAGE_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "gif": "image/gif", "webp": "image/webp"}
# Documents: extension -> (content type, check of the bytes). Text types must be UTF-8 without NUL bytes; they
# are served as text/plain or their own text type, never as anything a browser would run.
_ZIP = b"PK\x03\x04"
DOCUMENT_TYPES = {
    "pdf": ("application/pdf", lambda b: b.startswith(b"%PDF-")),
    "docx": ("application/vnd.openxmlformats-officedocument.wordprocessingml.document", lambda b: b.startswith(_ZIP)),
    "xlsx": ("application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", lambda b: b.startswith(_ZIP)),
    "pptx": ("application/vnd.openxmlformats-officedocument.presentationml.presentation",
             lambda b: b.startswith(_ZIP)),
    "txt": ("text/plain; charset=utf-8", None),
    "md": ("text/markdown; charset=utf-8", None),
    "csv": ("text/csv; charset=utf-8", None),
    "json": ("application/json", None),
    "mp3": ("audio/mpeg", lambda b: b.startswith(b"ID3") or b[:2] in (b"\xff\xfb", b"\xff\xf3", b"\xff\xf2")),
    "ogg": ("audio/ogg", lambda b: b.startswith(b"OggS")),
    "wav": ("audio/wav", lambda b: b[:4] == b"RIFF" and b[8:12] == b"WAVE"),
    "m4a": ("audio/mp4", lambda b: b[4:8] == b"ftyp"),
}
LINK_PURPOSE = "file"


def image_type(raw):
    """png, jpeg, gif or webp by the magic bytes; None for anything else."""
    if raw.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if raw.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if raw[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "webp"
    return None


def document_type(name, raw):
    """The content type of an allowed document, from its extension checked against its bytes (a binary type's
    bytes alone when there is no extension: a voice message has no name); else BadRequest."""
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if not ext:
        ext = next((e for e, (_, check) in DOCUMENT_TYPES.items() if check and check(raw)), "")
    if ext not in DOCUMENT_TYPES:
        raise BadRequest(f"documents must be one of: {', '.join(sorted(DOCUMENT_TYPES))} (by file extension)",
                         code=Code.UNSUPPORTED_FILE_TYPE)
    mime, check = DOCUMENT_TYPES[ext]
    if check is None:
        ok = b"\0" not in raw and _utf8(raw)
    else:
        ok = check(raw)
    if not ok:
        raise BadRequest(f"the file's contents are not a .{ext} file", code=Code.UNSUPPORTED_FILE_TYPE)
    return mime


def _utf8(raw):
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@dataclass
class Attachment:
    """A component of a message being sent that names a file: stored bytes to be (`data`) or a key (`path`)."""
    component: dict            # the component as it will be stored: `path` is set, `base64` dropped, by ingest
    kind: str                  # "image" | "document"
    data: bytes | None = None  # inline bytes, checked
    mime: str = ""
    key: str = ""              # set once stored or checked
    name: str = ""
    extra: dict = field(default_factory=dict)


class Files:
    def __init__(self, store, signer, *, max_image, max_document, quota, link_ttl, metrics=None):
        self.store = store
        self.signer = signer
        self.max_image = max_image
        self.max_document = max_document
        self.quota = quota
        self.link_ttl = link_ttl
        self.metrics = metrics

    def max_size(self, kind):
        return self.max_image if kind == "image" else self.max_document

    def check(self, kind, data, name=""):
        """The content type of an upload of `kind`, or the refusal (size first, then type)."""
        limit = self.max_size(kind)
        if len(data) > limit:
            option = "--max-image-size" if kind == "image" else "--max-document-size"
            raise PayloadTooLarge(f"the {kind} is larger than {limit} bytes ({option})", max_bytes=limit,
                                  code=Code.IMAGE_TOO_LARGE if kind == "image" else Code.FILE_TOO_LARGE)
        if not data:
            raise BadRequest(f"the {kind} is empty", code=Code.INVALID_IMAGE if kind == "image" else Code.INVALID_FILE)
        if kind == "image":
            found = image_type(data)
            if found is None:
                raise BadRequest("an image must be PNG, JPEG, GIF or WebP", code=Code.INVALID_IMAGE)
            return IMAGE_TYPES[found]
        return document_type(name, data)

    async def save(self, identity, kind, data, *, name="", how="upload"):
        """Store checked bytes for their sender: the key (the same key again for the same bytes of one owner)."""
        mime = self.check(kind, data, name)
        digest = hashlib.sha256(data).hexdigest()
        owner = identity.user_id
        existing = await self.store.find_file_by_hash(owner, kind, digest)
        if existing is not None:
            return existing
        used = await self.store.file_usage(owner)
        if used + len(data) > self.quota:  # concurrent uploads may pass together: at most one file each over
            raise PayloadTooLarge(f"your stored files would exceed {self.quota} bytes (--file-quota)",
                                  code=Code.QUOTA_EXCEEDED, max_bytes=self.quota)
        doc = {"_id": "f" + secrets.token_urlsafe(18), "owner": owner, "kind": kind, "type": mime,
               "name": name[:256], "size": len(data), "sha256": digest, "sessions": [], "created_at": utcnow()}
        await self.store.insert_file(doc, data)
        await self.store.add_file_usage(owner, len(data))
        if self.metrics is not None:
            self.metrics.file_stored(kind, how, len(data))
        return doc

    async def ingest(self, identity, attachments):
        """Store a send's inline files and check the ones it names; every component then carries `path`."""
        for a in attachments:
            if a.data is not None:
                doc = await self.save(identity, a.kind, a.data, name=a.name, how="inline")
                a.component.pop("base64", None)
            else:
                doc = await self.readable(identity, a.component["path"], kind=a.kind)
            a.key, a.mime = doc["_id"], doc["type"]
            a.component["path"] = doc["_id"]
            if a.kind == "document" and not a.component.get("size"):
                a.component["size"] = doc["size"]

    async def reference(self, attachments, session_id):
        keys = {a.key for a in attachments if a.key}
        if keys:
            await self.store.add_file_refs(keys, session_id)

    async def readable(self, identity, key, *, kind=None):
        """The file, if `identity` may read it; one answer (file_not_found) for missing and not allowed."""
        doc = await self.store.find_file(key) if isinstance(key, str) and 0 < len(key) <= 64 else None
        if doc is not None and (kind is None or doc["kind"] == kind) and await self.may_read(identity, doc):
            return doc
        raise NotFound(f"no {kind or 'file'} {key!r}" if isinstance(key, str) else "no such file",
                       code=Code.FILE_NOT_FOUND)

    async def may_read(self, identity, doc):
        if identity.is_admin or identity.user_id == doc["owner"]:
            return True
        sessions = doc.get("sessions") or ()
        return bool(sessions) and await self.store.is_member_of_any(sessions, identity.user_id)

    async def by_link(self, key, exp, sig):
        """The file a signed link names, if the link is this server's and has not expired; else None."""
        try:
            exp = int(exp)
        except (TypeError, ValueError):
            return None
        if exp < time.time() or not self.signer.check(sig, LINK_PURPOSE, key, exp):
            return None
        return await self.store.find_file(key)

    def link(self, doc, base=""):
        """A URL that reads the file without credentials for at least --file-link-ttl seconds."""
        exp = expiry(self.link_ttl)
        sig = self.signer.sign(LINK_PURPOSE, doc["_id"], exp)
        return f"{base}/api/v1/files/{doc['kind']}/{doc['_id']}?exp={exp}&sig={sig}"

    async def for_model(self, images, pipeline):
        """What the provider gets for each image: a URL as sent, or a stored image as a data: URL (its bytes
        inline) or, for a pipeline with `files_url`, a signed link under that base the upstream can reach."""
        out = []
        for image in images:
            if isinstance(image, str):
                out.append(image)
            elif pipeline.files_url:
                out.append(self.link({"_id": image.key, "kind": "image"}, pipeline.files_url.rstrip("/")))
            else:
                data = image.data
                if data is None:
                    data = await self.store.read_file(await self.store.find_file(image.key))
                out.append(f"data:{image.mime};base64,{base64.b64encode(data).decode()}")
        return out
