"""Images in the server's answers: the ``answer_images`` hook of the engine, and what a request may ask of images.

The app is served over real HTTP by uvicorn in a thread of this process, over a real tiny model, and built with
``create_app(model, settings, answer_images=hook)``: the hook is the seam a model that answers with images plugs
into (issue 24). Here it hands back the images a test chose. Checked: the images follow the text as OpenAI image
content parts (PNG data URLs; plain and streamed, the text unchanged), what the hook is told about each finished
row, images scaled down to ``--max-image-size``, a failing hook failing only its request, and the 400s for
``modalities``, ``image.steps`` and ``image.size`` (each naming the field and the limit).
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from mmbridge.model.multimodal import MultimodalModel
from mmbridge.serve import ServeSettings, create_app
from mmbridge.serve.outputs import ImageOptions, image_content_parts, message_content
from serve_support import (MODEL_NAME, ChosenImages, ThreadServer, data_url, image_part, openai_client, sample_image,
                           save_tiny_model)

MAX_STEPS, MAX_SIZE = 8, 64
GREEDY = {"temperature": 0, "max_tokens": 10}


@pytest.fixture(scope="module")
def hook() -> ChosenImages:
    return ChosenImages()


@pytest.fixture(scope="module")
def server(tokenizer_dir, tmp_path_factory, hook):
    model_dir = save_tiny_model(tokenizer_dir, str(tmp_path_factory.mktemp("answer_images") / "model"))
    settings = ServeSettings(served_model_name=MODEL_NAME, max_image_steps=MAX_STEPS, max_image_size=MAX_SIZE)
    app = create_app(MultimodalModel.from_pretrained(model_dir), settings, answer_images=hook)
    yield from ThreadServer(app).running()


@pytest.fixture()
def drawing(hook):
    """The hook answers with a 100 × 50 RGB picture and a 20 × 20 greyscale-with-alpha one during the test."""
    wide = Image.fromarray(np.kron(np.array([[[200, 30, 30], [30, 30, 200]]], dtype=np.uint8),
                                   np.ones((50, 50, 1), dtype=np.uint8)))  # red left half, blue right half
    small = Image.new("LA", (20, 20), (128, 200))
    hook.images, hook.rows, hook.error = [wide, small], [], None
    yield wide, small
    hook.images, hook.error = [], None


def post(server, content, **settings) -> httpx.Response:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}], **GREEDY, **settings}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)


def decoded(part: dict) -> Image.Image:
    assert part["type"] == "image_url"
    prefix = "data:image/png;base64,"
    assert part["image_url"]["url"].startswith(prefix)
    return Image.open(io.BytesIO(base64.b64decode(part["image_url"]["url"][len(prefix):])))


def check_drawn(parts: list[dict], wide: Image.Image, small: Image.Image) -> None:
    """The two hook images, in order: the wide one scaled to --max-image-size (64 × 32), the small one as it was."""
    first, second = (decoded(part) for part in parts)
    assert first.size == (MAX_SIZE, MAX_SIZE // 2)
    pixels = np.asarray(first.convert("RGB"), dtype=int)
    assert (abs(pixels[:, :24] - [200, 30, 30]).max(), abs(pixels[:, 40:] - [30, 30, 200]).max()) == (0, 0)
    assert second.size == (20, 20) and np.array_equal(np.asarray(second), np.asarray(small))


def test_images_follow_the_text_of_a_plain_answer(server, hook, drawing):
    content = [image_part(data_url(sample_image())), {"type": "text", "text": "Draw it again."}]
    hook.images = []
    text_only = post(server, content).json()
    hook.images = list(drawing)
    reply = post(server, content)
    assert reply.status_code == 200, reply.text
    message = reply.json()["choices"][0]["message"]
    text = text_only["choices"][0]["message"]["content"]
    assert isinstance(text, str) and text  # without images, content stays a plain string
    assert message["content"][0] == {"type": "text", "text": text}  # the same answer text, then the images
    check_drawn(message["content"][1:], *drawing)
    usage, row = reply.json()["usage"], hook.rows[-1]
    assert (row.text, row.finish_reason) == (text, reply.json()["choices"][0]["finish_reason"])
    assert len(row.token_ids) == usage["completion_tokens"] and len(row.example["input_ids"]) == usage["prompt_tokens"]
    assert "pixel_values" in row.example  # the row's prompt as the model saw it, image included
    assert row.options == ImageOptions(requested=False, steps=None, size=None, max_steps=MAX_STEPS, max_size=MAX_SIZE)


def test_images_follow_the_text_of_a_streamed_answer(server, hook, drawing):
    client = openai_client(server)
    plain = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hello"}], **GREEDY)
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hello"}],
                                                 stream=True, **GREEDY))
    deltas = [chunk.choices[0].delta.content for chunk in chunks]
    images = [index for index, delta in enumerate(deltas) if isinstance(delta, list)]
    texts = [index for index, delta in enumerate(deltas) if isinstance(delta, str) and delta]
    assert len(images) == 2 and max(texts) < min(images)  # after the last text delta ...
    assert chunks[-1].choices[0].finish_reason and images[-1] == len(chunks) - 2  # ... before the finish reason
    assert plain.choices[0].message.content[0]["text"] == "".join(deltas[index] for index in texts)
    check_drawn([deltas[index][0] for index in images], *drawing)
    check_drawn(plain.choices[0].message.content[1:], *drawing)  # the openai client reads the parts as they are


def test_a_failing_hook_fails_its_request_and_the_server_goes_on(server, hook, drawing):
    hook.error = RuntimeError("the generator is missing its unet")
    failed = post(server, "Draw a circle.")
    assert failed.status_code == 500
    assert failed.json()["error"]["message"] == ("drawing the answer's images failed: RuntimeError: the generator "
                                                 "is missing its unet")
    streamed = post(server, "Draw a circle.", stream=True)
    events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert events[-1]["error"]["message"].startswith("drawing the answer's images failed")
    hook.error = None
    assert post(server, "Draw a circle.").status_code == 200


IMAGE_REJECTIONS = {  # name: (request fields, param, code, words the message holds)
    "steps over the limit": ({"image": {"steps": MAX_STEPS + 1}}, "image.steps", "image_steps_too_large",
                             [f"image.steps is {MAX_STEPS + 1}", f"at most {MAX_STEPS}", "--max-image-steps"]),
    "size over the limit": ({"image": {"size": MAX_SIZE + 1}}, "image.size", "image_size_too_large",
                            [f"image.size is {MAX_SIZE + 1}", f"at most {MAX_SIZE}", "--max-image-size"]),
    "no steps": ({"image": {"steps": 0}}, "image.steps", "invalid_value", ["greater than or equal to 1"]),
    "unknown image option": ({"image": {"style": "oil"}}, "image.style", "unknown_parameter", ["image.style"]),
    "an image answer from a text-only model": ({"modalities": ["text", "image"]}, "modalities",
                                               "unsupported_modality", ["cannot answer with images"]),
    "image options to a text-only model": ({"image": {"steps": 4}}, "image", "unsupported_modality",
                                           ["cannot answer with images"]),
    "an audio answer": ({"modalities": ["text", "audio"]}, "modalities", "unsupported_modality", ["'audio'"]),
    "no modality": ({"modalities": []}, "modalities", "invalid_value", ["at least 1"]),
}


@pytest.mark.parametrize("name", list(IMAGE_REJECTIONS))
def test_image_requests_are_checked_against_the_limits_and_the_model(server, name):
    fields, param, code, words = IMAGE_REJECTIONS[name]
    response = post(server, "Draw a circle.", **fields)
    error = response.json()["error"]
    assert (response.status_code, error["param"], error["code"]) == (400, param, code), response.text
    assert all(word in error["message"] for word in words), error["message"]
    assert post(server, "Draw a circle.", modalities=["text"]).status_code == 200  # text is always allowed


# -- in process -------------------------------------------------------------------------------------
def test_content_parts_of_images():
    assert message_content("an answer", []) == "an answer"
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
    assert message_content("", [part]) == [part]  # no empty text part before the images
    cmyk = Image.new("CMYK", (600, 300), (0, 255, 255, 0))
    (scaled,) = (decoded(part) for part in image_content_parts([cmyk], 512))
    assert scaled.size == (512, 256) and scaled.mode == "RGB"
    with pytest.raises(TypeError, match="answer image 1 is a ndarray, not a PIL image"):
        image_content_parts([cmyk, np.zeros((4, 4, 3))], 512)


def test_image_options_cap_the_generator_defaults():
    options = ImageOptions(requested=True, steps=None, size=256, max_steps=30, max_size=512)
    assert (options.steps_or(50), options.steps_or(20), options.size_or(1024), options.largest_side) == (30, 20, 256,
                                                                                                          256)
    assert ImageOptions().largest_side == ServeSettings().max_image_size


@pytest.mark.parametrize("name", ["max_image_steps", "max_image_size"])
def test_image_limits_must_be_positive(name):
    with pytest.raises(ValueError, match=f"--{name.replace('_', '-')} must be > 0"):
        ServeSettings(**{name: 0}).validate()
