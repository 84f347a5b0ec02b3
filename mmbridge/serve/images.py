"""Images of a request: ``data:`` URLs, and — only where the server allows them — http(s) and local files.

* ``data:image/...;base64,...``: PNG, JPEG, WebP or GIF (its first frame).
* ``http(s)://`` only with ``allow_remote_images``: the host is resolved first and every address it resolves
  to must be public (not loopback, private, link-local — cloud metadata —, shared, reserved, multicast; IPv6
  forms that embed an IPv4 address are checked as that address); the request then goes to the checked
  address itself (Host header and TLS name kept), with no proxy and no redirects followed.
* ``file://`` URLs and bare paths only under ``image_root``: the path's realpath must stay inside the root's
  realpath, so neither ``..`` nor a symlink can leave it.

Every image's width × height is checked against ``max_image_pixels`` from its header, before any pixel is
decoded. Every refusal is an :class:`~mmbridge.serve.errors.APIError` naming the request field.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import os
import socket
from urllib.parse import unquote, urlsplit

import httpx
from PIL import Image, UnidentifiedImageError

from mmbridge.serve.conversation import ImageRef
from mmbridge.serve.errors import invalid
from mmbridge.serve.settings import ServeSettings

FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
NAT64 = ipaddress.ip_network("64:ff9b::/96")
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class ImageLoader:
    """Loads the images of requests under one server's settings (``client`` fetches remote images)."""

    def __init__(self, settings: ServeSettings, client: httpx.AsyncClient | None = None) -> None:
        self.settings = settings
        self.client = client

    async def load(self, ref: ImageRef) -> Image.Image:
        """The image ``ref`` points to, decoded (first frame); a refused or broken one is a 400."""
        scheme = urlsplit(ref.url).scheme.lower() if ":" in ref.url else ""
        if scheme == "data":
            data = decode_data_url(ref.url, ref.param, self.settings.max_image_bytes)
        elif scheme in ("http", "https"):
            data = await self._remote(ref)
        elif scheme in ("file", ""):
            data = await asyncio.to_thread(self._local, ref)
        else:
            raise invalid(ref.param, f"image URL scheme {scheme!r} is not supported; use a data: URL"
                          + (", http(s):// " if self.settings.allow_remote_images else "")
                          + (" or a path under the image root" if self.settings.image_root else ""))
        return await asyncio.to_thread(decode_image, data, ref.param, self.settings.max_image_pixels)

    async def _remote(self, ref: ImageRef) -> bytes:
        if not self.settings.allow_remote_images or self.client is None:
            raise invalid(ref.param, "remote image URLs are disabled on this server (start it with "
                                     "--allow-remote-images); send the image as a base64 data: URL",
                          code="remote_images_disabled")
        return await fetch_remote(self.client, ref.url, ref.param, self.settings.max_image_bytes)

    def _local(self, ref: ImageRef) -> bytes:
        if self.settings.image_root is None:
            raise invalid(ref.param, "local image paths are disabled on this server (start it with --image-root "
                                     "DIR); send the image as a base64 data: URL", code="local_images_disabled")
        path = resolve_under_root(ref.url, self.settings.image_root, ref.param)
        return read_limited(path, ref.param, self.settings.max_image_bytes)


# -- data URLs ------------------------------------------------------------------------------------
def decode_data_url(url: str, param: str, max_bytes: int) -> bytes:
    """The bytes of a ``data:image/...;base64,...`` URL."""
    header, comma, payload = url.partition(",")
    media = header[len("data:"):].split(";")
    if not comma or "base64" not in media[1:]:
        raise invalid(param, "a data: URL must be base64: data:image/png;base64,...")
    if not media[0].lower().startswith("image/"):
        raise invalid(param, f"a data: URL must hold an image (data:image/png;base64,...), got {media[0]!r}")
    payload = "".join(payload.split())  # line breaks are common in base64
    if len(payload) * 3 // 4 > max_bytes:
        raise invalid(param, f"the image holds about {len(payload) * 3 // 4} bytes; the limit is {max_bytes} "
                             f"(--max-image-bytes)", code="image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise invalid(param, f"the data: URL is not valid base64 ({error})", code="invalid_base64") from error


# -- decoding -------------------------------------------------------------------------------------
def decode_image(data: bytes, param: str, max_pixels: int) -> Image.Image:
    """Decode PNG/JPEG/WebP/GIF bytes (a GIF's first frame) after checking the size its header claims."""
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise invalid(param, f"the image is {width}x{height} = {width * height} pixels; the limit is "
                                     f"{max_pixels} (--max-image-pixels)", code="image_too_large")
            image.seek(0)
            image.load()
            return image.copy()
    except Image.DecompressionBombError as error:
        raise invalid(param, f"the image is too large to decode: {error}", code="image_too_large") from error
    except UnidentifiedImageError as error:
        raise invalid(param, "the image is not a PNG, JPEG, WebP or GIF", code="invalid_image") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise invalid(param, f"the image cannot be decoded: {error}", code="invalid_image") from error


# -- remote images --------------------------------------------------------------------------------
def address_allowed(address: Address) -> bool:
    """Whether the server may connect to ``address``: a global unicast address, also behind any embedding."""
    embedded = [getattr(address, "ipv4_mapped", None), getattr(address, "sixtofour", None)]
    teredo = getattr(address, "teredo", None)
    embedded += list(teredo) if teredo else []
    if isinstance(address, ipaddress.IPv6Address) and address in NAT64:
        embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    if any(inner is not None and not address_allowed(inner) for inner in embedded):
        return False
    return address.is_global and not address.is_multicast


async def resolve_public(host: str, port: int, param: str) -> Address:
    """Resolve ``host`` and return an address to connect to, after checking that every address is allowed."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        raise invalid(param, f"cannot resolve the image host {host!r}: {error}", code="image_fetch_failed") from error
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    refused = [address for address in addresses if not address_allowed(address)]
    if refused or not addresses:
        raise invalid(param, f"the image host {host!r} resolves to {refused[0] if refused else 'nothing'}, which is "
                             f"not a public address (loopback, private, link-local and metadata addresses are "
                             f"never fetched)", code="image_url_forbidden")
    return addresses[0]


async def fetch_remote(client: httpx.AsyncClient, url: str, param: str, max_bytes: int) -> bytes:
    """GET ``url`` from a checked public address, without redirects, at most ``max_bytes``."""
    try:
        target = httpx.URL(url)
    except httpx.InvalidURL as error:
        raise invalid(param, f"the image URL is malformed: {error}") from error
    if not target.host:
        raise invalid(param, "the image URL has no host")
    port = target.port or (443 if target.scheme == "https" else 80)
    address = await resolve_public(target.host, port, param)
    pinned = target.copy_with(host=str(address))
    host_header = target.host if target.port is None else f"{target.host}:{target.port}"
    try:
        async with client.stream("GET", pinned, headers={"Host": host_header},
                                 extensions={"sni_hostname": target.host}) as response:
            _check_response(response, param, max_bytes)
            return await _read_capped(response, param, max_bytes)
    except httpx.HTTPError as error:
        raise invalid(param, f"fetching the image failed: {type(error).__name__}: {error}",
                      code="image_fetch_failed") from error


def _check_response(response: httpx.Response, param: str, max_bytes: int) -> None:
    if response.is_redirect:
        raise invalid(param, f"the image URL answered with a redirect (HTTP {response.status_code}); redirects are "
                             f"not followed", code="image_fetch_failed")
    if response.status_code != 200:
        raise invalid(param, f"fetching the image gave HTTP {response.status_code}", code="image_fetch_failed")
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise invalid(param, f"the image has {length} bytes; the limit is {max_bytes} (--max-image-bytes)",
                      code="image_too_large")


async def _read_capped(response: httpx.Response, param: str, max_bytes: int) -> bytes:
    chunks, total = [], 0
    async for chunk in response.aiter_bytes():
        total += len(chunk)
        if total > max_bytes:
            raise invalid(param, f"the image has more than {max_bytes} bytes (--max-image-bytes)",
                          code="image_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


# -- local files ----------------------------------------------------------------------------------
def resolve_under_root(url: str, root: str, param: str) -> str:
    """The real path of a ``file://`` URL or bare path (relative to ``root``), which must lie inside ``root``."""
    if url.lower().startswith("file:"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise invalid(param, f"file URLs must name a local path, not host {parts.netloc!r}")
        path = unquote(parts.path)
    else:
        path = url
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, path))
    if os.path.commonpath([real, real_root]) != real_root:
        raise invalid(param, "the image path resolves outside the server's image root (--image-root)",
                      code="image_path_forbidden")
    if not os.path.isfile(real):
        raise invalid(param, "no image file at that path under the image root", code="image_not_found")
    return real


def read_limited(path: str, param: str, max_bytes: int) -> bytes:
    """The bytes of ``path`` (no symlink followed), refused beyond ``max_bytes``."""
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(descriptor, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as error:
        raise invalid(param, f"cannot read the image file: {error.strerror}", code="image_not_found") from error
    if len(data) > max_bytes:
        raise invalid(param, f"the image file has more than {max_bytes} bytes (--max-image-bytes)",
                      code="image_too_large")
    return data
