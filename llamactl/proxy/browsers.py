"""Browsers are untrusted clients: which Host and Origin a request may carry, and the page's headers.

A page the user opens can send requests to the proxy on loopback: a "simple" cross-site POST (CSRF) reaches
it without a preflight, and DNS rebinding makes a page's own name resolve to 127.0.0.1 so it may read the
answers. The defence, as Ollama and Jupyter have it: serve only requests whose `Host` names this proxy (an
IP address, `localhost`, the bound name, or a configured `allowed_hosts` name; a rebinding page can only
send its own domain), refuse an `Origin` that is neither this proxy nor in `allowed_origins`, and take
state-changing requests only as `application/json` (which a page cannot send cross-site without a
preflight the proxy does not grant). Pure functions; guard.py applies them.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

PAGE_HEADERS = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
}
CORS_ALLOW_HEADERS = "Authorization, Content-Type"
CORS_MAX_AGE_S = 600


def split_host(host: str) -> str:
    """The name or address of a Host header, without its port (`[::1]:8080` → `::1`), lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    """Whether a bind address only listens on this machine (`127.0.0.1`, `::1`, `localhost`)."""
    name = split_host(host)
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_allowed(header: str | None, bound: str, allowed: tuple[str, ...]) -> bool:
    """Whether a request's Host names this proxy. An IP address cannot be rebound (a rebinding page sends
    its own domain name), `localhost` is this machine, the bound name was chosen by the user; any other
    name only when listed in `allowed_hosts` (`"*"`: any)."""
    if not header:
        return True  # HTTP/1.0 without Host: no browser sends that
    name = split_host(header)
    if "*" in allowed or _is_ip(name) or name == "localhost":
        return True
    return name == split_host(bound) or name in {split_host(a) for a in allowed}


def origin_allowed(origin: str | None, host_header: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a request's Origin may use the proxy: none (not a browser's cross-origin request), the
    proxy's own page (same scheme-less host:port as the Host header, already checked), or a listed one."""
    if origin is None:
        return True
    if "*" in allowed or origin.rstrip("/") in {a.rstrip("/") for a in allowed}:
        return True
    if origin == "null" or not host_header:
        return False  # a sandboxed frame, a file: page, a redirect: never this proxy's page
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and (parts.netloc or "").lower() == host_header.strip().lower()


def cors_origin(origin: str | None, allowed: tuple[str, ...]) -> str | None:
    """The `Access-Control-Allow-Origin` value for a configured origin (none otherwise: no CORS headers)."""
    if origin is None or not allowed:
        return None
    if "*" in allowed:
        return "*"
    return origin if origin.rstrip("/") in {a.rstrip("/") for a in allowed} else None


def is_json(content_type: str | None) -> bool:
    """`application/json`, with parameters (`; charset=utf-8`) or a `+json` suffix."""
    if not content_type:
        return False
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))
