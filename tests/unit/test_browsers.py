"""Which Host and Origin a request may carry (proxy/browsers.py): the table a DNS-rebinding page or a
cross-site form must fall through."""

from __future__ import annotations

import pytest

from llamactl.proxy import browsers


@pytest.mark.parametrize("header, bound, allowed, ok", [
    ("127.0.0.1:8080", "127.0.0.1", (), True),
    ("localhost:8080", "127.0.0.1", (), True),
    ("[::1]:8080", "::1", (), True),
    ("10.0.0.5:8080", "0.0.0.0", (), True),  # an address cannot be rebound
    ("evil.example:8080", "127.0.0.1", (), False),  # a rebinding page sends its own name
    ("evil.example", "127.0.0.1", (), False),
    ("localhost.evil.example:8080", "127.0.0.1", (), False),
    ("gpu-box.lan:8080", "gpu-box.lan", (), True),  # the name the user bound to
    ("gpu-box.lan:8080", "0.0.0.0", ("gpu-box.lan",), True),
    ("GPU-BOX.lan.:8080", "0.0.0.0", ("gpu-box.lan",), True),
    ("other.lan:8080", "0.0.0.0", ("gpu-box.lan",), False),
    ("anything.example", "127.0.0.1", ("*",), True),
])
def test_host_allowed(header, bound, allowed, ok) -> None:
    assert browsers.host_allowed(header, bound, allowed) is ok


@pytest.mark.parametrize("origin, host, allowed, ok", [
    (None, "127.0.0.1:8080", (), True),  # curl, the openai client: no Origin
    ("http://127.0.0.1:8080", "127.0.0.1:8080", (), True),  # the status page itself
    ("http://localhost:8080", "localhost:8080", (), True),
    ("http://localhost:3000", "localhost:8080", (), False),  # another port: another origin
    ("http://evil.example", "127.0.0.1:8080", (), False),
    ("null", "127.0.0.1:8080", (), False),  # a sandboxed frame or a file: page
    ("file://", "127.0.0.1:8080", (), False),
    ("http://localhost:3000", "localhost:8080", ("http://localhost:3000",), True),
    ("http://localhost:3000", "localhost:8080", ("http://localhost:3000/",), True),
    ("https://app.example", "localhost:8080", ("*",), True),
])
def test_origin_allowed(origin, host, allowed, ok) -> None:
    assert browsers.origin_allowed(origin, host, allowed) is ok


@pytest.mark.parametrize("value, ok", [
    ("application/json", True), ("application/json; charset=utf-8", True), ("Application/JSON", True),
    ("application/vnd.api+json", True), ("text/plain", False), ("application/x-www-form-urlencoded", False),
    ("multipart/form-data; boundary=x", False), (None, False), ("", False),
])
def test_json_content_types(value, ok) -> None:
    assert browsers.is_json(value) is ok


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.5.5.5", True), ("::1", True),
                                            ("localhost", True), ("0.0.0.0", False), ("::", False),
                                            ("10.1.2.3", False), ("gpu-box", False)])
def test_loopback_binds(host, loopback) -> None:
    assert browsers.is_loopback(host) is loopback
