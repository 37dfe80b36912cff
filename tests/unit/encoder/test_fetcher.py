"""http(s) fetching against a local server: the SSRF guard, redirects, caps, timeouts."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from encoder_service import fetcher
from encoder_service.errors import InvalidMedia, MediaForbidden
from encoder_service.media import MediaResolver
from mmserve.wire.media import MediaRef

from .images import png_bytes
from .test_media import memory_handles

PNG = png_bytes(40, 30)


HOSTS_SEEN: list[str] = []  # Host headers, in arrival order


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        HOSTS_SEEN.append(self.headers.get("Host", ""))
        port = self.server.server_address[1]
        routes = {
            "/img.png": lambda: self.reply(200, PNG),
            "/redirect": lambda: self.redirect("/img.png"),
            "/loop": lambda: self.redirect("/loop"),
            "/to-localhost": lambda: self.redirect(f"http://localhost:{port}/img.png"),
            "/to-ipv6-loopback": lambda: self.redirect(f"http://[::1]:{port}/img.png"),
            "/to-file": lambda: self.redirect("file:///etc/passwd"),
            "/big": lambda: self.reply(200, b"x" * 5000),
            "/big-unsized": lambda: self.reply(200, b"x" * 5000, sized=False),
            "/slow": lambda: (time.sleep(1.0), self.reply(200, PNG)),
            "/drip": self.drip,
        }
        routes.get(self.path, lambda: self.reply(404, b"missing"))()

    def reply(self, status: int, body: bytes, sized: bool = True) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "image/png")
        if sized:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.close_connection = True  # the body ends when the connection does
        self.end_headers()
        # The client may give up first (timeouts, byte caps): that is the point.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)

    def drip(self) -> None:
        """A byte every 50 ms: never a read timeout, but slow as a whole."""
        self.send_response(200)
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for _ in range(40):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.05)

    def redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server_port():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def load(config, url: str):
    return MediaResolver(config, memory_handles()).load_image(MediaRef(url=url))


@pytest.fixture
def private(config):
    return dataclasses.replace(config, allow_private_networks=True)


async def test_loopback_is_refused_by_default(config, server_port):
    with pytest.raises(MediaForbidden, match="non-public address") as info:
        await load(config, f"http://127.0.0.1:{server_port}/img.png")
    assert "(127.0.0.1)" not in str(info.value)  # DNS answers stay in the log


async def test_a_name_resolving_to_loopback_is_refused(config, server_port):
    with pytest.raises(MediaForbidden, match="host 'localhost' resolves to a non-public address"):
        await load(config, f"http://localhost:{server_port}/img.png")


async def test_private_networks_can_be_allowed(private, server_port):
    image = await load(private, f"http://127.0.0.1:{server_port}/img.png")
    assert image.size == (40, 30)


async def test_the_connection_keeps_the_host_name(private, server_port):
    # The request goes to the checked address, but the server still sees the name.
    HOSTS_SEEN.clear()
    await load(private, f"http://localhost:{server_port}/img.png")
    assert [f"localhost:{server_port}"] == HOSTS_SEEN


async def test_redirects_are_followed(private, server_port):
    assert (await load(private, f"http://127.0.0.1:{server_port}/redirect")).size == (40, 30)


async def test_every_redirect_is_checked_by_the_address_guard(config, server_port, monkeypatch):
    # Pretend 127.0.0.1 is a public host: the redirect to ::1 must still be refused.
    real = fetcher.is_public_address
    monkeypatch.setattr(fetcher, "is_public_address",
                        lambda ip: str(ip) == "127.0.0.1" or real(ip))
    assert (await load(config, f"http://127.0.0.1:{server_port}/img.png")).size == (40, 30)
    with pytest.raises(MediaForbidden, match=r"'::1' resolves to a non-public address"):
        await load(config, f"http://127.0.0.1:{server_port}/to-ipv6-loopback")


async def test_redirects_are_checked_against_the_domain_allow_list(private, server_port):
    only_ip = dataclasses.replace(private, allowed_domains=("127.0.0.1",))
    with pytest.raises(MediaForbidden, match=r"host 'localhost' is not in the allowed domains"):
        await load(only_ip, f"http://127.0.0.1:{server_port}/to-localhost")


async def test_redirects_to_other_schemes_are_refused(private, server_port):
    with pytest.raises(MediaForbidden, match="redirect to a file: URL refused"):
        await load(private, f"http://127.0.0.1:{server_port}/to-file")


async def test_redirect_count_is_limited(private, server_port):
    with pytest.raises(InvalidMedia, match="more than 3 redirects"):
        await load(private, f"http://127.0.0.1:{server_port}/loop")


@pytest.mark.parametrize("path", ["/big", "/big-unsized"])
async def test_the_body_is_capped(private, server_port, path):
    capped = dataclasses.replace(private, max_media_bytes=1000)
    with pytest.raises(InvalidMedia, match="limit"):
        await load(capped, f"http://127.0.0.1:{server_port}{path}")


async def test_http_errors_and_read_timeouts(private, server_port):
    with pytest.raises(InvalidMedia, match="returned HTTP 404"):
        await load(private, f"http://127.0.0.1:{server_port}/nothing")
    impatient = dataclasses.replace(private, http_read_timeout_s=0.2)
    with pytest.raises(InvalidMedia, match="did not answer in time or refused") as slow:
        await load(impatient, f"http://127.0.0.1:{server_port}/slow")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    with pytest.raises(InvalidMedia) as refused:
        await load(impatient, f"http://127.0.0.1:{port}/slow")
    # An open port that stalls and a closed one read the same: no port scanning through us.
    assert str(refused.value).replace(str(port), "P") == \
        str(slow.value).replace(str(server_port), "P")


async def test_credentials_in_urls_are_not_echoed(config):
    with pytest.raises(InvalidMedia, match="credentials in URLs are not supported") as info:
        await load(config, "https://alice:s3cret@example.com/cat.png")
    assert "s3cret" not in str(info.value) and "alice" not in str(info.value)


async def test_slow_drip_downloads_hit_the_total_timeout(private, server_port):
    impatient = dataclasses.replace(private, http_read_timeout_s=1.0, http_total_timeout_s=0.3)
    with pytest.raises(InvalidMedia, match="took longer than 0.3s"):
        await load(impatient, f"http://127.0.0.1:{server_port}/drip")


async def test_fetching_can_be_disabled_and_domains_restricted(config, private):
    with pytest.raises(MediaForbidden, match="does not fetch http"):
        await load(dataclasses.replace(config, allow_http=False), "https://example.com/a.png")
    with pytest.raises(MediaForbidden, match="'evil.com' is not in the allowed domains"):
        await load(dataclasses.replace(config, allowed_domains=("example.com",)),
                   "https://evil.com/a.png")
    with pytest.raises(InvalidMedia, match="credentials in URLs"):
        await load(private, "http://user:pw@127.0.0.1/a.png")


@pytest.mark.parametrize("address,public", [
    ("93.184.216.34", True), ("2606:4700::1111", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False),
    ("240.0.0.1", False), ("255.255.255.255", False), ("::1", False), ("::", False),
    ("fe80::1", False), ("fd00:ec2::254", False), ("ff02::1", False),
    ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False), ("64:ff9b::7f00:1", False),
    ("2002:7f00:1::1", False), ("2002:5db8:d822::1", True),
])
def test_address_classification(address, public):
    assert fetcher.is_public_address(ipaddress.ip_address(address)) is public
