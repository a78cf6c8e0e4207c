"""Classifying the addresses the mesh listens on and dials, without resolving any name."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit


def is_loopback(host: str) -> bool:
    """Literal loopback addresses and ``localhost`` only: any other name could resolve
    anywhere, so it is not assumed local (and nothing is resolved)."""
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(h)
    except ValueError:
        return False
    # gRPC reports some sockets as IPv4-mapped IPv6 ("::ffff:127.0.0.1").
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return (mapped or ip).is_loopback


def host_of(target: str) -> str:
    """The host of ``host:port``, ``[v6]:port`` or a URL such as ``redis://host:port/0``;
    ``localhost`` for Unix sockets, which never leave the machine."""
    if target.startswith(("unix:", "unix-abstract:")):
        return "localhost"
    if "://" in target:
        return urlsplit(target).hostname or ""
    if target.startswith("["):
        return target[1:].split("]", 1)[0]
    return target.rpartition(":")[0] if ":" in target else target


def display_url(url: str) -> str:
    """A URL without its user/password part, safe to print."""
    parts = urlsplit(url)
    if not parts.password and not parts.username:
        return url
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
