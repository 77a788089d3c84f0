"""The serving engine: images compressed once into their one-token caches, questions from concurrent
requests answered together in batches, whatever image each one is about.

Every model call runs on one worker thread, so requests never run the model side by side; the event
loop only queues. One scheduler owns that thread and picks the next call: a batch of waiting
questions first (their images are cached: answering them is what a client waits on), else a batch
of new images to compress (several uploads, one forward pass). A question batch stacks the caches
of its questions' images (:meth:`VisualCache.cat`), so each question attends to its own image's voco
entries and nothing else, prefix included.

Shape notation: B questions in a batch, L question length (left-padded), K cached positions.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..cache import VisualCache
from ..data.images import decode_image
from ..data.llava import PromptBuilder, get_template
from ..errors import HTCError
from ..inference import ImageEncoder, cache_maker
from ..layout import check_context, left_pad
from .store import CacheStore


class ServeError(HTCError):
    """A request the server refuses: ``status`` is its HTTP code, ``param`` the field at fault."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


@dataclass
class Answer:
    text: str
    finish_reason: str  # "stop" (end of answer or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class _Question:
    cache: VisualCache
    ids: list[int]
    max_tokens: int
    temperature: float
    stop: list[str]
    future: asyncio.Future = field(repr=False)
    pieces: asyncio.Queue | None = field(default=None, repr=False)  # streamed text, for stream=True


@dataclass
class _Image:
    data: bytes
    future: asyncio.Future = field(repr=False)  # its image-part cache, or the error that image alone met


def _visible(text: str, stop: list[str]) -> tuple[str, bool]:
    """The answer as it stands (leading space dropped, cut at the first stop string), and whether
    a stop string was met."""
    text = text.lstrip()
    cut = [text.index(s) for s in stop if s and s in text]
    return (text[: min(cut)], True) if cut else (text, False)


class _Streamer:
    """Receives each generation step's tokens (B,) inside ``generate`` and passes every streaming
    question its new text. Text that could still become part of a stop string, and trailing white
    space, is held back until the next token shows it is not, so that the pieces always add up to
    a prefix of the final answer."""

    def __init__(self, group: list[_Question], tok, loop):
        self.group, self.tok, self.loop = group, tok, loop
        self.ids: list[list[int]] = [[] for _ in group]
        self.sent = [""] * len(group)  # the text each question has been sent
        self.done = [False] * len(group)
        self.first = True

    def put(self, value) -> None:
        if self.first:  # generate passes the prompt first
            self.first = False
            return
        for i, (q, token) in enumerate(zip(self.group, value.reshape(-1).tolist())):
            if q.pieces is None or self.done[i]:
                continue
            if token == self.tok.eos_token_id or len(self.ids[i]) >= q.max_tokens:
                self.done[i] = True
                continue
            self.ids[i].append(token)
            text, stopped = _visible(self.tok.decode(self.ids[i], skip_special_tokens=True), q.stop)
            hold = 0 if stopped else max([len(s) - 1 for s in q.stop] + [0]) + len(text) - len(text.rstrip())
            self.done[i] = stopped
            self._send(i, text[: max(len(self.sent[i]), len(text) - hold)])

    def _send(self, i: int, text: str) -> None:
        if len(text) > len(self.sent[i]) and text.startswith(self.sent[i]):
            self.loop.call_soon_threadsafe(self.group[i].pieces.put_nowait, text[len(self.sent[i]):])
            self.sent[i] = text

    def finish(self, answers: list["Answer"]) -> None:
        """Send what was held back, so that the pieces add up to each final answer."""
        for i, (q, a) in enumerate(zip(self.group, answers)):
            if q.pieces is not None:
                self._send(i, a.text)

    def end(self) -> None:
        pass


@dataclass
class Limits:
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_tokens: int = 256  # the most a request may ask for
    max_batch: int = 32  # questions answered in one model call
    max_compress_batch: int = 8  # new images compressed in one model call
    batch_gap_s: float = 0.03  # a batch waits for more questions while the last one came less than this ago
    batch_wait_s: float = 0.25  # ... and at most this long after its first
    queue_size: int = 256  # questions (and, apart, images) waiting; beyond it a request gets 429


class Engine:
    def __init__(self, model, tokenizer, store: CacheStore, template: str = "plain", vq=None,
                 limits: Limits | None = None):
        if not model.reuses_image_cache:
            raise HTCError("this method chooses visual tokens per question and has no compress-once cache: "
                           "it cannot be served from caches (evaluate it with `htc-vlm eval --method ...`)")
        self.model, self.tok, self.store = model.eval(), tokenizer, store
        self.limits = limits or Limits()
        self.encoder = ImageEncoder(model, None, vq, resize=True)
        self.builder = PromptBuilder(tokenizer, get_template(template), model.config)
        self.prefix = self.builder.prefix_ids()
        fingerprint = model.fingerprint()
        # the stored caches hold the image part only (the prefix is shared): a layout of its own
        self.maker = cache_maker(fingerprint, self.prefix, "image-part")
        self.store.fingerprint = fingerprint
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="htc-model")
        self._compressing: dict[str, asyncio.Future] = {}
        self._queue: asyncio.Queue | None = None  # _Question
        self._images: asyncio.Queue | None = None  # _Image: new images to compress
        self._work: asyncio.Event | None = None  # set when either queue gets an item
        self._batcher: asyncio.Task | None = None
        self.batch_sizes: list[int] = []  # observed, for metrics (the app drains it)
        self.compress_batch_sizes: list[int] = []  # the same for compressions
        self._prefix_cache: VisualCache | None = None  # the template prefix's KV, the same for every image
        self.compressions = 0
        self.model_seconds = {"answer": 0.0, "compress": 0.0}  # time the worker spent in each kind of call

    # ------------------------------------------------------------------ images

    def key(self, image_id: str) -> str:
        return f"{image_id}-{self.maker}"

    @staticmethod
    def image_id(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()[:32]

    async def add_image(self, data: bytes) -> tuple[str, VisualCache, bool]:
        """``(id, cache, compressed now)``: the image's id (its content hash) and its cache, from the
        store or made now. Concurrent uploads of one new image compress it once. The cache is returned
        so that the request is answered even when the store keeps nothing (no memory budget)."""
        if len(data) > self.limits.max_image_bytes:
            raise ServeError(f"the image is {len(data)} bytes, over the limit of {self.limits.max_image_bytes}",
                             413, "image_url", "image_too_large")
        image_id = self.image_id(data)
        key = self.key(image_id)
        cache = self.store.get(key)
        if cache is not None:
            return image_id, cache, False
        if key in self._compressing:
            return image_id, await asyncio.shield(self._compressing[key]), False
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._compressing[key] = fut
        try:
            job = _Image(data, loop.create_future())
            self._start()
            self._enqueue(self._images, job, "images waiting to be compressed")
            cache = await job.future
            await loop.run_in_executor(None, self.store.put, key, cache)  # file or object-store I/O off the event loop
            fut.set_result(cache)
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: waiting uploads get it, nobody else needs to
            raise
        finally:
            del self._compressing[key]
        return image_id, cache, True

    def _compress(self, datas: list[bytes]) -> list[VisualCache | ServeError]:
        """The image-part caches of ``datas`` from one forward pass; an image that does not decode
        gets its own error in its place, and the others are compressed all the same."""
        images, out = [], []
        for data in datas:
            try:
                images.append(self.encoder.processing.check(
                    decode_image(data, "the image", max_pixels=self.limits.max_image_pixels), "the image"))
                out.append(None)
            except HTCError as e:
                out.append(ServeError(str(e), 400, "image_url", "invalid_image"))
        if images:
            pix, q = self.encoder.encode([None] * len(images), images)  # (n, 3, H, W), (n, ...) or None
            with torch.no_grad():
                cache = self.model.compress(pix, q, prefix_ids=self.prefix)  # (n, H, P + K, Dh)
            self.compressions += len(images)
            prefix, part = cache.split(len(self.prefix))  # store the image part; the prefix is kept once
            if self._prefix_cache is None:
                self._prefix_cache = prefix.select(0)
            made = (part.select(i) for i in range(len(images)))  # in the order of the good images
            out = [next(made) if o is None else o for o in out]
        return out

    def cache_for(self, image_id: str) -> VisualCache:
        cache = self.store.get(self.key(image_id))
        if cache is None:
            raise ServeError(f"unknown image id {image_id!r}: upload it to /v1/images or send it as a data: URL",
                             404, "image_url", "image_not_found")
        return cache

    # ------------------------------------------------------------------ questions

    async def ask(self, image_id: str, question: str, max_tokens: int, temperature: float = 0.0,
                  stop: list[str] | None = None, cache: VisualCache | None = None) -> Answer:
        return await self.submit(image_id, question, max_tokens, temperature, stop, cache)

    def submit(self, image_id: str, question: str, max_tokens: int, temperature: float = 0.0,
               stop: list[str] | None = None, cache: VisualCache | None = None,
               pieces: asyncio.Queue | None = None) -> asyncio.Future:
        """Queue a question now (a ServeError at once if it cannot be); the future is its Answer.
        With ``pieces``, the answer's text is also put there piece by piece as it is generated."""
        cache = cache if cache is not None else self.cache_for(image_id)
        ids = self.builder.question_ids(question)
        try:
            check_context(self.model.config, cache.next_position + len(ids) + max_tokens, "the question")
        except HTCError as e:
            raise ServeError(str(e), 400, "messages", "context_length_exceeded") from None
        self._start()
        fut = asyncio.get_running_loop().create_future()
        self._enqueue(self._queue, _Question(cache, ids, max_tokens, temperature, list(stop or []), fut, pieces),
                      "questions waiting")
        return fut

    def _enqueue(self, queue: asyncio.Queue, item, what: str) -> None:
        """Put ``item`` on one of the scheduler's queues and wake it; 429 when that queue is full."""
        try:
            queue.put_nowait(item)
        except asyncio.QueueFull:
            raise ServeError(f"the server is busy: too many {what}; retry shortly", 429,
                             code="rate_limit_exceeded") from None
        self._work.set()

    def _start(self) -> None:
        if self._batcher is None or self._batcher.done():
            self._queue = asyncio.Queue(self.limits.queue_size)
            self._images = asyncio.Queue(self.limits.queue_size)
            self._work = asyncio.Event()
            self._batcher = asyncio.get_running_loop().create_task(self._schedule())

    async def _take(self, queue: asyncio.Queue, limit: int) -> list:
        """What ``queue`` holds now (it holds something), up to ``limit``, and what arrives while
        questions keep coming: each arrival within ``batch_gap_s`` of the previous one joins, up to
        ``batch_wait_s`` after the first. Clients whose answers just came back ask again in a burst;
        the gap lets that burst join one batch instead of splitting the clients into two halves that
        take turns."""
        batch = [queue.get_nowait()]
        deadline = time.monotonic() + self.limits.batch_wait_s
        while len(batch) < limit:
            try:
                batch.append(queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = min(deadline - time.monotonic(), self.limits.batch_gap_s)
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), left))
            except asyncio.TimeoutError:
                break
        return batch

    async def _schedule(self) -> None:
        """The one loop that runs the model: questions before compressions, each batched."""
        while True:
            if self._queue.empty() and self._images.empty():
                self._work.clear()
                await self._work.wait()
            if not self._queue.empty():
                await self._answer_batch(await self._take(self._queue, self.limits.max_batch))
            elif not self._images.empty():
                await self._compress_batch(await self._take(self._images, self.limits.max_compress_batch))

    async def _compress_batch(self, jobs: list[_Image]) -> None:
        jobs = [j for j in jobs if not j.future.done()]
        if not jobs:
            return
        self.compress_batch_sizes.append(len(jobs))
        try:
            caches = await asyncio.get_running_loop().run_in_executor(
                self._worker, self._timed, "compress", self._compress, [j.data for j in jobs])
        except Exception as e:  # noqa: BLE001 -- every waiting upload gets the error, the loop goes on
            caches = [e] * len(jobs)
        for j, c in zip(jobs, caches):
            if not j.future.done():
                (j.future.set_exception if isinstance(c, BaseException) else j.future.set_result)(c)

    async def _answer_batch(self, batch: list[_Question]) -> None:
        loop = asyncio.get_running_loop()
        for temperature in sorted({q.temperature for q in batch}):  # one sampling setting per model call
            group = [q for q in batch if q.temperature == temperature and not q.future.cancelled()]
            if not group:
                continue
            self.batch_sizes.append(len(group))
            try:
                answers = await loop.run_in_executor(self._worker, self._timed, "answer", self._answer, group, loop)
            except Exception as e:  # noqa: BLE001 -- every waiting request gets the error, the loop goes on
                for q in group:
                    if not q.future.done():
                        q.future.set_exception(e)
                continue
            for q, a in zip(group, answers):
                if not q.future.done():
                    q.future.set_result(a)

    def _timed(self, kind: str, call, *args):
        """``call(*args)`` on the worker thread, its time added to ``model_seconds[kind]``."""
        t0 = time.perf_counter()
        try:
            return call(*args)
        finally:
            self.model_seconds[kind] += time.perf_counter() - t0

    @torch.no_grad()
    def _answer(self, group: list[_Question], loop=None) -> list[Answer]:
        caches = VisualCache.cat([q.cache for q in group]).after(self._prefix_of())  # (B, H, K, Dh)
        ids, mask = left_pad([q.ids for q in group], self.tok.pad_token_id)  # (B, L)
        new = max(q.max_tokens for q in group)
        sample = group[0].temperature > 0
        streamer = _Streamer(group, self.tok, loop) if loop is not None and any(q.pieces for q in group) else None
        out = self.model.generate(ids, visual_cache=caches, attention_mask=mask, max_new_tokens=new,
                                  do_sample=sample, temperature=group[0].temperature if sample else None,
                                  top_p=None, top_k=None, streamer=streamer,
                                  eos_token_id=self.tok.eos_token_id, pad_token_id=self.tok.pad_token_id)
        answers = []
        for q, row in zip(group, out[:, ids.shape[1]:].tolist()):
            row = row[: q.max_tokens]
            ended = self.tok.eos_token_id in row
            if ended:
                row = row[: row.index(self.tok.eos_token_id)]
            text = self.tok.decode(row, skip_special_tokens=True).strip()
            cut = [text.index(s) for s in q.stop if s and s in text]
            if cut:
                text, ended = text[: min(cut)], True
            prompt = len(self.prefix) + q.cache.length + len(q.ids)
            answers.append(Answer(text, "stop" if ended else "length", prompt, len(row)))
        if streamer is not None:
            streamer.finish(answers)
        return answers

    def _prefix_of(self) -> VisualCache:
        """The shared prefix cache; after a restart with caches on disk, made from the model once."""
        if self._prefix_cache is None:
            blank = torch.zeros(1, 3, self.model.config.vision_config.image_size, self.model.config.vision_config.image_size)
            q = None if self.encoder.tokenizer_vq is None else self.encoder.tokenizer_vq.q(
                torch.zeros(1, 3, self.encoder.tokenizer_vq.config.image_size, self.encoder.tokenizer_vq.config.image_size))
            with torch.no_grad():
                self._prefix_cache = self.model.compress(blank, q, prefix_ids=self.prefix).split(len(self.prefix))[0]
        return self._prefix_cache

    def close(self) -> None:
        if self._batcher is not None:
            self._batcher.cancel()
        self._worker.shutdown(wait=False, cancel_futures=True)
