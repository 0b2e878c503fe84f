"""A decoded message chain (services/wire/schema.py) -> what a send needs: the text the model reads, its images, the
chain to store, and the files the chain carries or names (services/conversations/files.py stores and checks those).

Plain is text, At/AtAll are `@name`/`@all`, Quote puts the quoted message first as context; Image goes to
pipelines whose `inputs` include "image", Voice and File to those declaring "voice"/"file"; any other is refused
with the reason. Inline bytes (`base64`) are checked here (size, magic bytes) and stored by the send; the stored
chain names them by `path`, never inline. Unknown fields are not stored.
"""
import base64
import binascii
import re
from dataclasses import dataclass

from services.conversations.files import IMAGE_TYPES, Attachment, image_type
from services.wire import schema
from services.wire.codes import Code
from services.wire.errors import BadRequest, PayloadTooLarge

MAX_IMAGE = 512 * 1024   # default of --max-image-size: bytes of one image, decoded
_DATA_URI = re.compile(r"^data:[a-z0-9.+/-]{1,64};base64$", re.IGNORECASE)


@dataclass
class Composed:
    text: str               # what the model reads
    images: list            # for the model, in order: a URL (str) or an image Attachment
    chain: list             # the chain to store (components are plain dicts)
    attachments: list       # every component naming a file, to store or check before the message is stored


def compose(chain, pipeline, *, max_image=MAX_IMAGE, max_document=None):
    stored = schema.to_builtins(chain)
    out = Composed("", [], stored, [])
    parts = []
    for component, data in zip(chain, stored):
        if isinstance(component, schema.Quote):
            quoted = _parts(component.origin, data.get("origin", []), pipeline, out, max_image, max_document)
            if quoted.strip():
                parts.append("\n".join("> " + line for line in quoted.splitlines()) + "\n")
        else:
            parts.append(_parts([component], [data], pipeline, out, max_image, max_document))
    out.text = "".join(parts)
    if not out.text.strip() and not out.images:
        raise BadRequest("message text is empty", code=Code.INVALID_MESSAGE)
    if len(out.text) > schema.MAX_TEXT:
        raise BadRequest(f"message text is longer than {schema.MAX_TEXT} characters", code=Code.MESSAGE_TOO_LONG)
    return out


def _parts(components, stored, pipeline, out, max_image, max_document):
    parts = []
    for c, d in zip(components, stored):
        if isinstance(c, schema.Plain):
            parts.append(c.text)
        elif isinstance(c, schema.At):
            parts.append(f"@{c.display or c.target}")
        elif isinstance(c, schema.AtAll):
            parts.append("@all")
        elif isinstance(c, schema.Image):
            _accepts(pipeline, "image", "images")
            out.images.append(_image(c, d, out, max_image))
        elif isinstance(c, schema.Voice):
            _accepts(pipeline, "voice", "voice messages")
            _document(c, d, out, max_document)
            parts.append("[voice message]")
        elif isinstance(c, schema.File):
            _accepts(pipeline, "file", "files")
            _document(c, d, out, max_document, name=c.name)
            parts.append(f"[file: {c.name or c.id or 'unnamed'}]")
    return "".join(parts)


def _accepts(pipeline, kind, what):
    if kind not in pipeline.inputs:  # the pipeline's id stays out: a widget visitor reads this reason too
        raise BadRequest(f"this chat does not accept {what} (it takes: {', '.join(pipeline.inputs)})",
                         code=Code.UNSUPPORTED_COMPONENT)


def _image(image, stored, out, max_image):
    if image.path:
        stored.pop("base64", None)
        stored.pop("url", None)  # a link a viewer was given: the file itself is what counts
        attachment = Attachment(stored, "image")
    elif image.base64:
        raw = inline_bytes(image.base64, max_image, "image")
        kind = image_type(raw)
        if kind is None:
            raise BadRequest("an image must be PNG, JPEG, GIF or WebP", code=Code.INVALID_IMAGE)
        attachment = Attachment(stored, "image", data=raw, mime=IMAGE_TYPES[kind])
    elif image.url:
        if not image.url.lower().startswith(("http://", "https://")):
            raise BadRequest("an Image's url must be http or https", code=Code.INVALID_IMAGE)
        return image.url
    else:
        raise BadRequest("an Image needs a `path` (an uploaded file's key), a `url` or `base64`",
                         code=Code.INVALID_MESSAGE)
    out.attachments.append(attachment)
    return attachment


def _document(component, stored, out, max_document, name=""):
    """A Voice or File with a stored file (`path`) or inline bytes; one with only a `url` stays a link."""
    if component.path:
        stored.pop("base64", None)
        out.attachments.append(Attachment(stored, "document"))
    elif component.base64:
        raw = inline_bytes(component.base64, max_document, "document")
        out.attachments.append(Attachment(stored, "document", data=raw, name=name))


def inline_bytes(value, max_bytes, kind):
    """A component's `base64` (raw, or a data: URI) -> its bytes, at most `max_bytes` once decoded. The label of
    a data: URI is not trusted: the stored file's type comes from the bytes."""
    label, sep, data = value.partition(",")
    if not sep:
        label, data = "", value
    elif not _DATA_URI.match(label) or (kind == "image" and not label.lower().startswith("data:image/")):
        raise BadRequest(f"a component's base64 must be raw base64 or a data:{'image/' if kind == 'image' else ''}"
                         "...;base64, URI", code=Code.INVALID_IMAGE if kind == "image" else Code.INVALID_FILE)
    code, option = ("image_too_large", "--max-image-size") if kind == "image" else ("file_too_large",
                                                                                     "--max-document-size")
    article = "an" if kind == "image" else "a"
    if max_bytes is not None and len(data) > (max_bytes + 2) // 3 * 4 + 4:
        raise PayloadTooLarge(f"{article} {kind} is larger than {max_bytes} bytes ({option})", code=code,
                              max_bytes=max_bytes)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{article} {kind}'s base64 is not valid base64",
                         code=Code.INVALID_IMAGE if kind == "image" else Code.INVALID_FILE) from None
    if max_bytes is not None and len(raw) > max_bytes:
        raise PayloadTooLarge(f"{article} {kind} is larger than {max_bytes} bytes ({option})", code=code,
                              max_bytes=max_bytes)
    return raw
