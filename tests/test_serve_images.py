"""Where a served request's images may come from: a server with ``--allow-remote-images`` and ``--image-root``.

A real server refuses loopback, private, link-local and metadata addresses and every path that leaves
its image root (``..``, absolute paths, symlinks), and reads images inside it; in-process tests cover the
address rules, image formats, and fetching from the checked address without following redirects.
"""

from __future__ import annotations

import asyncio
import http.server
import io
import ipaddress
import os
import threading

import httpx
import openai
import pytest
from PIL import Image

from mmbridge.model.multimodal import MultimodalModel
from mmbridge.serve import images
from mmbridge.serve.errors import APIError
from serve_support import (MODEL_NAME, ServerProcess, data_url, image_part, openai_client, sample_image,
                           save_tiny_model)

GREEDY = {"temperature": 0, "max_tokens": 6}


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> str:
    base = tmp_path_factory.mktemp("images")
    root, outside = base / "root", base / "outside"
    (root / "nested").mkdir(parents=True)
    outside.mkdir()
    sample_image("green", "square").save(root / "nested" / "inside.png")
    sample_image("green", "square").save(outside / "secret.png")
    (root / "notes.txt").write_text("not an image")
    os.symlink(outside / "secret.png", root / "escape.png")
    os.symlink(outside, root / "escape_dir")
    return str(root)


@pytest.fixture(scope="module")
def server(tokenizer_dir, image_root, tmp_path_factory):
    # wide LLM weights: greedy answers follow the pixels, so reading the wrong image changes the answer
    model_dir = save_tiny_model(tokenizer_dir, str(tmp_path_factory.mktemp("serve_images") / "model"),
                                initializer_range=0.2)
    process = ServerProcess(model_dir, str(tmp_path_factory.mktemp("serve_images_log") / "server.log"),
                            "--allow-remote-images", "--image-root", image_root, "--image-timeout-s", "2")
    yield from process.running()


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def ask_image(client, url: str):
    return client.chat.completions.create(model=MODEL_NAME, messages=[
        {"role": "user", "content": [image_part(url), {"type": "text", "text": "What is it?"}]}], **GREEDY)


def test_images_under_the_root_are_read(client, image_root):
    expected = ask_image(client, data_url(sample_image("green", "square"))).choices[0].message.content
    assert expected != ask_image(client, data_url(sample_image("red", "circle"))).choices[0].message.content
    inside = os.path.join(image_root, "nested", "inside.png")
    for url in ("nested/inside.png", "nested/../nested/inside.png", inside, f"file://{inside}"):
        assert ask_image(client, url).choices[0].message.content == expected, url


def refused(client, url: str) -> openai.APIStatusError:
    with pytest.raises(openai.BadRequestError) as caught:
        ask_image(client, url)
    assert caught.value.param == "messages[0].content[0].image_url", caught.value.body
    return caught.value


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/x.png", "http://169.254.169.254/latest/meta-data/", "http://[::1]/x.png",
    "http://10.0.0.7/x.png", "http://192.168.1.1/x.png", "http://localhost/x.png", "http://0.0.0.0/x.png",
    "http://[::ffff:127.0.0.1]/x.png", "https://100.100.100.200/x.png",
])
def test_private_and_metadata_addresses_are_never_fetched(client, server, url):
    assert refused(client, url).code == "image_url_forbidden"
    refused(client, url.replace("/x.png", f":{server.port}/health"))  # not even the server itself


@pytest.mark.parametrize("url", ["../outside/secret.png", "nested/../../outside/secret.png", "escape.png",
                                 "escape_dir/secret.png", "/etc/hostname", "file:///etc/hostname"])
def test_paths_leaving_the_image_root_are_refused(client, url):
    assert refused(client, url).code == "image_path_forbidden"


def test_broken_local_images_are_refused_and_the_server_keeps_serving(client, image_root):
    assert refused(client, "missing.png").code == "image_not_found"
    assert refused(client, "notes.txt").code == "invalid_image"
    assert refused(client, "ftp://example.com/x.png").code is None
    assert refused(client, "file://otherhost/x.png").code is None
    assert ask_image(client, "nested/inside.png").choices[0].finish_reason in ("stop", "length")


# -- in process -----------------------------------------------------------------------------------
@pytest.mark.parametrize("address, allowed", [
    ("93.184.215.14", True), ("2606:4700::6810:84e5", True), ("127.0.0.1", False), ("169.254.169.254", False),
    ("10.1.2.3", False), ("172.16.0.1", False), ("100.64.0.1", False), ("224.0.0.1", False), ("::1", False),
    ("fe80::1", False), ("fd00:ec2::254", False), ("::ffff:10.0.0.1", False), ("64:ff9b::a9fe:a9fe", False),
    ("2002:7f00:1::", False), ("0.0.0.0", False),
])
def test_address_rules(address, allowed):
    assert images.address_allowed(ipaddress.ip_address(address)) is allowed


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "WEBP", "GIF"])
def test_formats_decode(image_format):
    data = io.BytesIO()
    sample_image().save(data, format=image_format)
    decoded = images.decode_image(data.getvalue(), "p", max_pixels=10_000)
    assert decoded.size == (24, 24)


def test_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = io.BytesIO()
    frames[0].save(data, format="GIF", save_all=True, append_images=frames[1:])
    decoded = images.decode_image(data.getvalue(), "p", max_pixels=100)
    assert decoded.convert("RGB").getpixel((0, 0)) == (255, 0, 0)


def test_other_formats_and_data_urls_are_refused():
    data = io.BytesIO()
    sample_image().save(data, format="BMP")
    with pytest.raises(APIError, match="not a PNG"):
        images.decode_image(data.getvalue(), "p", max_pixels=10_000)
    for url, message in [("data:image/png,abc", "base64"), ("data:text/plain;base64,aGk=", "hold an image")]:
        with pytest.raises(APIError, match=message):
            images.decode_data_url(url, "p", max_bytes=100)
    with pytest.raises(APIError, match="max-image-bytes"):
        images.decode_data_url("data:image/png;base64," + "A" * 400, "p", max_bytes=100)


class _Handler(http.server.BaseHTTPRequestHandler):
    """/image.png: a PNG (and the Host header it was sent with); /redirect: a 302 to it; /big: too many bytes."""

    png = b""
    hosts: list[str] = []

    def do_GET(self) -> None:
        self.hosts.append(self.headers["Host"])
        body = {"/image.png": self.png, "/big": b"x" * 5000}.get(self.path, b"")
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/image.png")
        else:
            self.send_response(200 if body else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_remote_fetch_goes_to_the_checked_address_without_redirects(monkeypatch):
    buffer = io.BytesIO()
    sample_image().save(buffer, format="PNG")
    _Handler.png, _Handler.hosts = buffer.getvalue(), []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    # "images.test" stands for a public host: it resolves to 127.0.0.1, which the rules then allow
    async def resolve(host: str, port: int, param: str):
        assert host == "images.test"
        return ipaddress.ip_address("127.0.0.1")

    monkeypatch.setattr(images, "resolve_public", resolve)

    async def fetch(path: str, max_bytes: int = 4000) -> bytes:
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False) as client:
            return await images.fetch_remote(client, f"http://images.test:{port}{path}", "p", max_bytes)

    try:
        assert asyncio.run(fetch("/image.png")) == _Handler.png
        assert _Handler.hosts == [f"images.test:{port}"]  # connected to the address, named the host
        with pytest.raises(APIError, match="redirect"):
            asyncio.run(fetch("/redirect"))
        with pytest.raises(APIError, match="max-image-bytes"):
            asyncio.run(fetch("/big"))
        with pytest.raises(APIError, match="HTTP 404"):
            asyncio.run(fetch("/missing"))
    finally:
        httpd.shutdown()
