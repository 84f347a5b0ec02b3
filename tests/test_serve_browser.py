"""The chat page at ``GET /`` of ``mmbridge serve`` in a real browser: Debian's chromium, driven by selenium.

A real ``mmbridge serve`` process over a tiny saved model; the page is opened, an image file is attached, a question
typed and Send clicked. The streamed answer the page shows must equal the API's greedy answer for the same image and
question, and a refused request must show the server's error message in the answer's place. Screenshots go to the
test's tmp_path. The chat's other moves (turns, previews, examples, Clear, images in answers) are in
``tests/test_serve_chat_page.py``; the browser helpers in ``tests/browser_support.py``.
"""

from __future__ import annotations

import base64
from typing import Any

import httpx
import pytest
from selenium.webdriver.common.by import By

from browser_support import (chromium, last_answer, last_error, open_page, send, set_max_tokens, text_of,
                             type_message)
from serve_support import MODEL_NAME, ServerProcess, image_part, sample_image, save_tiny_model

QUESTION, MAX_TOKENS = "What colour is the shape?", 12
RECORD_UPDATES = """
const chat = document.getElementById("chat");
window.answerUpdates = [];
new MutationObserver(() => {
  const answer = chat.querySelector(".message.assistant:last-child .text");
  if (answer) window.answerUpdates.push(answer.textContent);
}).observe(chat, {childList: true, characterData: true, subtree: true});
"""


@pytest.fixture(scope="module")
def server(tokenizer_dir, tmp_path_factory):
    """The server process, started: the test waits for it to answer (the browser starts meanwhile)."""
    model_dir = save_tiny_model(tokenizer_dir, str(tmp_path_factory.mktemp("browser") / "model"))
    process = ServerProcess(model_dir, str(tmp_path_factory.mktemp("browser_log") / "server.log"))
    try:
        yield process
    finally:
        process.stop()


def api_reply(server: ServerProcess, url: str) -> httpx.Response:
    """The API's non-streamed greedy reply to the page's question about the image at data ``url``."""
    content = [image_part(url), {"type": "text", "text": QUESTION}]
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": MAX_TOKENS}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)


def data_url_of(path: str, media_type: str) -> str:
    with open(path, "rb") as handle:
        return f"data:{media_type};base64," + base64.b64encode(handle.read()).decode()


def ask_in_page(driver, image_path: str) -> str:
    """Attach ``image_path``, type the question, click Send; the answer's final state (done or error)."""
    driver.find_element(By.ID, "image").send_keys(image_path)
    type_message(driver, QUESTION)
    set_max_tokens(driver, MAX_TOKENS)
    return send(driver)


def test_page_streams_the_greedy_answer_and_shows_errors(server, tmp_path):
    with chromium() as browser:
        server.wait_ready()
        open_page(browser, server.url, MODEL_NAME)
        assert browser.find_element(By.ID, "temperature").get_attribute("value") == "0"  # greedy by default
        check_answer(server, browser, tmp_path)
        open_page(browser, server.url, MODEL_NAME)  # a new conversation: the refused request holds one turn
        check_error(server, browser, tmp_path)


def check_answer(server: ServerProcess, browser: Any, tmp_path) -> None:
    """Ask about a PNG: the answer, appended as it streams, equals the API's greedy answer."""
    image_path = str(tmp_path / "shape.png")
    sample_image("blue", "square", size=32).save(image_path)
    expected = api_reply(server, data_url_of(image_path, "image/png")).json()["choices"][0]["message"]["content"]
    assert expected, "the tiny model's greedy answer is empty: nothing to compare"
    browser.execute_script(RECORD_UPDATES)
    state = ask_in_page(browser, image_path)
    browser.save_screenshot(str(tmp_path / "answer.png"))
    assert state == "done", text_of(browser, "#chat .message.assistant:last-child")
    assert last_answer(browser) == expected
    assert not browser.find_element(By.ID, "error").is_displayed()
    updates = [text for text in browser.execute_script("return window.answerUpdates") if text]
    assert updates[-1] == expected and all(expected.startswith(text) for text in updates)  # appended, in order


def check_error(server: ServerProcess, browser: Any, tmp_path) -> None:
    """Send a text file as the image: the answer shows the message of the server's 400 and no text."""
    text_path = str(tmp_path / "notes.txt")
    with open(text_path, "w") as handle:
        handle.write("not an image")
    refusal = api_reply(server, data_url_of(text_path, "text/plain"))
    assert refusal.status_code == 400
    state = ask_in_page(browser, text_path)
    browser.save_screenshot(str(tmp_path / "error.png"))
    assert state == "error" and last_answer(browser) is None
    error = last_error(browser)
    assert error.is_displayed() and error.text == refusal.json()["error"]["message"]
