"""The OpenAI Chat Completions streaming provider: OpenAI and every server that speaks its API
(vLLM, Ollama, llama.cpp server, LM Studio, DeepSeek, OpenRouter).

The official `openai` package configures the client (base URL, key, headers) and gives the exception classes;
the streaming request itself goes through aiohttp (its C parser and stream reader do far less work per network
read than httpx/httpcore/h11/anyio, which were a third of the loop with 1,000 paced replies; the package's
per-request layers — options models, body transform, retry and auth wrappers — were a fifth of it in a
100-stream burst), and its status errors become the package's own exception classes, as `create()` raises them.
The streamed body is read raw and its chunks decoded here with msgspec (the package's per-chunk pydantic models
cost most of the CPU of a fast stream). This module builds the messages (system prompt, windowed history, speaker labels), splits reasoning
from the answer, retries only before the first token, maps failures to stable codes (viewers get the code and a
generic message; the upstream's own words go to the log only), and closes the upstream response in its
`finally` so a stop is seen upstream as a disconnect at once.

Named openai_compat.py (not openai.py) so a traceback or a grep never confuses this module with the package.
Create one provider per pipeline and reuse it: it owns one AsyncOpenAI client (configuration only) and one aiohttp
session (its connection pool, one TLS context); `aclose()` it at shutdown.
"""
import asyncio
import logging
import random
import urllib.request

import aiohttp
import msgspec
import openai
import yarl

from services.operations.pipelines import api_key
from services.providers import Chunk, ProviderError
from services.wire.codes import ReplyCode

try:  # the HTTP library this openai release is built on (newer releases: httpx2)
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

log = logging.getLogger(__name__)

# The placeholder key sent to servers that need none. Passing it explicitly also stops the openai package
# from falling back to OPENAI_API_KEY, which would hand an OpenAI key to a third-party server.
NO_KEY = "EMPTY"
MAX_BACKOFF = 8.0
MAX_CONNECTIONS = 1024  # to the upstream at once (streams beyond it wait for one): the package's limit is 1,000
KEEPALIVE = 5.0         # seconds an idle connection stays open for the next request
GROUP_NOTE = ("This is a group conversation with several people. Each of their messages starts with the "
              "speaker's name in brackets, like \"[alice]: \". Do not start your reply with such a label.")

# One table from openai exception classes to our codes; the first matching row wins, so subclasses come first.
# (class, code, retryable before the first token)
ERRORS = (
    (openai.AuthenticationError, ReplyCode.UPSTREAM_UNAUTHORIZED, False),      # 401
    (openai.PermissionDeniedError, ReplyCode.UPSTREAM_UNAUTHORIZED, False),    # 403
    (openai.NotFoundError, ReplyCode.UPSTREAM_MODEL_NOT_FOUND, False),         # 404: unknown model (or wrong base_url)
    (openai.RateLimitError, ReplyCode.UPSTREAM_RATE_LIMITED, True),            # 429
    (openai.InternalServerError, ReplyCode.UPSTREAM_ERROR, True),              # >= 500
    (openai.APIStatusError, ReplyCode.UPSTREAM_BAD_REQUEST, False),            # other 4xx: e.g. context too long
    (openai.APIConnectionError, ReplyCode.UPSTREAM_UNREACHABLE, True),         # refused, DNS, connect timeout
    (openai.APIError, ReplyCode.UPSTREAM_ERROR, True),                         # an error event inside the stream
)


# What viewers are told for each code: the upstream's own text may hold its internals (it goes to the log).
MESSAGES = {
    ReplyCode.UPSTREAM_UNAUTHORIZED: "the model server refused our credentials",
    ReplyCode.UPSTREAM_MODEL_NOT_FOUND: "the model server does not know this model",
    ReplyCode.UPSTREAM_RATE_LIMITED: "the model server is rate limiting us; try again later",
    ReplyCode.UPSTREAM_BAD_REQUEST: "the model server rejected the request",
    ReplyCode.UPSTREAM_UNREACHABLE: "the model server could not be reached",
    ReplyCode.UPSTREAM_PROTOCOL_ERROR: "the model server sent a malformed or truncated stream",
    ReplyCode.UPSTREAM_ERROR: "the model server failed",
}


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None   # vLLM, DeepSeek
    reasoning: str | None = None           # OpenRouter, newer vLLM


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    finish_reason: str | None = None


class _Event(msgspec.Struct):
    """One streamed chunk; unknown fields are ignored, wrong shapes (`"choices": "oops"`) are an error."""
    choices: list[_Choice] | None = None
    model: object = None
    usage: object = None
    error: object = None                   # an error event inside the stream


_decode_event = msgspec.json.Decoder(_Event).decode


async def _sse_data(response):
    """The `data` of each server-sent event of a streamed body, as bytes; comments and other fields ignored."""
    async for events in _sse_reads(response.aiter_bytes()):
        for data in events:
            yield data


async def _sse_reads(blocks):
    """The events of a streamed body (`blocks`: its bytes as they arrive): one list per network read (possibly
    empty). An event is what lies between two blank lines; most are one `data: ` line, taken without looking at
    lines (a fast upstream sends hundreds per read)."""
    pending = b""  # the body after its last blank line: an event not yet complete
    async for block in blocks:
        body = pending + block if pending else block
        if b"\r" in body:
            body = body.replace(b"\r\n", b"\n")  # (a trailing \r meets its \n in the next read)
        texts = body.split(b"\n\n")
        pending = texts.pop()
        events = []
        for text in texts:
            if text[:6] == b"data: " and b"\n" not in text:
                events.append(text[6:])
            elif (data := _sse_event(text)) is not None:
                events.append(data)
        yield events
    if pending and (data := _sse_event(pending)) is not None:
        yield [data]


def _sse_event(text):
    """The data of one event, line by line: comments and other fields ignored, `data` lines joined."""
    data = [line[6:] if line[5:6] == b" " else line[5:] for line in text.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(data) if data else None


class _Pieces:
    """The text of one network read, as few chunks as keep its order: consecutive answer (or reasoning)
    deltas that arrived together become one chunk, so a fast upstream costs one frame per read, not per token."""
    __slots__ = ("runs", "kind", "texts")

    def __init__(self):
        self.runs = []      # [is_reasoning, [texts]]
        self.kind = None    # the last run's is_reasoning, and its texts
        self.texts = None

    def add(self, content, reasoning):
        if reasoning:
            self._put(True, reasoning)
        if content:
            if self.kind is False:  # (the usual case: answer text after answer text)
                self.texts.append(content)
            else:
                self._put(False, content)

    def _put(self, is_reasoning, text):
        if self.kind is is_reasoning:
            self.texts.append(text)
        else:
            self.kind, self.texts = is_reasoning, [text]
            self.runs.append([is_reasoning, self.texts])

    def take(self):
        runs, self.runs, self.kind, self.texts = self.runs, [], None, None
        for is_reasoning, texts in runs:
            text = "".join(texts)
            yield Chunk(thinking=text) if is_reasoning else Chunk(text=text)


def error_code(exc):
    for cls, code, retryable in ERRORS:
        if isinstance(exc, cls):
            return code, retryable
    return ReplyCode.UPSTREAM_ERROR, False


class OpenAIProvider:
    def __init__(self, pipeline):
        self.pipeline = pipeline
        opts = pipeline.options
        self.include_usage = opts.get("include_usage", True)
        self.think_tags = opts.get("think_tags", True)
        self.max_tokens_param = opts.get("max_tokens_param", "max_tokens")
        self.extra_body = opts.get("extra_body") or None
        self._client = self._http = None
        self._url = self._models_url = None

    def _get_client(self, key):
        if self._client is None:
            t = self.pipeline.timeouts
            # One TLS context, as the package's HTTP client would verify with (loading the CA certificates held
            # the loop 30-80 ms): the package's client never sends a request here, it only configures.
            tls = httpx.create_ssl_context()
            timeout = openai.Timeout(None, connect=t.connect, write=t.connect, pool=t.connect)
            self._client = openai.AsyncOpenAI(api_key=key or NO_KEY, base_url=self.pipeline.base_url,
                                              max_retries=0, timeout=timeout,
                                              http_client=openai.DefaultAsyncHttpxClient(timeout=timeout, verify=tls))
            # What the package would send with every request (auth, then its default headers; Omit()s dropped).
            headers = {**self._client.auth_headers, **self._client.default_headers}
            headers = {k: v for k, v in headers.items() if isinstance(v, str)}
            self._url = yarl.URL(str(self._client.base_url.join("chat/completions")), encoded=True)
            self._models_url = yarl.URL(str(self._client.base_url.join("models")), encoded=True)
            # Retries are ours (only before the first token); read timeouts are the stream manager's
            # first-token/stall/total watchdogs, so none here (a read timeout would also re-arm a timer per read).
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS, limit_per_host=0, keepalive_timeout=KEEPALIVE,
                                               ssl=tls),
                headers=headers, proxy=_env_proxy(self._url),
                timeout=aiohttp.ClientTimeout(total=None, connect=t.connect, sock_connect=t.connect, sock_read=None))
        return self._client

    async def _open(self, body):
        """POST the streaming request; -> the response, its body unread. Failures are the package's exceptions,
        as its `create()` raises them (status errors by status, anything before a response a connection error)."""
        try:
            response = await self._http.post(self._url, data=_encode(body))
        except asyncio.TimeoutError as exc:  # (aiohttp's connect timeouts are TimeoutErrors)
            raise openai.APITimeoutError(request=self._request()) from exc
        except (aiohttp.ClientError, OSError, ValueError) as exc:  # as the package does: failed before a response
            raise openai.APIConnectionError(request=self._request()) from exc
        if response.status >= 400:
            try:
                content = await response.read()
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
                content = b""
            finally:
                response.close()
            raise _status_error(httpx.Response(response.status, headers=list(response.headers.items()),
                                               content=content, request=self._request()))
        return response

    def _request(self):
        """The request as the package's exceptions name it (only for them: aiohttp sent it)."""
        return httpx.Request("POST", str(self._url))

    async def warm_up(self, timeout=2.0):
        """Before the first reply: build the client and its lazily imported parts, and open a pooled connection
        with one cheap request (GET /models), so the first reply costs what the tenth does. Whatever the
        upstream answers, or if it is down, the warm-up is over; the first reply reports real problems."""
        try:
            key = self._key()
        except ProviderError:
            return  # the first reply says the key is missing; the pipeline loader has warned already
        self._get_client(key)
        try:
            async with asyncio.timeout(timeout):
                async with self._http.get(self._models_url) as response:
                    await response.read()
        except (aiohttp.ClientError, OSError, ValueError, TimeoutError) as exc:
            log.debug("warm-up request to %s: %s", self.pipeline.base_url, type(exc).__name__)

    async def aclose(self):
        if self._client is not None:
            client, http, self._client, self._http = self._client, self._http, None, None
            await http.close()
            await client.close()

    def _key(self):
        name = self.pipeline.api_key_env
        if not name:
            return None
        key = api_key(self.pipeline)
        if not key:
            # viewers (a public widget's visitors among them) learn that, not the server's variable names: the
            # log says which
            raise ProviderError(ReplyCode.MISSING_API_KEY, "the model server's API key is not configured",
                                detail=f"environment variable {name} (or {name}_FILE) is not set")
        return key

    def request_body(self, request):
        p = self.pipeline
        body = {"model": p.model, "messages": build_messages(p, request), "stream": True}
        if self.include_usage:
            body["stream_options"] = {"include_usage": True}
        if p.temperature is not None:
            body["temperature"] = p.temperature
        if p.max_tokens is not None:
            body[self.max_tokens_param] = p.max_tokens
        if request.partial and p.continue_with == "continue_final_message":
            # vLLM and SGLang: the last (assistant) message is continued, not answered
            body.update(continue_final_message=True, add_generation_prompt=False)
        if self.extra_body:
            body.update(self.extra_body)  # as the package merges `extra_body`: its keys win
        return body

    async def stream(self, request):
        p = self.pipeline
        ids = (p.id, request.session_id, request.message_id)
        try:
            key = self._key()
        except ProviderError as err:
            log.debug("provider failed: pipeline=%s session=%s message=%s code=%s %s", *ids, err.code,
                      err.message)  # the stream manager logs the failed reply once, at WARNING
            raise
        self._get_client(key)
        body = self.request_body(request)
        sent = False        # text or thinking has gone out: from here on, never retry
        has_text = False    # some non-blank answer text
        usage = model = None
        attempt = 0
        while True:
            splitter = ThinkSplitter() if self.think_tags else None
            upstream = error = None
            finished = done = False
            try:
                try:
                    upstream = await self._open(body)
                except openai.APIError as exc:
                    raise self._error(exc, key, ids, attempt=attempt) from None
                pieces = _Pieces()
                try:
                    async for events in _sse_reads(_http_chunks(upstream)):
                        for data in events:
                            if done:
                                break  # read the body to its end, so the connection is reused
                            if data == b"[DONE]":
                                done = True
                                continue
                            try:
                                event = _decode_event(data)
                            except msgspec.DecodeError as exc:
                                error = exc  # after the text that came before it
                                break
                            if event.error:
                                error = openai.APIError(_error_text(event.error), self._request(),
                                                        body=event.error)
                                break
                            if isinstance(event.model, str):
                                model = model or event.model
                            if event.usage is not None:
                                usage = _usage(event.usage)
                            for choice in event.choices or ():
                                if choice.finish_reason:
                                    finished = True
                                delta = choice.delta
                                if delta is None:
                                    continue
                                reasoning = delta.reasoning_content or delta.reasoning or ""
                                content = delta.content or ""
                                if splitter and content and splitter.state != "answer":  # (then it passes all)
                                    content, more = splitter.feed(content)
                                    reasoning += more
                                if request.partial is not None:
                                    reasoning = ""  # a continuation goes on with the answer, not a new reasoning
                                pieces.add(content, reasoning)
                        for chunk in pieces.take():
                            sent = True
                            has_text = has_text or bool(chunk.text.strip())
                            yield chunk
                        if error is not None:
                            raise error
                    if splitter:
                        content, reasoning = splitter.flush()
                        for chunk in _chunks(content, reasoning):
                            sent = True
                            has_text = has_text or bool(chunk.text.strip())
                            yield chunk
                except openai.APIError as exc:  # an error event inside the stream
                    raise self._error(exc, key, ids, attempt=attempt) from None
                except (aiohttp.ClientError, OSError) as exc:
                    # Once the response has started, a cut connection is a protocol failure, not "unreachable".
                    raise self._error(exc, key, ids, attempt=attempt,
                                      code=ReplyCode.UPSTREAM_PROTOCOL_ERROR, retryable=True) from None
                except msgspec.DecodeError as exc:  # unparsable JSON or wrong shapes in a data line
                    raise self._error(exc, key, ids, attempt=attempt,
                                      code=ReplyCode.UPSTREAM_PROTOCOL_ERROR, retryable=True) from None
                if not (finished or done):
                    raise self._error(None, key, ids, attempt=attempt,
                                      code=ReplyCode.UPSTREAM_PROTOCOL_ERROR, retryable=True,
                                      message="stream ended without [DONE] or a finish_reason (connection cut?)")
                break
            except _Retry as retry:
                if sent or attempt >= p.retries:
                    self._log_failure(retry.error, ids, attempt)
                    raise retry.error from None
                delay = retry.delay if retry.delay is not None else p.retry_backoff * 2 ** attempt
                delay = min(MAX_BACKOFF, delay) * random.uniform(1.0, 1.1)
                log.info("provider retry: pipeline=%s session=%s message=%s code=%s attempt=%d delay=%.2fs",
                         *ids, retry.error.code, attempt + 1, delay)
            finally:
                if upstream is not None:
                    if upstream.content.at_eof():
                        upstream.release()  # read to its end: the connection serves the next request
                    else:
                        # Closes the connection at once: on a stop the upstream server sees the disconnect and
                        # stops generating; no further delta is read.
                        upstream.close()
            attempt += 1
            await asyncio.sleep(delay)
        if not has_text:
            err = ProviderError(ReplyCode.EMPTY_COMPLETION, "the model returned no answer text")
            self._log_failure(err, ids, attempt)
            raise err
        yield Chunk(usage=usage, model=model or p.model)

    def _error(self, exc, key, ids, *, attempt, code=None, retryable=None, message=None):
        """Turn an upstream failure into a ProviderError (wrapped in _Retry when a retry is allowed)."""
        mapped_code, mapped_retryable = error_code(exc) if exc is not None else (ReplyCode.UPSTREAM_ERROR, False)
        code = code or mapped_code
        retryable = mapped_retryable if retryable is None else retryable
        text = message or _describe(exc)
        if key:
            text = text.replace(key, "***")  # some servers echo the key they rejected
        err = ProviderError(code, MESSAGES.get(code, MESSAGES[ReplyCode.UPSTREAM_ERROR]), detail=text)
        if retryable:
            return _Retry(err, _retry_after(exc))
        self._log_failure(err, ids, attempt)
        return err

    def _log_failure(self, err, ids, attempt):
        # DEBUG: the stream manager logs the failed reply once, at WARNING; this adds the attempts
        log.debug("provider failed: pipeline=%s session=%s message=%s code=%s attempts=%d %s", *ids,
                  err.code, attempt + 1, err.detail or err.message)


_encode = msgspec.json.encode


def _env_proxy(url):
    """The proxy the environment names for `url` (HTTP(S)_PROXY, NO_PROXY), as the package's client would use:
    read once (aiohttp's trust_env reads the environment and ~/.netrc in a thread on every request)."""
    if url.host and urllib.request.proxy_bypass(url.host):
        return None
    return urllib.request.getproxies().get(url.scheme)


async def _http_chunks(response):
    """A streamed body's bytes as the upstream flushed them: each HTTP chunk as it arrives (a large one perhaps
    in parts), so what the upstream sent apart stays apart, as it reaches the socket."""
    async for data, _ in response.content.iter_chunks():
        yield data

# The package's exception class for each error status (as its client maps them); others are APIStatusError.
STATUS_ERRORS = {400: openai.BadRequestError, 401: openai.AuthenticationError, 403: openai.PermissionDeniedError,
                 404: openai.NotFoundError, 409: openai.ConflictError, 422: openai.UnprocessableEntityError,
                 429: openai.RateLimitError}


def _status_error(response):
    """An error status as the package reports it: "Error code: N - <the body's error message>"."""
    message, body = f"Error code: {response.status_code}", response.text.strip()
    try:
        body = msgspec.json.decode(body)
    except msgspec.DecodeError:
        pass
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict) and isinstance(error.get("message"), str) and error["message"]:
        message += f" - {error['message']}"
    cls = STATUS_ERRORS.get(response.status_code)
    if cls is None:
        cls = openai.InternalServerError if response.status_code >= 500 else openai.APIStatusError
    return cls(message, response=response, body=error)


class _Retry(Exception):
    def __init__(self, error, delay):
        super().__init__(error.message)
        self.error = error
        self.delay = delay


def _error_text(error):
    message = error.get("message") if isinstance(error, dict) else None
    return message if isinstance(message, str) and message else "an error event in the stream"


def _describe(exc):
    if isinstance(exc, (aiohttp.ClientError, OSError, httpx.HTTPError)):
        return f"the stream broke off ({type(exc).__name__}: {exc})"
    if isinstance(exc, openai.APIError):
        message = exc.message or type(exc).__name__      # "Error code: 429 - {...}" for a status error
        if isinstance(exc, openai.APIConnectionError) and exc.__cause__ is not None:
            message = f"{message} ({type(exc.__cause__).__name__}: {exc.__cause__})"
        return message
    return f"malformed stream data ({type(exc).__name__}: {exc})"


def _retry_after(exc):
    response = getattr(exc, "response", None)
    if response is None:
        return None
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return None


def _usage(u):
    def n(name):
        value = u.get(name) if isinstance(u, dict) else None
        return value if isinstance(value, int) and not isinstance(value, bool) else 0
    return {"prompt_tokens": n("prompt_tokens"), "completion_tokens": n("completion_tokens")}


def _chunks(content, reasoning):
    # Never both in one Chunk, so order stays unambiguous: reasoning precedes the answer it leads to.
    if reasoning:
        yield Chunk(thinking=reasoning)
    if content:
        yield Chunk(text=content)


# The fallback for servers that cannot continue an assistant message (pipeline continue_with = "instruction")
CONTINUE_INSTRUCTION = ("Your previous answer was cut off. Continue it exactly where it stopped: do not repeat any of "
                        "it, do not acknowledge this request, start with the very next characters.")


def build_messages(pipeline, request):
    """System prompt + the most recent history that fits the pipeline's window + the new prompt.

    The window keeps at most `history_messages` turns and `history_chars` characters of them, newest first,
    stopping at the first turn that does not fit (the context stays contiguous). A leading assistant turn is
    dropped: strict chat templates (Mistral, Gemma, Llama) require the first non-system message be the user's.
    """
    group = request.session_type == "group"
    system = pipeline.system_prompt
    if group:
        system = f"{system}\n\n{GROUP_NOTE}" if system else GROUP_NOTE
    messages = [{"role": "system", "content": system}] if system else []
    kept, chars = [], 0
    budget = pipeline.history_messages
    for turn in reversed(request.history[-budget:] if budget else []):
        chars += len(turn.text)
        if chars > pipeline.history_chars:
            break
        kept.append(turn)
    kept.reverse()
    while kept and kept[0].role != "user":
        kept.pop(0)
    for turn in kept + ([request.prompt] if request.prompt else []):
        messages.append(_message(turn, group))
    if request.partial:  # a continuation: the answer so far, then (unless the server continues it) the ask
        messages.append({"role": "assistant", "content": request.partial})
        if pipeline.continue_with == "instruction":
            messages.append({"role": "user", "content": CONTINUE_INSTRUCTION})
    return messages


def _message(turn, group):
    role = "assistant" if turn.role == "assistant" else "user"
    text = turn.text
    if group and role == "user":
        # A label inside the content works with every model and chat template; the `name` field is ignored by
        # most open-model templates (vLLM, Ollama, llama.cpp) and OpenAI rejects names outside [A-Za-z0-9_-].
        text = f"[{speaker(turn.sender)}]: {text}"
    if turn.images:  # OpenAI's content parts: the text, then each image
        return {"role": role, "content": [{"type": "text", "text": text}] +
                [{"type": "image_url", "image_url": {"url": url}} for url in turn.images]}
    return {"role": role, "content": text}


def speaker(sender):
    label = "".join(ch for ch in (sender or "") if ch.isprintable() and ch not in "[]")
    return label.strip()[:64] or "anonymous"


class ThinkSplitter:
    """Splits a leading `<think>...</think>` out of streamed content (DeepSeek-R1 style models served
    without a reasoning parser). Tags may be cut anywhere across chunks; text that might be the start of a
    tag is held back until the next chunk decides. Only a tag at the very start of the reply counts, so an
    answer that mentions "<think>" later is left alone."""

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self):
        self.state = "start"    # start -> thinking -> after -> answer, or start -> answer
        self.pending = ""
        self.thought = False    # some thinking text has been released

    def feed(self, text):
        """-> (answer text, thinking text) that can be released now."""
        self.pending += text
        thinking = ""
        if self.state == "start":
            head = self.pending.lstrip()
            if head.startswith(self.OPEN):
                self.state = "thinking"
                self.pending = head[len(self.OPEN):]
            elif self.OPEN.startswith(head):
                return "", ""  # still undecided ("", " ", "<th" ...)
            else:
                self.state = "answer"
        if self.state == "thinking":
            end = self.pending.find(self.CLOSE)
            if end >= 0:
                body, rest = self.pending[:end].rstrip(), self.pending[end + len(self.CLOSE):]
            else:
                # Hold back a possible start of </think> and trailing whitespace (dropped if the tag follows).
                cut = len(self.pending) - _partial_suffix(self.pending, self.CLOSE)
                body, rest = self.pending[:cut], self.pending[cut:]
                kept = body.rstrip()
                body, rest = kept, body[len(kept):] + rest
            if not self.thought:
                body = body.lstrip()
                self.thought = bool(body)
            thinking, self.pending = body, rest
            if end < 0:
                return "", thinking
            self.state = "after"
        if self.state == "after":
            # Whitespace between </think> and the answer is dropped, even when it spans chunks.
            self.pending = self.pending.lstrip()
            if not self.pending:
                return "", thinking
            self.state = "answer"
        answer, self.pending = self.pending, ""
        return answer, thinking

    def flush(self):
        """At the end of the stream: whatever is held back. An unclosed <think> is all thinking."""
        pending, self.pending = self.pending, ""
        if self.state == "thinking":
            return "", pending.strip() if not self.thought else pending.rstrip()
        if self.state == "after":
            return "", ""
        return pending, ""


def _partial_suffix(text, tag):
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
