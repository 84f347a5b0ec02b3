"""Helpers for the browser tests of the chat page at ``GET /``: Debian's chromium under selenium, and the page's moves.

The browser is the system one (no download): ``apt-get install -y chromium chromium-driver`` (``.ci/run`` does
it). Without it a test fails, saying so: a page nobody opens in a browser is not tested.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = os.environ.get("MMBRIDGE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("MMBRIDGE_CHROMEDRIVER", "/usr/bin/chromedriver")
INSTALL = "sudo apt-get install -y chromium chromium-driver"
WAIT_S = 60
ENDED = ("done", "error")


@contextlib.contextmanager
def chromium(window: str = "1000,900") -> Iterator[Any]:
    """Headless Debian chromium under its chromedriver; a missing one fails the test, saying how to install it."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not found: this test drives Debian's chromium. Install it with "
                    f"`{INSTALL}` (or point MMBRIDGE_CHROMIUM / MMBRIDGE_CHROMEDRIVER at a chromium and its "
                    f"chromedriver)", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={window}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def open_page(driver: Any, url: str, model_name: str) -> None:
    """Load the page and wait until it shows the served model's name."""
    driver.get(f"{url}/")
    WebDriverWait(driver, WAIT_S).until(lambda _: text_of(driver, "#model") == model_name)


def text_of(driver: Any, selector: str) -> str | None:
    """The ``textContent`` of the first element matching the CSS ``selector`` (``None`` if there is none)."""
    return driver.execute_script("const node = document.querySelector(arguments[0]);"
                                 "return node ? node.textContent : null", selector)


def type_message(driver: Any, text: str) -> None:
    question = driver.find_element(By.ID, "question")
    question.clear()
    question.send_keys(text)


def set_max_tokens(driver: Any, count: int) -> None:
    field = driver.find_element(By.ID, "max-tokens")
    field.clear()
    field.send_keys(str(count))


def assistant_messages(driver: Any) -> list[Any]:
    return driver.find_elements(By.CSS_SELECTOR, "#chat .message.assistant")


def send(driver: Any, wait: bool = True) -> str | None:
    """Click Send; with ``wait``, wait for the new answer to end and return its state (``done`` or ``error``)."""
    before = len(assistant_messages(driver))
    driver.find_element(By.ID, "send").click()
    if not wait:
        return None
    WebDriverWait(driver, WAIT_S).until(
        lambda _: len(assistant_messages(driver)) > before
        and assistant_messages(driver)[-1].get_attribute("data-state") in ENDED)
    return assistant_messages(driver)[-1].get_attribute("data-state")


def last_answer(driver: Any) -> str | None:
    """The text of the newest answer (``None`` when it failed: its text is replaced by the error)."""
    return text_of(driver, "#chat .message.assistant:last-child .text")


def last_error(driver: Any) -> Any:
    """The error element shown in the newest answer."""
    return driver.find_element(By.CSS_SELECTOR, "#chat .message.assistant:last-child .error")
