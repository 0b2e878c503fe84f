"""The offline default provider: a readable, deterministic answer about the question, no network, no key.

The answer quotes the prompt, then explains its topic in Markdown — a paragraph, a list, a code block, a closing
line — so a first look at streaming shows text worth reading and a client's Markdown rendering. It can think
first (streamed as `thinking`), and it streams at a set speed.

Options (pipeline `options`, see docs/providers.md):
  rate         words per second (0 = as fast as possible: words back to back, the loop given a turn at least
               every TURN seconds); the speed of the stream
  thinking     true: a short reasoning before the answer; N > 0: exactly N words of it; 0/false: none
  words        0: the whole answer; N > 0: exactly N words after the quote, the answer repeated as needed
               (long, predictable replies for tests and load)
  chunk_words  words per chunk
A continuation (another instance goes on with a reply whose instance was lost) streams exactly the rest of the
same answer, so a continued reply's text equals an uninterrupted one's.
Non-ASCII text (café, naïve, 🙂) is part of every answer: offsets count code points, and this shows it.
"""
import asyncio
import hashlib
import itertools
import re

from services.providers import Chunk

# At full speed (rate 0) the longest the demo keeps the loop before giving it a turn: a stop is heard, the
# sockets' writes complete and other connections run at least this often. One turn per word made the loop's
# own work (a task step, a write's callbacks) most of a fast reply's cost; words made within one turn reach a
# socket that is still busy with the turn's first write, so they merge there (services/wire/outbox.py).
TURN = 1e-4

STOPWORDS = set("""a an and are as at be but by can could did do does for from had has have how i if in into is it
its me my of on or please should so tell than that the their them then there these this to us was we what when
where which who why will with would you your about explain show give some more any just""".split())

OPENINGS = (
    "Here is a short overview of {topic}.",
    "Good question: {topic} is easier to see in pieces.",
    "Let's look at {topic} step by step.",
)

ANSWER = """{opening} In a few words: {topic} is best understood by what it does, why it matters, and how \
to try it yourself.

The main points:

- **What it is**: the idea behind {topic}, in plain terms, with the one detail that matters most.
- **Why it matters**: it saves work later, and mistakes show up early instead of in production.
- **How to try it**: start small, change one thing at a time, and measure before and after.

A small example:

```python
def explain(topic):
    steps = ["start small", "measure", "improve"]
    return f"{{topic}}: " + ", then ".join(steps)

print(explain("{short}"))  # works the same for café, naïve or 🙂
```

In short: {topic} rewards patience. (This answer comes from Parley's offline demo provider; point a pipeline \
at a real model to get real answers.)"""

THINKING = """The question is about {topic}. I should say what it is, why it matters and how to try it, \
then show a short code example and sum up in one line. A list will keep it easy to scan."""


def topic_of(prompt):
    """The prompt's content words, e.g. "What is a resumable stream?" -> "resumable stream"."""
    words = [w for w in re.findall(r"[\w'’-]+", prompt) if w.lower() not in STOPWORDS]
    return " ".join(words[:6]) or "this"


def tokens(text):
    """Words with the whitespace before them, so joining them gives the text back exactly."""
    return re.findall(r"\s*\S+", text)


def exactly(text, count):
    """`count` words of `text`, repeated as needed (separated by a blank line)."""
    if count <= 0:
        return []
    base = tokens(text)
    out = []
    while len(out) < count:
        block = base if not out else ["\n\n" + base[0].lstrip()] + base[1:]
        out.extend(block[:count - len(out)])
    return out


class DemoProvider:
    def __init__(self, pipeline):
        opts = pipeline.options
        self.words = int(opts.get("words", 0))
        self.rate = float(opts.get("rate", 20))
        thinking = opts.get("thinking", 0)
        self.thinking = -1 if thinking is True else int(thinking or 0)  # -1: the whole reasoning
        self.chunk_words = max(1, int(opts.get("chunk_words", 1)))
        self.model = pipeline.model or "demo"

    def answer(self, prompt):
        topic = topic_of(prompt)
        seed = int(hashlib.sha256(prompt.encode()).hexdigest(), 16)
        opening = OPENINGS[seed % len(OPENINGS)].format(topic=topic)
        body = ANSWER.format(opening=opening, topic=topic, short=topic.split()[0] if topic else "this")
        quoted = " ".join(prompt.split()[:12])
        head = [f'You said "{quoted}".'] if quoted else []
        parts = exactly(body, self.words) if self.words else tokens(body)
        if head and parts:
            parts[0] = "\n\n" + parts[0].lstrip()
        return head + parts

    def reasoning(self, prompt):
        text = THINKING.format(topic=topic_of(prompt))
        return tokens(text) if self.thinking < 0 else exactly(text, self.thinking)

    def whole(self, prompt):
        """(reasoning, answer): the whole text a reply to `prompt` streams, uninterrupted or continued."""
        thought = "".join(self._pieces(self.reasoning(prompt))) if self.thinking else ""
        return thought, "".join(self._pieces(self.answer(prompt)))

    async def stream(self, request):
        prompt = request.prompt.text if request.prompt else ""
        words = self.answer(prompt)
        thought = self._pieces(self.reasoning(prompt)) if self.thinking else ()
        if request.partial is not None:  # a continuation: exactly what the whole answer has after the partial
            thought = _after("".join(thought), len(request.partial_thinking))
            answer = _after("".join(self._pieces(words)), len(request.partial))
        else:
            answer = self._pieces(words)
        chunks = itertools.chain((Chunk(thinking=piece) for piece in thought), (Chunk(text=piece) for piece in answer))
        delay, loop, turn_ends = self.delay, asyncio.get_running_loop(), 0.0
        for chunk in chunks:
            # The loop gets a turn before the first chunk and between chunks (at full speed: whenever a TURN has
            # passed since the last), so a stop is heard mid-reply.
            if delay:
                await asyncio.sleep(delay)
            elif loop.time() >= turn_ends:
                await asyncio.sleep(0)
                turn_ends = loop.time() + TURN
            yield chunk
        yield Chunk(usage={"prompt_tokens": len(prompt.split()), "completion_tokens": len(words)}, model=self.model)

    def _pieces(self, words):
        for i in range(0, len(words), self.chunk_words):
            piece = "".join(words[i:i + self.chunk_words])
            yield piece.lstrip() if i == 0 else piece

    @property
    def delay(self):
        """Seconds between chunks: the stream's speed."""
        return self.chunk_words / self.rate if self.rate > 0 else 0


def _after(text, offset):
    """The rest of a deterministic text from `offset` on, word by word (whitespace kept: it joins back exactly)."""
    return tokens(text[offset:]) if offset < len(text) else []
