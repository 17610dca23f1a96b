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


# IPv6 forms that stand for an IPv4 address (a translator sends the packet to it), and forms
# that carry one as a tunnel's endpoint. Either way that IPv4 address is where packets go.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052 well-known prefix
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215: local use, any embedding
_IPV4_TRANSLATED = ipaddress.IPv6Network("::ffff:0:0:0/96")  # SIIT, RFC 2765
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated, RFC 4291
_ISATAP_IID = 0x00005EFE  # interface id 0:5efe:a.b.c.d (or 200:5efe:...), RFC 5214


def _low_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)


def translated_ipv4(ip: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv6 address is a translation of (IPv4-mapped, SIIT, NAT64), and
    the form's name; None for other addresses."""
    if ip.ipv4_mapped is not None:
        return "IPv4-mapped", ip.ipv4_mapped
    if ip in _IPV4_TRANSLATED:
        return "IPv4-translated", _low_ipv4(ip)
    if ip in _NAT64:
        return "NAT64", _low_ipv4(ip)
    return None


def tunnelled_ipv4(ip: ipaddress.IPv6Address) -> list[tuple[str, ipaddress.IPv4Address]]:
    """The IPv4 addresses a tunnelling form carries (6to4, Teredo, ISATAP, IPv4-compatible)."""
    found = []
    if ip.sixtofour is not None:
        found.append(("6to4", ip.sixtofour))
    if ip.teredo is not None:
        server, client = ip.teredo
        found += [("Teredo server", server), ("Teredo client", client)]
    if (int(ip) >> 32) & 0xFDFFFFFF == _ISATAP_IID:
        found.append(("ISATAP", _low_ipv4(ip)))
    if ip in _IPV4_COMPATIBLE and int(ip) > 1:  # :: and ::1 are themselves
        found.append(("IPv4-compatible", _low_ipv4(ip)))
    return found


def non_public_reason(ip: IPAddress) -> str | None:
    """Why `ip` is not a public unicast address, or None if it is one. An IPv6 address that
    stands for or tunnels to an IPv4 address is judged by that address too."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64_LOCAL:
            return "NAT64 local-use prefix"
        if (translated := translated_ipv4(ip)) is not None:
            form, inner = translated
            reason = _own_reason(inner)
            if reason is None or form == "IPv4-mapped":  # ::ffff:127.0.0.1 is 127.0.0.1
                return reason
            return f"{form} of {inner}, {reason}"
        for form, inner in tunnelled_ipv4(ip):
            if (reason := _own_reason(inner)) is not None:
                return f"{form} of {inner}, {reason}"
        if ip.is_site_local:  # fec0::/10: deprecated, but still routed inside some sites
            return "site-local"
    return _own_reason(ip)


def _own_reason(ip: IPAddress) -> str | None:
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
