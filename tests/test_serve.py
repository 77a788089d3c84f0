"""`htc-vlm serve`: a real server on 127.0.0.1 with a tiny random-weight model, driven by httpx and by
the official `openai` client."""

import asyncio
import base64
import json
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from transformers import AutoTokenizer  # noqa: E402

from htc_vlm import HTCForConditionalGeneration  # noqa: E402
from htc_vlm.serving.app import create_app  # noqa: E402
from htc_vlm.serving.engine import Engine, Limits, ServeError  # noqa: E402
from htc_vlm.serving.store import CacheStore, parse_bytes  # noqa: E402


def _url(path):
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def served(make_model_dir, tmp_path_factory):
    import uvicorn

    model_dir = make_model_dir("voco")
    model = HTCForConditionalGeneration.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    store = CacheStore(parse_bytes("1MB"), tmp_path_factory.mktemp("caches"))
    engine = Engine(model, tok, store, limits=Limits(max_image_bytes=200_000, batch_wait_s=0.05, max_tokens=16))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "tiny-voco"), host="127.0.0.1", port=0,
                                           log_level="error", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield {"base": f"http://127.0.0.1:{port}", "engine": engine, "model": model, "tok": tok, "dir": model_dir}
    server.should_exit = True
    thread.join(timeout=10)


def _chat(image_url, question="What color is the circle?", **extra):
    return {"model": "tiny-voco", "max_tokens": 8,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                      {"type": "text", "text": question}]}], **extra}


def test_answers_equal_ask_on_the_same_image(served, scenes_dir):
    from htc_vlm.data.images import load_rgb
    from htc_vlm.data.llava import PromptBuilder, get_template
    from htc_vlm.inference import ImageEncoder, ask

    image = sorted((scenes_dir / "images").glob("test_*.png"))[0]
    r = httpx.post(served["base"] + "/v1/chat/completions", json=_chat(_url(image)), timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["finish_reason"] in ("stop", "length")
    model, tok = served["model"], served["tok"]
    pix, q = ImageEncoder(model).encode([image], [load_rgb(image, 48)])
    cache = model.compress(pix, q, prefix_ids=PromptBuilder(tok, get_template("plain"), model.config).prefix_ids())
    assert body["choices"][0]["message"]["content"] == ask(model, tok, cache, ["What color is the circle?"],
                                                           max_new_tokens=8)[0]
    assert body["usage"]["completion_tokens"] <= 8


def test_upload_once_then_ask_by_id_and_concurrent_uploads_compress_once(served, scenes_dir):
    image = sorted((scenes_dir / "images").glob("test_*.png"))[1]
    data = image.read_bytes()
    before = served["engine"].compressions

    async def upload_many():
        async with httpx.AsyncClient(base_url=served["base"], timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/images", content=data,
                                                      headers={"content-type": "image/png"}) for _ in range(8)))

    replies = asyncio.run(upload_many())
    assert {r.status_code for r in replies} == {200}
    ids = {r.json()["id"] for r in replies}
    assert len(ids) == 1 and served["engine"].compressions == before + 1
    url = replies[0].json()["url"]
    r = httpx.post(served["base"] + "/v1/chat/completions", json=_chat(url), timeout=60)
    by_data = httpx.post(served["base"] + "/v1/chat/completions", json=_chat(_url(image)), timeout=60)
    assert r.status_code == by_data.status_code == 200
    assert r.json()["choices"][0]["message"] == by_data.json()["choices"][0]["message"]
    assert served["engine"].compressions == before + 1  # the data URL found the same cache


def test_questions_about_different_images_are_answered_in_one_batch(served, scenes_dir):
    images = sorted((scenes_dir / "images").glob("test_*.png"))[2:4]
    questions = ["What color is the circle?", "How many objects are there?", "Is there a square?", "Where is it?"]
    requests = [_chat(_url(i), q) for i in images for q in questions]

    async def ask_all():
        async with httpx.AsyncClient(base_url=served["base"], timeout=60) as client:
            for i in images:  # compress first, so that the questions meet in the queue
                await client.post("/v1/chat/completions", json=_chat(_url(i)))
            return await asyncio.gather(*(client.post("/v1/chat/completions", json=r) for r in requests))

    served["engine"].batch_sizes.clear()
    replies = asyncio.run(ask_all())
    assert all(r.status_code == 200 for r in replies)
    alone = [httpx.post(served["base"] + "/v1/chat/completions", json=r, timeout=60).json() for r in requests]
    assert [r.json()["choices"][0]["message"]["content"] for r in replies] == \
           [a["choices"][0]["message"]["content"] for a in alone]  # batched answers equal the ones asked alone
    from prometheus_client.parser import text_string_to_metric_families

    samples = [s for f in text_string_to_metric_families(httpx.get(served["base"] + "/metrics").text)
               for s in f.samples]
    value = {s.name: s.value for s in samples if not s.labels}
    assert value["htc_batch_size_sum"] > value["htc_batch_size_count"]  # some model call answered several questions
    seconds = {s.labels["call"]: s.value for s in samples if s.name == "htc_model_seconds"}
    assert seconds.keys() == {"answer", "compress"} and all(v > 0 for v in seconds.values())


def test_the_openai_client_works_unchanged_with_and_without_streaming(served, scenes_dir):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=served["base"] + "/v1", api_key="none")
    image = sorted((scenes_dir / "images").glob("test_*.png"))[4]
    messages = _chat(_url(image))["messages"]
    done = client.chat.completions.create(model="tiny-voco", messages=messages, max_tokens=8, temperature=0)
    text = done.choices[0].message.content
    stream = client.chat.completions.create(model="tiny-voco", messages=messages, max_tokens=8, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
    assert [m.id for m in client.models.list()] == ["tiny-voco"]
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.chat.completions.create(model="tiny-voco", messages=messages, n=2)


def _png_bytes(scenes_dir):
    return sorted((scenes_dir / "images").glob("test_*.png"))[0].read_bytes()


@pytest.mark.parametrize("case, status, message", [
    ("invalid json", 400, "not valid JSON"),
    ("a list", 400, "must be a JSON object"),
    ("unknown parameter", 400, "unknown parameter(s): top_logprobs"),
    ("n = 2", 400, "n must be 1"),
    ("no image", 400, "exactly one image, got 0"),
    ("two images", 400, "exactly one image, got 2"),
    ("bad base64", 400, "base64 data is malformed"),
    ("an http URL", 400, "the server fetches nothing"),
    ("a file path", 400, "the server fetches nothing"),
    ("not an image", 400, "cannot decode image"),
    ("truncated image", 400, "cannot decode image"),
    ("too many bytes", 413, "over the limit of 200000"),
    ("unknown id", 404, "unknown image id"),
    ("too long a question", 400, "context is 1024"),
    ("two turns", 400, "multi-turn"),
    ("temperature 5", 400, "temperature must be"),
    ("max_tokens 0", 400, "max_tokens must be an integer"),
    ("no question", 400, "no text question"),
])
def test_bad_requests_get_a_4xx_with_an_openai_error_and_the_server_keeps_serving(served, scenes_dir, case, status,
                                                                                  message):
    png = _png_bytes(scenes_dir)
    good = "data:image/png;base64," + base64.b64encode(png).decode()
    body = {
        "invalid json": b"{not json",
        "a list": b"[1, 2]",
        "unknown parameter": _chat(good, top_logprobs=3),
        "n = 2": _chat(good, n=2),
        "no image": {"messages": [{"role": "user", "content": "What is it?"}]},
        "two images": {"messages": [{"role": "user", "content": _chat(good)["messages"][0]["content"] * 2}]},
        "bad base64": _chat("data:image/png;base64,@@@not-base64@@@"),
        "an http URL": _chat("http://example.com/cat.png"),
        "a file path": _chat("/etc/passwd"),
        "not an image": _chat("data:image/png;base64," + base64.b64encode(b"hello there").decode()),
        "truncated image": _chat("data:image/png;base64," + base64.b64encode(png[: len(png) // 2]).decode()),
        "too many bytes": _chat("data:image/png;base64," + base64.b64encode(png + bytes(300_000)).decode()),
        "unknown id": _chat("htc-image://" + "0" * 32),
        "too long a question": _chat(good, "what " * 2000),
        "two turns": {"messages": _chat(good)["messages"] + [{"role": "assistant", "content": "red"},
                                                             {"role": "user", "content": "And?"}]},
        "temperature 5": _chat(good, temperature=5),
        "max_tokens 0": _chat(good) | {"max_tokens": 0},
        "no question": _chat(good, ""),
    }[case]
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(served["base"] + "/v1/chat/completions", timeout=60, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and "Traceback" not in r.text and {"type", "param", "code"} <= set(error)
    assert httpx.get(served["base"] + "/health").json()["status"] == "ok"


def test_a_full_queue_answers_429_with_retry_after(served, scenes_dir):
    engine = served["engine"]
    image_id = engine.image_id(_png_bytes(scenes_dir))
    asyncio.run(engine.add_image(_png_bytes(scenes_dir)))

    async def full():
        busy = Engine(engine.model, engine.tok, engine.store, limits=Limits(queue_size=1))
        busy._queue, busy._images, busy._work = asyncio.Queue(1), asyncio.Queue(1), asyncio.Event()
        busy._batcher = asyncio.get_running_loop().create_future()  # a model call that never ends
        waiting = asyncio.ensure_future(busy.ask(image_id, "What color?", 4))
        uploading = asyncio.ensure_future(busy.add_image(b"an image waiting to be compressed"))
        await asyncio.sleep(0)
        with pytest.raises(ServeError) as e:
            await busy.ask(image_id, "What color?", 4)
        with pytest.raises(ServeError) as e_image:
            await busy.add_image(b"another image")
        waiting.cancel()
        uploading.cancel()
        busy.close()
        return e.value, e_image.value

    e, e_image = asyncio.run(full())
    assert e.status == e_image.status == 429 and "busy" in str(e) and "images waiting" in str(e_image)
    from htc_vlm.serving.app import _error

    response = _error(e)
    assert response.status_code == 429 and response.headers["retry-after"] == "1"
    assert json.loads(response.body)["error"]["type"] == "rate_limit_error"


def _engine_of(served, **limits):
    return Engine(served["model"], served["tok"], CacheStore(parse_bytes("1MB")), limits=Limits(**limits))


@pytest.mark.parametrize("gap, wait, expected", [(0.5, 5.0, [4, 1]),  # the burst joins; the late one does not
                                                  (0.02, 5.0, [1, 1, 1, 1, 1]),  # arrivals 0.2 s apart: no batch
                                                  (0.5, 0.5, [3, 1, 1])])  # the wait caps the burst
def test_a_batch_takes_questions_while_they_keep_arriving_within_the_gap(served, gap, wait, expected):
    """Clients answered together ask again in a burst spread over some milliseconds: each arrival
    within ``batch_gap_s`` of the last joins the batch, up to ``batch_wait_s`` after its first."""
    engine = _engine_of(served, batch_gap_s=gap, batch_wait_s=wait)

    async def arrivals():
        queue, sizes = asyncio.Queue(), []

        async def feed():
            for delay in (0.0, 0.2, 0.2, 0.2, 1.0):  # a burst of four at 0, 0.2, 0.4, 0.6 s; one at 1.6 s
                await asyncio.sleep(delay)
                queue.put_nowait(len(sizes))

        feeder = asyncio.ensure_future(feed())
        while sum(sizes) < 5:
            while queue.empty():  # _take starts from a queue that holds a question
                await asyncio.sleep(0.001)
            sizes.append(len(await engine._take(queue, 32)))
        await feeder
        return sizes

    assert asyncio.run(arrivals()) == expected


def test_new_images_uploaded_together_are_compressed_in_one_call_and_a_bad_one_fails_alone(served, scenes_dir):
    from htc_vlm.data.images import load_rgb
    from htc_vlm.data.llava import PromptBuilder, get_template
    from htc_vlm.inference import ImageEncoder

    engine = _engine_of(served, batch_wait_s=0.05)
    images = sorted((scenes_dir / "images").glob("test_*.png"))[4:8]

    async def upload():
        good = [engine.add_image(i.read_bytes()) for i in images]
        return await asyncio.gather(*good, engine.add_image(b"not an image"), return_exceptions=True)

    *made, bad = asyncio.run(upload())
    engine.close()
    assert engine.compress_batch_sizes == [5] and engine.compressions == 4  # one call; the bad one is not counted
    assert isinstance(bad, ServeError) and bad.status == 400 and bad.code == "invalid_image"
    model, tok = served["model"], served["tok"]
    prefix = PromptBuilder(tok, get_template("plain"), model.config).prefix_ids()
    for path, (_, cache, created) in zip(images, made):
        pix, q = ImageEncoder(model).encode([path], [load_rgb(path, 48)])
        alone = model.compress(pix, q, prefix_ids=prefix).split(len(prefix))[1]  # the image part, one image
        assert created and cache.batch_size == 1
        for a, b in zip(cache.keys + cache.values, alone.keys + alone.values):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_waiting_questions_are_answered_before_waiting_compressions(served, scenes_dir):
    """Questions whose images are cached are what clients wait on: when both wait for the model,
    the questions' batch runs first, then the new images' batch."""
    engine = _engine_of(served)
    paths = sorted((scenes_dir / "images").glob("test_*.png"))[8:11]
    calls, gate = [], threading.Event()
    compress, answer = engine._compress, engine._answer

    def gated_compress(datas):
        calls.append(("compress", len(datas)))
        if len(calls) == 2:  # the first new image after the cached one: hold the model until all is queued
            gate.wait(30)
        return compress(datas)

    def recorded_answer(group, loop=None):
        calls.append(("answer", len(group)))
        return answer(group, loop)

    engine._compress, engine._answer = gated_compress, recorded_answer

    async def scenario():
        cached, _, _ = await engine.add_image(paths[0].read_bytes())
        busy = asyncio.ensure_future(engine.add_image(paths[1].read_bytes()))
        while len(calls) < 2:  # the model is compressing paths[1], held at the gate
            await asyncio.sleep(0.01)
        new = asyncio.ensure_future(engine.add_image(paths[2].read_bytes()))
        questions = [engine.submit(cached, q, 4) for q in ("What color?", "How many?")]
        await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.gather(busy, new, *questions)

    results = asyncio.run(scenario())
    engine.close()
    assert calls == [("compress", 1), ("compress", 1), ("answer", 2), ("compress", 1)]
    assert all(a.completion_tokens <= 4 for a in results[2:])


def test_an_uncompressed_model_is_served_with_its_full_image_cache_and_a_zero_budget_still_answers(make_model_dir,
                                                                                                  scenes_dir):
    """The baselines of the load benchmark: the upper bound keeps every image position (prefix
    caching); with no memory and no folder every request compresses its image again."""
    model_dir = make_model_dir("none")
    upper = HTCForConditionalGeneration.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    engine = Engine(upper, tok, CacheStore(0))
    data = _png_bytes(scenes_dir)

    async def twice():
        a = await engine.add_image(data)
        b = await engine.add_image(data)
        return a, b, await engine.ask(a[0], "What color is the circle?", 4, cache=b[1])

    (_, cache, made), (_, _, again), answer = asyncio.run(twice())
    engine.close()
    assert made and again and engine.compressions == 2  # nothing kept: compressed for each request
    assert cache.length == 36 and cache.meta["prefix_shared"] == 2  # every patch position; the prefix kept once
    assert answer.completion_tokens <= 4


def test_the_cache_store_evicts_by_bytes_and_reads_its_folder(served, scenes_dir, tmp_path):
    engine = served["engine"]
    _, cache, _ = asyncio.run(engine.add_image(_png_bytes(scenes_dir)))
    small = CacheStore(int(cache.nbytes * 2.5), tmp_path / "disk")
    for k in "abc":
        small.put(k, cache)
    assert small.stats.entries == 2 and small.stats.evictions == 1
    assert small.get("a") is not None  # evicted from memory, read back from the folder
    assert CacheStore(0).get("a") is None and parse_bytes("2GB") == 2 * 1024**3


def test_the_prefix_is_the_same_for_every_image_so_it_is_kept_once(served, scenes_dir):
    """What makes the shared prefix exact: the prefix precedes the image and attends causally."""
    from htc_vlm.data.llava import PromptBuilder, get_template

    model, tok = served["model"], served["tok"]
    prefix = PromptBuilder(tok, get_template("plain"), model.config).prefix_ids()
    caches = [model.compress(torch.randn(1, 3, 48, 48), None, prefix_ids=prefix) for _ in range(2)]
    (p0, i0), (p1, i1) = (c.split(len(prefix)) for c in caches)
    assert all(torch.equal(a, b) for a, b in zip(p0.keys + p0.values, p1.keys + p1.values))
    assert not torch.equal(i0.keys[-1], i1.keys[-1])
    back = i0.after(p0)
    assert all(torch.equal(a, b) for a, b in zip(back.keys + back.values, caches[0].keys + caches[0].values))


def test_the_cache_store_takes_an_fsspec_url_shared_by_two_stores(served, scenes_dir):
    """Two stores on one URL (two replicas): a cache one of them wrote is a hit for the other."""
    pytest.importorskip("fsspec")
    engine = served["engine"]
    _, cache, _ = asyncio.run(engine.add_image(_png_bytes(scenes_dir)))
    one, two = CacheStore(0, "memory://htc-test/caches"), CacheStore(0, "memory://htc-test/caches")
    assert two.get("k") is None and "k" not in two
    one.put("k", cache)
    back = two.get("k")
    assert "k" in two and back is not None and torch.equal(back.keys[0], cache.keys[0])
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe_file("/htc-test/caches/broken.safetensors", b"not a cache")
    assert two.get("broken") is None  # a broken object is a miss, made again by the server


def test_streaming_sends_pieces_as_they_are_generated_and_they_add_up_with_stop_strings(served, scenes_dir):
    image = sorted((scenes_dir / "images").glob("test_*.png"))[5]
    plain = httpx.post(served["base"] + "/v1/chat/completions", json=_chat(_url(image)), timeout=60).json()
    text = plain["choices"][0]["message"]["content"]
    words = text.split()
    assert len(words) > 1  # the stop-string case below is exercised
    for stop in ([], [words[-1]] if len(words) > 1 else [], ["zzz"]):
        body = _chat(_url(image), stream=True, stop=stop)
        expect = httpx.post(served["base"] + "/v1/chat/completions", json=_chat(_url(image), stop=stop),
                            timeout=60).json()["choices"][0]
        chunks = []
        with httpx.stream("POST", served["base"] + "/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:])["choices"][0])
        content = [c["delta"]["content"] for c in chunks if c["delta"].get("content")]
        assert "".join(content) == expect["message"]["content"]
        assert chunks[-1]["finish_reason"] == expect["finish_reason"]
        if plain["usage"]["completion_tokens"] > 2 and not stop:
            assert len(content) >= 2  # sent piece by piece, not as one block at the end
