"""Retake the README's chat-page screenshot (``docs/chat_page.png``) with a model that draws.

    python docs/chat_screenshot.py --model runs/nextgpt/final [--out docs/chat_page.png]

Starts ``mmbridge serve --model MODEL`` (which draws every run of signal tokens an answer holds with the model's
generator), opens the page in headless Debian chromium, asks for a picture, then asks a MiniWorld example question
about an image, and saves the page once both answers have ended. The test helpers (``tests/browser_support.py``,
``tests/serve_support.py``) drive the page and the server, as the browser tests do.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from browser_support import chromium, open_page, send, set_max_tokens, type_message  # noqa: E402
from serve_support import ServerProcess  # noqa: E402

MAX_PNG_BYTES = 150_000  # the README's screenshot stays small
WAIT_S = 300  # drawing on a CPU takes seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a saved model with an image output side")
    parser.add_argument("--out", default=os.path.join(HERE, "chat_page.png"))
    parser.add_argument("--name", default="nextgpt-miniworld", help="the served model name the page shows")
    parser.add_argument("--ask", default="What colour is the circle?")
    parser.add_argument("--draw", default="Draw a large red circle in the top left and a small blue square.")
    args = parser.parse_args()
    log = os.path.join(tempfile.mkdtemp(prefix="chat_screenshot."), "serve.log")
    server = ServerProcess(args.model, log, "--served-model-name", args.name)
    for _ in server.running():
        with chromium(window="1100,1300") as page:
            open_page(page, server.url, args.name)
            WebDriverWait(page, WAIT_S).until(lambda _: page.find_elements(By.CSS_SELECTOR, "#examples button"))
            set_max_tokens(page, 40)
            type_message(page, args.draw)
            if send(page) != "done":
                raise SystemExit(f"the first answer failed; server log: {log}")
            page.find_elements(By.CSS_SELECTOR, "#examples button")[0].click()  # an example image and question
            type_message(page, args.ask)
            if send(page) != "done":
                raise SystemExit(f"the second answer failed; server log: {log}")
            page.save_screenshot(args.out)
    size = os.path.getsize(args.out)
    print(f"wrote {args.out} ({size:,} bytes)")
    if size > MAX_PNG_BYTES:
        raise SystemExit(f"{args.out} is {size:,} bytes, over {MAX_PNG_BYTES:,}: use a smaller window")


if __name__ == "__main__":
    main()
