"""The offline default provider: deterministic text at a configurable rate, no network, no key.

Options (pipeline `options`): `words` (reply length), `rate` (words per second; 0 = as fast as possible),
`thinking` (words of reasoning streamed first; 0 = none), `chunk_words` (words per chunk).
The reply starts by quoting the prompt, so a person trying `make run` sees their message was understood.
"""
import asyncio
import hashlib

from services.providers import Chunk

VOCABULARY = (
    "parley streams every reply token by token while anyone in the conversation may stop it and a client "
    "that drops comes back to the exact character where it left café naïve résumé déjà vu über 🙂 so the "
    "text stays whole across reloads networks and restarts with nothing lost and nothing doubled"
).split()


def demo_words(seed_text, count):
    start = int(hashlib.sha256(seed_text.encode()).hexdigest(), 16) % len(VOCABULARY)
    return [VOCABULARY[(start + i) % len(VOCABULARY)] for i in range(count)]


class DemoProvider:
    def __init__(self, pipeline):
        opts = pipeline.options
        self.words = int(opts.get("words", 60))
        self.rate = float(opts.get("rate", 20))
        self.thinking = int(opts.get("thinking", 0))
        self.chunk_words = max(1, int(opts.get("chunk_words", 1)))
        self.model = pipeline.model or "demo"

    async def stream(self, request):
        prompt = request.prompt.text if request.prompt else ""
        if self.thinking:
            for piece in self._pieces(demo_words("think:" + prompt, self.thinking)):
                await self._pace()
                yield Chunk(thinking=piece)
        quoted = " ".join(prompt.split()[:12])
        head = [f'You said "{quoted}".'] if quoted else []
        for piece in self._pieces(head + demo_words(prompt, self.words)):
            await self._pace()
            yield Chunk(text=piece)
        n = self.words + len(head)
        yield Chunk(usage={"prompt_tokens": len(prompt.split()), "completion_tokens": n}, model=self.model)

    def _pieces(self, words):
        for i in range(0, len(words), self.chunk_words):
            yield ("" if i == 0 else " ") + " ".join(words[i:i + self.chunk_words])

    async def _pace(self):
        # Always yield to the loop, even at rate 0, so a stop is heard between chunks.
        await asyncio.sleep(self.chunk_words / self.rate if self.rate > 0 else 0)
