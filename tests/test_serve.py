"""``mmbridge serve``: a real server process on 127.0.0.1 with a tiny model, driven by the ``openai`` client.

Completions plain and streamed (text, images as data URLs, multi-turn), greedy answers equal to
``model.chat``, stop strings, the rejections (each a 4xx naming the field, the server answering after),
batching of concurrent requests, and a streaming client that leaves early; in process, the streamed
text's hold-backs and the scheduler's grouping.
"""

from __future__ import annotations

import asyncio
import base64
import threading

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from mmbridge.model.multimodal import MultimodalModel
from mmbridge.serve.batching import BatchScheduler, Job, Sampling
from mmbridge.serve.detokenize import AnswerText
from serve_support import (MODEL_NAME, ServerProcess, bomb_png, data_url, image_part, openai_client, sample_image,
                           save_tiny_model)

GREEDY = {"temperature": 0, "max_tokens": 8}
# sampling hot enough that two seeds, or sampling and greedy decoding, share no 16-token answer on any CPU
SAMPLED = {"temperature": 1.5, "top_p": 0.9, "max_tokens": 16}
MAX_IMAGES, MAX_BODY, MAX_PIXELS, TOKENS_CAP = 2, 65536, 100_000, 64


@pytest.fixture(scope="module")
def model_dir(tokenizer_dir, tmp_path_factory) -> str:
    """Wide LLM weights: greedy answers follow the pixels, so a server that drops or mixes up images fails."""
    return save_tiny_model(tokenizer_dir, str(tmp_path_factory.mktemp("serve") / "model"), initializer_range=0.2)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    process = ServerProcess(model_dir, str(tmp_path_factory.mktemp("serve_log") / "server.log"),
                            "--max-images", str(MAX_IMAGES), "--max-body-bytes", str(MAX_BODY),
                            "--max-image-pixels", str(MAX_PIXELS), "--max-tokens-cap", str(TOKENS_CAP),
                            "--batch-wait-ms", "50")
    yield from process.running()


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


@pytest.fixture(scope="module")
def model(model_dir) -> MultimodalModel:
    return MultimodalModel.from_pretrained(model_dir)


def ask(client, content, **settings):
    return client.chat.completions.create(messages=[{"role": "user", "content": content}],
                                          **{"model": MODEL_NAME, **GREEDY, **settings})


def streamed(client, content, **settings) -> tuple[list, str]:
    chunks = list(ask(client, content, stream=True, stream_options={"include_usage": True}, **settings))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    return chunks, text


def test_models_and_health(server, client):
    assert [card.id for card in client.models.list().data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    assert server.health()["status"] == "ok"


def test_text_completion(client):
    reply = ask(client, "Hello there")
    assert reply.object == "chat.completion" and reply.model == MODEL_NAME and reply.id.startswith("chatcmpl-")
    choice = reply.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage.completion_tokens <= 8 and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_greedy_answer_equals_model_chat(client, model):
    answers = []
    for image in (sample_image(), sample_image("blue", "square")):
        reply = ask(client, [image_part(data_url(image)), {"type": "text", "text": "What colour is it?"}])
        expected = model.chat("What colour is it?", [image], max_new_tokens=8)
        assert reply.choices[0].message.content == expected
        assert reply.usage.prompt_tokens > model.tokens_per_image  # the visual tokens count as prompt tokens
        answers.append(expected)
    assert answers[0] != answers[1]  # the image matters: a server that ignored it would fail one of the two


def test_multi_turn_with_system_prompt_equals_model_chat(client, model):
    image = sample_image("blue", "square")
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": [image_part(data_url(image)), {"type": "text", "text": "What colour?"}]},
                {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": [{"type": "text", "text": "Which shape is it?"}]}]
    reply = client.chat.completions.create(model=MODEL_NAME, messages=messages, **GREEDY)
    history = [{"role": "system", "content": "Answer briefly."},
               {"role": "user", "content": "<image>\nWhat colour?"}, {"role": "assistant", "content": "Blue."}]
    assert reply.choices[0].message.content == model.chat("Which shape is it?", [image], history=history,
                                                          max_new_tokens=8)
    # the image of the first turn still matters at the second
    assert reply.choices[0].message.content != model.chat("Which shape is it?", [sample_image()], history=history,
                                                          max_new_tokens=8)


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_streamed_completion_equals_plain(client, with_image):
    content = [image_part(data_url(sample_image()))] if with_image else []
    content.append({"type": "text", "text": "Describe the picture."})
    chunks, text = streamed(client, content)
    assert text == ask(client, content).choices[0].message.content
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert len({chunk.id for chunk in chunks}) == 1
    finish = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
    assert finish[-1] in ("stop", "length") and not any(finish[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 8


def test_stop_string_cuts_the_answer(client):
    full = ask(client, "Hello there", max_tokens=12).choices[0].message.content
    start = next((index for index in range(2, len(full) - 1) if full[index:index + 2].isalnum()), None)
    assert start is not None, f"the tiny model's answer {full!r} has no two letters to stop at"
    stop = full[start:start + 2]
    expected = full[:full.find(stop)].rstrip()
    reply = ask(client, "Hello there", max_tokens=12, stop=[stop, "never seen"])
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == (expected, "stop")
    assert streamed(client, "Hello there", max_tokens=12, stop=stop)[1] == expected


def test_sampling_with_a_seed_repeats(client):
    settings = {"temperature": 0.9, "top_p": 0.9, "seed": 7, "max_tokens": 8}
    first, second = (ask(client, "Hello there", **settings).choices[0].message.content for _ in range(2))
    assert first == second


def test_sampling_follows_temperature_top_p_and_seed(client, model):
    """A seeded sample is ``model.chat``'s with the same settings, another seed gives another answer, and
    neither is the greedy one: a server that ignored the sampling settings would fail."""
    answers = {seed: ask(client, "Hello there", seed=seed, **SAMPLED).choices[0].message.content for seed in (7, 8)}
    expected = model.chat("Hello there", max_new_tokens=16, do_sample=True, temperature=1.5, top_p=0.9, seed=7)
    assert answers[7] == expected
    greedy = ask(client, "Hello there", max_tokens=16).choices[0].message.content
    assert len({answers[7], answers[8], greedy}) == 3, (answers, greedy)


def bad(client, content, **settings) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        ask(client, content, **settings)
    return caught.value


def image_url_param(message: int, part: int) -> str:
    return f"messages[{message}].content[{part}].image_url"


REJECTIONS = {  # name: (content, settings, status, param, code)
    "n=2": ("hi", {"n": 2}, 400, "n", "unsupported_value"),
    "unknown model": ("hi", {"model": "gpt-4o"}, 404, "model", "model_not_found"),
    "oversized body": ("x" * (MAX_BODY + 1), {}, 413, None, "request_too_large"),
    "too many images": ([image_part(data_url(sample_image()))] * (MAX_IMAGES + 1), {}, 400, image_url_param(0, 2),
                        "too_many_images"),
    "pixel bomb": ([image_part("data:image/png;base64," + base64.b64encode(bomb_png(20000, 20000)).decode())], {},
                   400, image_url_param(0, 0), "image_too_large"),
    "bad base64": ([{"type": "text", "text": "look"}, image_part("data:image/png;base64,iVBOR%%w0KG")], {}, 400,
                   image_url_param(0, 1), "invalid_base64"),
    "not an image": ([image_part("data:image/png;base64," + base64.b64encode(b"plain text").decode())], {}, 400,
                     image_url_param(0, 0), "invalid_image"),
    "remote url without the flag": ([image_part("https://example.com/cat.png")], {}, 400, image_url_param(0, 0),
                                    "remote_images_disabled"),
    "path without an image root": ([image_part("/etc/hostname")], {}, 400, image_url_param(0, 0),
                                   "local_images_disabled"),
    "prompt over the context": ("red " * 600, {}, 400, "messages", "context_length_exceeded"),
    "max_tokens over the cap": ("hi", {"max_tokens": TOKENS_CAP + 1}, 400, "max_tokens", "max_tokens_too_large"),
    "temperature out of range": ("hi", {"temperature": 3}, 400, "temperature", "invalid_value"),
    "unknown argument": ("hi", {"extra_body": {"best_of": 2}}, 400, "best_of", "unknown_parameter"),
    "image placeholder in text": ("what is <image>?", {}, 400, "messages[0].content", None),
    "unknown part type": ([{"type": "input_audio", "input_audio": {}}], {}, 400, "messages[0].content[0].type", None),
}


@pytest.mark.parametrize("name", list(REJECTIONS))
def test_rejections_name_the_field_and_the_server_keeps_serving(client, name):
    content, settings, status, param, code = REJECTIONS[name]
    error = bad(client, content, **settings)
    assert (error.status_code, error.param, error.code) == (status, param, code), error.body
    assert error.type == "invalid_request_error" and error.message
    assert ask(client, "Hello there", max_tokens=2).choices[0].finish_reason in ("stop", "length")


def test_conversation_rejections(server):
    cases = [  # (messages, param)
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "messages"),
        ([{"role": "assistant", "content": [image_part(data_url(sample_image()))]}, {"role": "user", "content": "hi"}],
         "messages[0].content[0]"),
        ([{"role": "tool", "content": "42", "tool_call_id": "x"}], "messages[0].role"),
        ([{"role": "user", "content": None}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": "data:,"}]}], image_url_param(0, 0)),
    ]
    for messages, param in cases:
        response = httpx.post(f"{server.url}/v1/chat/completions", json={"model": MODEL_NAME, "messages": messages})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param, response.text
    broken = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json")
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"


def test_concurrent_requests_are_batched_and_all_answered(server, client):
    before = server.health()
    replies, errors, barrier = {}, [], threading.Barrier(16)

    def request(index: int) -> None:
        barrier.wait()
        try:
            content = [image_part(data_url(sample_image(size=16 + index)))] if index % 2 else []
            replies[index] = ask(client, content + [{"type": "text", "text": f"Question {index}?"}], max_tokens=6)
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=request, args=(index,)) for index in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and len(replies) == 16
    assert all(reply.choices[0].finish_reason in ("stop", "length") for reply in replies.values())
    after = server.health()
    assert after["requests"] - before["requests"] == 16
    assert after["batches"] - before["batches"] < 16 and after["largest_batch"] > 1  # decoded together


def test_client_leaving_mid_stream_does_not_stall_others(server, client):
    story = "Tell me a long story"
    assert ask(client, story, max_tokens=TOKENS_CAP).usage.completion_tokens == TOKENS_CAP  # no early EOS
    dropped_before = server.health()["dropped"]
    results, barrier = [], threading.Barrier(4)

    def other(index: int) -> None:
        barrier.wait()
        results.append(ask(client, f"Other question {index}", max_tokens=4).choices[0].finish_reason)

    threads = [threading.Thread(target=other, args=(index,)) for index in range(3)]
    for thread in threads:
        thread.start()
    stream = ask(client, story, max_tokens=TOKENS_CAP, stream=True)
    barrier.wait()
    next(iter(stream))  # the role chunk: the request is queued or decoding
    stream.close()  # the client leaves
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 3 and all(reason in ("stop", "length") for reason in results)
    assert ask(client, "Still there?", max_tokens=2).choices[0].finish_reason in ("stop", "length")
    health = server.health()
    assert health["queued"] == 0 and health["dropped"] == dropped_before + 1  # its row was dropped, not finished


# -- in process: the answer text and the scheduler's groups --------------------------------------
def feed(text: AnswerText, tokens: list[int]) -> tuple[str, bool]:
    sent = ""
    for token in tokens:
        delta, stopped = text.add(token)
        sent += delta
        if stopped:
            return sent, True
    return sent + text.finish(), False


def test_answer_text_deltas_add_up_to_the_stripped_decode(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokens = tokenizer("  The image shows a red circle, é!  ", add_special_tokens=False)["input_ids"]
    assert feed(AnswerText(tokenizer, []), tokens) == ("The image shows a red circle, é!", False)
    assert feed(AnswerText(tokenizer, ["red", "xyz"]), tokens) == ("The image shows a", True)
    partial = AnswerText(tokenizer, [])
    deltas = [partial.add(token)[0] for token in tokenizer("é", add_special_tokens=False)["input_ids"]]
    assert "\ufffd" not in "".join(deltas)  # half a character is held back, never sent


def test_scheduler_groups_by_sampling_settings_in_arrival_order():
    groups = []

    def record(group: list[Job]) -> int:
        groups.append([job.prompt_tokens for job in group])
        return 0

    async def schedule() -> None:
        scheduler = BatchScheduler(record, max_batch=3, wait_s=0.01, max_queued=100)
        settings = [Sampling(0), Sampling(0.7), Sampling(0), Sampling(0.7), Sampling(0.7, seed=1), Sampling(0),
                    Sampling(0), Sampling(0.7, seed=1), Sampling(0.7, top_p=0.5)]
        loop = asyncio.get_running_loop()
        for index, sampling in enumerate(settings):
            scheduler.submit(Job(example={}, sampling=sampling, max_tokens=1, stop=[], prompt_tokens=index, loop=loop))
        scheduler.start()
        # stats count a group when it is handed to the generation thread; wait for the thread to have run it
        while sum(map(len, groups)) < len(settings):
            await asyncio.sleep(0.01)
        await scheduler.stop()

    asyncio.run(asyncio.wait_for(schedule(), timeout=60))
    assert groups == [[0, 2, 5], [1, 3], [4], [6], [7], [8]]  # greedy, same temperature, seeded alone, ...
