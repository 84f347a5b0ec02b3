"""Helpers for the server tests: a tiny saved model, a real ``python -m mmbridge serve`` process, the same app
served by uvicorn in a thread of the test process (where a test hands the engine its ``answer_images`` hook), images.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import torch
from PIL import Image
from transformers import AutoTokenizer

from mmbridge.model.multimodal import MultimodalModel
from mmbridge.serve.outputs import FinishedRow
from mmbridge.testing import shape_image, tiny_llm_config, tiny_model_config

MODEL_NAME = "tiny"
STARTUP_TIMEOUT_S = 180  # two busy cores: importing torch and transformers alone can take 10 s


def save_tiny_model(tokenizer_dir: str, directory: str, initializer_range: float | None = None) -> str:
    """A tiny random model (seeded) saved to ``directory``; returns the directory. ``initializer_range``: the LLM's
    (wide, e.g. 0.2, makes its greedy answers follow the pixels; the default 0.02 answers alike for any image)."""
    torch.manual_seed(0)
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir)) + 1  # + the <image> token
    wide = {} if initializer_range is None else {"initializer_range": initializer_range}
    llm = {"hf_config": tiny_llm_config(vocab, **wide)}
    MultimodalModel.from_config(tiny_model_config(tokenizer_dir, vocab, llm=llm)).eval().save_pretrained(directory)
    return directory


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """``python -m mmbridge serve`` on 127.0.0.1 with a free port; its output goes to ``log_path``."""

    def __init__(self, model_dir: str, log_path: str, *flags: str) -> None:
        self.port = free_port()
        self.log_path = log_path
        command = [sys.executable, "-m", "mmbridge", "serve", "--model", model_dir, "--port", str(self.port),
                   "--served-model-name", MODEL_NAME, *flags]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> None:
        """Poll ``/health`` until it answers; a server that exits or never answers fails with its log."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server did not answer /health within {STARTUP_TIMEOUT_S} s:\n{self.log()}")

    def health(self) -> dict:
        response = httpx.get(f"{self.url}/health", timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    def log(self) -> str:
        with open(self.log_path) as handle:
            return handle.read()[-4000:]

    def running(self) -> Iterator["ServerProcess"]:
        """Wait until the server answers, hand it out, and stop it afterwards (a fixture's ``yield from``)."""
        try:
            self.wait_ready()
            yield self
        finally:
            self.stop()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class ThreadServer:
    """An ASGI ``app`` (``create_app``'s, or a wrapper of it) served by uvicorn on 127.0.0.1, in a thread of this
    process: real HTTP, and the test holds the objects the app was built with (a hook it handed the engine)."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def running(self) -> Iterator["ThreadServer"]:
        """Start, wait until it serves, hand it out, and stop it afterwards (a fixture's ``yield from``)."""
        self.thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        try:
            while not self.server.started:
                if not self.thread.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"uvicorn did not start on port {self.port} (thread alive: "
                                       f"{self.thread.is_alive()})")
                time.sleep(0.05)
            yield self
        finally:
            self.server.should_exit = True
            self.thread.join(timeout=30)


def openai_client(server: ServerProcess):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def sample_image(colour: str = "red", shape: str = "circle", size: int = 24) -> Image.Image:
    return shape_image(colour, shape, size=size)


def data_url(image: Image.Image, image_format: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return f"data:image/{image_format.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width`` x ``height`` 1-bit pixels, with a few bytes of data (never decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


class ChosenImages:
    """An ``answer_images`` hook for the serving tests: records every finished row and answers it with ``images``
    (none by default), or raises ``error`` when one is set."""

    def __init__(self) -> None:
        self.images: list[Image.Image] = []
        self.rows: list[FinishedRow] = []
        self.error: Exception | None = None

    def __call__(self, row: FinishedRow) -> list[Image.Image]:
        self.rows.append(row)
        if self.error is not None:
            raise self.error
        return list(self.images)
