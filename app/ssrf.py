"""Webhook targets that cannot be turned against the service's own network (SSRF).

A URL is acceptable if it is http(s), carries no credentials, and every address its host
resolves to is public. The check runs twice: when the URL is given (a 422 naming the field)
and before each delivery, which then connects to the address that was vetted, so a DNS answer
that changes in between (DNS rebinding) cannot send it elsewhere.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]


class UnsafeUrl(ValueError):
    """A URL the service will not call; the message says why, for the user."""


@dataclass(frozen=True)
class Target:
    """A vetted URL and the address to connect to."""

    url: str
    scheme: str
    host: str
    port: int
    address: str


def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (the system resolver)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def non_public_reason(ip: IPAddress) -> str | None:
    """Why `ip` is not a public unicast address, or None if it is one."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    checks = (
        ("unspecified", ip.is_unspecified),
        ("loopback", ip.is_loopback),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("reserved", ip.is_reserved),
        ("private", ip.is_private),
    )
    for name, matches in checks:
        if matches:
            return name
    # Shared (100.64/10), documentation and other special ranges are neither private nor global.
    return None if ip.is_global else "non-public"


def vet_url(url: str, *, allow_private: bool, resolver: Resolver = resolve) -> Target:
    """The target `url` names, if the service may call it; else UnsafeUrl."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeUrl(f"is not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UnsafeUrl("must be an http or https URL")
    if parts.username is not None or parts.password is not None:
        raise UnsafeUrl("must not contain a user name or password")
    host = parts.hostname
    if not host:
        raise UnsafeUrl("has no host")
    port = port or (443 if scheme == "https" else 80)
    literal = True
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        literal = False
        try:
            addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in resolver(host, port)]
        except (OSError, UnicodeError, ValueError):
            raise UnsafeUrl(f"the host {host!r} does not resolve") from None
    if not addresses:
        raise UnsafeUrl(f"the host {host!r} does not resolve")
    if not allow_private:
        # Every address, not just the first: the client could be handed any of them.
        for ip in addresses:
            if (reason := non_public_reason(ip)) is not None:
                where = f"the address {ip}" if literal else f"the host {host!r} resolves to {ip}"
                raise UnsafeUrl(f"{where} ({reason}); webhooks may only call public addresses")
    return Target(url=url, scheme=scheme, host=host, port=port, address=str(addresses[0]))
