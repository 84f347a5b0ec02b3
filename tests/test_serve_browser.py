"""The web page at ``GET /`` of ``mmbridge serve`` in a real browser: Debian's chromium, driven by selenium.

A real server process over a tiny saved model; the page is opened, an image file is chosen, a question typed
and Ask clicked. The streamed answer the page shows must equal the API's greedy answer for the same image and
question, and a refused request must show the server's error message. Screenshots go to the test's tmp_path.

The browser is the system one (no download): ``apt-get install -y chromium chromium-driver`` (``.ci/run`` does
it). Without it the test fails, saying so: a page nobody opens in a browser is not tested.
"""

from __future__ import annotations

import base64
import contextlib
import os
from typing import Any, Iterator

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from serve_support import MODEL_NAME, ServerProcess, image_part, sample_image, save_tiny_model

CHROMIUM = os.environ.get("MMBRIDGE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("MMBRIDGE_CHROMEDRIVER", "/usr/bin/chromedriver")
INSTALL = "sudo apt-get install -y chromium chromium-driver"
QUESTION, MAX_TOKENS = "What colour is the shape?", 12
WAIT_S = 60
RECORD_UPDATES = """
const answer = document.getElementById("answer");
window.answerUpdates = [];
new MutationObserver(() => window.answerUpdates.push(answer.textContent))
    .observe(answer, {childList: true, characterData: true, subtree: true});
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


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """Headless Debian chromium under its chromedriver; a missing one fails the test, saying how to install it."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not found: this test drives Debian's chromium. Install it with "
                    f"`{INSTALL}` (or point MMBRIDGE_CHROMIUM / MMBRIDGE_CHROMEDRIVER at a chromium and its "
                    f"chromedriver)", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1000,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


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
    """Choose ``image_path``, type the question, click Ask; the page's final state (done or error)."""
    driver.find_element(By.ID, "image").send_keys(image_path)
    question = driver.find_element(By.ID, "question")
    question.clear()
    question.send_keys(QUESTION)
    max_tokens = driver.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys(str(MAX_TOKENS))
    driver.find_element(By.ID, "ask").click()
    answer = driver.find_element(By.ID, "answer")
    WebDriverWait(driver, WAIT_S).until(lambda _: answer.get_attribute("data-state") in ("done", "error"))
    return answer.get_attribute("data-state")


def text_of(driver, element_id: str) -> str:
    return driver.execute_script(f"return document.getElementById({element_id!r}).textContent")


def test_page_streams_the_greedy_answer_and_shows_errors(server, tmp_path):
    with chromium() as browser:
        server.wait_ready()
        browser.get(f"{server.url}/")
        WebDriverWait(browser, WAIT_S).until(lambda driver: text_of(driver, "model") == MODEL_NAME)
        assert browser.find_element(By.ID, "temperature").get_attribute("value") == "0"  # greedy by default
        check_answer(server, browser, tmp_path)
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
    assert state == "done", text_of(browser, "error")
    assert text_of(browser, "answer") == expected
    assert not browser.find_element(By.ID, "error").is_displayed()
    updates = [text for text in browser.execute_script("return window.answerUpdates") if text]
    assert updates[-1] == expected and all(expected.startswith(text) for text in updates)  # appended, in order


def check_error(server: ServerProcess, browser: Any, tmp_path) -> None:
    """Send a text file as the image: the page shows the message of the server's 400 and no answer."""
    text_path = str(tmp_path / "notes.txt")
    with open(text_path, "w") as handle:
        handle.write("not an image")
    refusal = api_reply(server, data_url_of(text_path, "text/plain"))
    assert refusal.status_code == 400
    state = ask_in_page(browser, text_path)
    browser.save_screenshot(str(tmp_path / "error.png"))
    assert state == "error" and text_of(browser, "answer") == ""
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed() and error.text == refusal.json()["error"]["message"]
