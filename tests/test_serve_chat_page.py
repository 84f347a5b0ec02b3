"""The chat page at ``GET /`` in a real browser (Debian's chromium under selenium): the moves of a chat.

The app of ``mmbridge serve`` over a real tiny model, served by uvicorn in a thread of this process
(:class:`~serve_support.ThreadServer`), so that the test holds two things: the engine's ``answer_images`` hook (the
seam for models that answer with images; here it answers with the pictures a test chose) and a thin ASGI wrapper
that records every request body as the server received it and, when asked, holds a stream after its first text.

Checked: two turns, the second request holding the first turn; previews of images attached by the file picker and
by drag-and-drop, several per turn, sent as data URL image parts and kept in the history; text that grows while
the stream is still open; an example click; Clear; an error shown in the answer's place and left out of the
conversation; an answer's image parts shown as images. Without a browser: the shipped example files are what
``tests/serve_examples.py`` draws, and ``GET /examples/{name}`` serves them and nothing else.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import os
import threading
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from browser_support import (WAIT_S, assistant_messages, chromium, last_answer, last_error, open_page, send,
                             set_max_tokens, type_message)
from mmbridge.model.multimodal import MultimodalModel
from mmbridge.serve import ServeSettings, create_app
from mmbridge.worlds.miniworld import make_episode, render_image
from serve_examples import EXAMPLES, MANIFEST, MAX_EXAMPLE_BYTES, default_folder, write_examples
from serve_support import MODEL_NAME, ChosenImages, ThreadServer, sample_image, save_tiny_model

MAX_TOKENS = 12
SCREENSHOT_BYTES = 150_000  # the README's screenshot stays small
PNG_URL = "data:image/png;base64,"
DROP_FILE = """
const [name, encoded] = arguments;
const bytes = Uint8Array.from(atob(encoded), (char) => char.charCodeAt(0));
const transfer = new DataTransfer();
transfer.items.add(new File([bytes], name, {type: "image/png"}));
const zone = document.getElementById("drop-zone");
for (const type of ["dragenter", "dragover", "drop"]) {
  zone.dispatchEvent(new DragEvent(type, {dataTransfer: transfer, bubbles: true, cancelable: true}));
}
"""


class Recorder:
    """ASGI wrapper: keeps each ``POST /v1/chat/completions`` body as received; while ``hold`` is set (a
    ``threading.Event``), a streamed answer's events after its first text wait until the event is set."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.bodies: list[dict] = []
        self.hold: threading.Event | None = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            return await self.app(scope, receive, send)
        chunks, hold, texted = [], self.hold, False

        async def recording_receive() -> dict:
            message = await receive()
            if message["type"] == "http.request":  # not the disconnect a streaming response listens for
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    self.bodies.append(json.loads(b"".join(chunks)))
            return message

        async def holding_send(message: dict) -> None:
            nonlocal texted
            if message["type"] == "http.response.body" and hold is not None:
                if texted:
                    await asyncio.to_thread(hold.wait, WAIT_S)
                texted = texted or carries_text(message.get("body", b""))
            await send(message)

        await self.app(scope, recording_receive, holding_send)


def carries_text(body: bytes) -> bool:
    """Whether a piece of an event stream holds a chunk with non-empty text."""
    for line in body.decode().splitlines():
        if line.startswith("data: {"):
            choices = json.loads(line[6:]).get("choices") or [{}]
            content = choices[0].get("delta", {}).get("content")
            if isinstance(content, str) and content:
                return True
    return False


@pytest.fixture(scope="module")
def hook() -> ChosenImages:
    return ChosenImages()


@pytest.fixture(scope="module")
def server(tokenizer_dir, tmp_path_factory, hook):
    model_dir = save_tiny_model(tokenizer_dir, str(tmp_path_factory.mktemp("chat_page") / "model"))
    app = create_app(MultimodalModel.from_pretrained(model_dir), ServeSettings(served_model_name=MODEL_NAME),
                     answer_images=hook)
    server = ThreadServer(Recorder(app))
    yield from server.running()


@pytest.fixture(scope="module")
def recorder(server) -> Recorder:
    return server.server.config.app


@pytest.fixture(scope="module")
def browser():
    with chromium(window="1100,1250") as driver:
        yield driver


@pytest.fixture()
def page(server, browser, recorder, hook):
    """A fresh page (an empty conversation, its examples shown) with max tokens set; the hook draws nothing unless a
    test says."""
    hook.images, recorder.hold = [], None
    open_page(browser, server.url, MODEL_NAME)
    WebDriverWait(browser, WAIT_S).until(  # the examples load after the page
        lambda _: len(browser.find_elements(By.CSS_SELECTOR, "#examples button")) == len(EXAMPLES))
    set_max_tokens(browser, MAX_TOKENS)
    yield browser
    hook.images, recorder.hold = [], None


def png_file(path, colour: str, shape: str) -> bytes:
    sample_image(colour, shape, size=32).save(path)
    with open(path, "rb") as handle:
        return handle.read()


def data_bytes(url: str) -> bytes:
    assert url.startswith(PNG_URL), url[:40]
    return base64.b64decode(url[len(PNG_URL):])


def image_urls(message: dict) -> list[str]:
    return [part["image_url"]["url"] for part in message["content"] if part["type"] == "image_url"]


def shown_images(driver, selector: str) -> list[Any]:
    return driver.find_elements(By.CSS_SELECTOR, selector)


# -- the tests --------------------------------------------------------------------------------------------
def test_second_turn_sends_the_first(page, recorder, tmp_path):
    picture = png_file(tmp_path / "square.png", "blue", "square")
    page.find_element(By.ID, "image").send_keys(str(tmp_path / "square.png"))
    type_message(page, "What colour is the shape?")
    assert send(page) == "done"
    first_answer = last_answer(page)
    type_message(page, "And which shape is it?")
    assert send(page) == "done"
    first, second = recorder.bodies[-2:]
    assert [message["role"] for message in second["messages"]] == ["user", "assistant", "user"]
    assert second["messages"][0] == first["messages"][0]  # the first turn as it was sent, image included
    assert data_bytes(image_urls(first["messages"][0])[0]) == picture
    assert second["messages"][1] == {"role": "assistant", "content": first_answer}
    assert second["messages"][2]["content"] == [{"type": "text", "text": "And which shape is it?"}]
    assert (first["stream"], first["temperature"], first["max_tokens"]) == (True, 0, MAX_TOKENS)
    history = shown_images(page, "#chat .message.user img")
    assert len(history) == 1 and data_bytes(history[0].get_attribute("src")) == picture  # still shown


def test_attached_images_are_previewed_and_sent_as_data_urls(page, recorder, tmp_path):
    pictures = [png_file(tmp_path / f"{colour}.png", colour, shape)
                for colour, shape in (("red", "circle"), ("green", "triangle"), ("blue", "square"))]
    page.find_element(By.ID, "image").send_keys(f"{tmp_path / 'red.png'}\n{tmp_path / 'green.png'}")  # picker
    page.execute_script(DROP_FILE, "blue.png", base64.b64encode(pictures[2]).decode())  # drag and drop
    WebDriverWait(page, WAIT_S).until(lambda _: len(shown_images(page, "#attachments img")) == 3)
    previews = shown_images(page, "#attachments img")
    assert [data_bytes(image.get_attribute("src")) for image in previews] == pictures
    assert all(image.is_displayed() and image.get_attribute("alt") for image in previews)
    type_message(page, "Which picture is red?")
    assert send(page) == "done"
    (asked,) = recorder.bodies[-1]["messages"]
    assert [data_bytes(url) for url in image_urls(asked)] == pictures  # in order, before the text
    assert asked["content"][-1] == {"type": "text", "text": "Which picture is red?"}
    assert not shown_images(page, "#attachments img")  # sent: the composer is empty again
    sent = shown_images(page, "#chat .message.user img")
    assert [data_bytes(image.get_attribute("src")) for image in sent] == pictures


def test_text_grows_while_the_stream_is_open(page, recorder):
    recorder.hold = hold = threading.Event()
    type_message(page, "Tell me about shapes.")
    send(page, wait=False)
    try:
        WebDriverWait(page, WAIT_S).until(lambda _: last_answer(page))  # the first text arrived ...
        partial = last_answer(page)
        assert assistant_messages(page)[-1].get_attribute("data-state") == "streaming"  # ... the stream is open
        assert page.find_element(By.ID, "send").get_attribute("disabled") is not None
    finally:
        hold.set()
    WebDriverWait(page, WAIT_S).until(lambda _: assistant_messages(page)[-1].get_attribute("data-state") == "done")
    final = last_answer(page)
    assert final.startswith(partial) and len(final) > len(partial), (partial, final)


def test_an_example_click_fills_the_input(page, recorder):
    with open(os.path.join(default_folder(), MANIFEST)) as handle:
        manifest = json.load(handle)
    buttons = page.find_elements(By.CSS_SELECTOR, "#examples button")
    assert [button.get_attribute("data-file") for button in buttons] == [example.file for example in EXAMPLES]
    assert all(entry["question"] in button.get_attribute("aria-label") for entry, button in zip(manifest, buttons))
    buttons[1].click()
    WebDriverWait(page, WAIT_S).until(lambda _: len(shown_images(page, "#attachments img")) == 1)
    with open(os.path.join(default_folder(), manifest[1]["file"]), "rb") as handle:
        shipped = handle.read()
    assert data_bytes(shown_images(page, "#attachments img")[0].get_attribute("src")) == shipped
    assert page.find_element(By.ID, "question").get_attribute("value") == manifest[1]["question"]
    assert send(page) == "done"
    (asked,) = recorder.bodies[-1]["messages"]
    assert [data_bytes(url) for url in image_urls(asked)] == [shipped]
    assert asked["content"][-1]["text"] == manifest[1]["question"]


def test_clear_starts_a_new_conversation(page, recorder):
    type_message(page, "Hello there.")
    assert send(page) == "done"
    page.find_element(By.CSS_SELECTOR, "#examples button").click()
    WebDriverWait(page, WAIT_S).until(lambda _: shown_images(page, "#attachments img"))
    page.find_element(By.ID, "clear").click()
    assert not page.find_elements(By.CSS_SELECTOR, "#chat .message") and not shown_images(page, "#attachments img")
    assert page.find_element(By.ID, "question").get_attribute("value") == ""
    type_message(page, "Hello again.")
    assert send(page) == "done"
    assert recorder.bodies[-1]["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Hello again."}]}]


def test_an_error_is_shown_in_the_answer_and_left_out_of_the_conversation(page, recorder):
    set_max_tokens(page, ServeSettings().max_tokens_cap + 1)
    type_message(page, "Hello there.")
    assert send(page) == "error" and last_answer(page) is None
    error = last_error(page)
    assert error.is_displayed() and error.get_attribute("role") == "alert"
    assert error.text.startswith(f"max_tokens is {ServeSettings().max_tokens_cap + 1}; this server allows at most")
    set_max_tokens(page, MAX_TOKENS)
    type_message(page, "Hello again.")
    assert send(page) == "done"
    assert [message["content"][0]["text"] for message in recorder.bodies[-1]["messages"]] == ["Hello again."]


def recoloured_example(colour: str, rgb: tuple[int, int, int]) -> Image.Image:
    """The first example's scene with its circle in ``colour``: what the hook hands back, standing in for a drawing."""
    example = EXAMPLES[0]
    (scene,) = make_episode(example.task, example.split, example.index, example.seed).images
    scene.objects = [dataclasses.replace(item, colour=colour, rgb=rgb) if item.shape == "circle" else item
                     for item in scene.objects]
    return render_image(scene)


def test_images_in_an_answer_are_shown(page, hook, tmp_path):
    """Two turns, the second answered with two images; the page's screenshot goes to tmp_path, and to the path in
    MMBRIDGE_CHAT_SCREENSHOT when set (the README's: ``docs/chat_page.png``)."""
    drawn = [recoloured_example("green", (40, 160, 60)), recoloured_example("blue", (40, 90, 220))]
    page.find_elements(By.CSS_SELECTOR, "#examples button")[0].click()
    WebDriverWait(page, WAIT_S).until(lambda _: shown_images(page, "#attachments img"))
    assert send(page) == "done"
    hook.images = drawn
    type_message(page, "Draw it again twice: the circle in green, then in blue.")
    assert send(page) == "done"
    for path in (str(tmp_path / "chat.png"), os.environ.get("MMBRIDGE_CHAT_SCREENSHOT")):
        if path:
            page.save_screenshot(path)
            assert os.path.getsize(path) < SCREENSHOT_BYTES, path
    answers = assistant_messages(page)
    assert not answers[0].find_elements(By.TAG_NAME, "img")
    shown = answers[1].find_elements(By.CSS_SELECTOR, ".images img")
    assert len(shown) == 2 and last_answer(page)  # the text, and the images after it
    assert page.execute_script("const [text, images] = arguments; return text.compareDocumentPosition(images)",
                               answers[1].find_element(By.CLASS_NAME, "text"),
                               answers[1].find_element(By.CLASS_NAME, "images")) == 4  # images follow the text
    for image, expected in zip(shown, drawn):
        assert image.is_displayed() and image.get_attribute("alt") and image.get_attribute("naturalWidth") != "0"
        decoded = Image.open(io.BytesIO(data_bytes(image.get_attribute("src"))))
        assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(expected.convert("RGB")))


def test_a_small_drawing_is_shown_larger_with_its_pixels_sharp(page, hook):
    """A generator that draws 32 px (the MiniWorld one) would leave a stamp-sized picture: it is shown 8rem wide,
    pixelated; larger images keep their own size (up to 12rem)."""
    hook.images = [sample_image("red", "circle", size=32), sample_image("blue", "square", size=160)]
    type_message(page, "Draw a red circle.")
    assert send(page) == "done"
    small, large = assistant_messages(page)[-1].find_elements(By.CSS_SELECTOR, ".images img")
    assert small.get_attribute("class") == "small" and small.size["width"] == 128  # 8rem of 16 px
    assert page.execute_script("return getComputedStyle(arguments[0]).imageRendering", small) == "pixelated"
    assert not large.get_attribute("class") and large.size["width"] == 160 + 2  # its own width and the border


# -- the examples, without a browser ----------------------------------------------------------------------
def test_shipped_examples_are_what_the_module_draws(tmp_path):
    entries = write_examples(str(tmp_path))
    with open(os.path.join(default_folder(), MANIFEST)) as handle:
        assert json.load(handle) == entries
    for entry in entries:
        shipped = os.path.join(default_folder(), entry["file"])
        assert os.path.getsize(shipped) < MAX_EXAMPLE_BYTES
        with Image.open(shipped) as image, Image.open(tmp_path / entry["file"]) as drawn:
            assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(drawn.convert("RGB"))), entry["file"]
        assert entry["question"].endswith("?") or entry["question"].endswith(".")
        assert entry["alt"]


def test_example_files_are_served_and_nothing_else(server):
    manifest = httpx.get(f"{server.url}/examples/{MANIFEST}", timeout=10)
    assert manifest.status_code == 200 and manifest.headers["content-type"] == "application/json"
    assert [entry["file"] for entry in manifest.json()] == [example.file for example in EXAMPLES]
    image = httpx.get(f"{server.url}/examples/{EXAMPLES[0].file}", timeout=10)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    for name in ("missing.png", "..%2Findex.html", "..%2F..%2Fapp.py"):
        missing = httpx.get(f"{server.url}/examples/{name}", timeout=10)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found", name
