"""The SSRF check on webhook URLs, with a stand-in resolver (no DNS needed)."""

from __future__ import annotations

import ipaddress

import pytest

from app.ssrf import UnsafeUrl, non_public_reason, vet_url


def resolver_to(*addresses: str):  # type: ignore[no-untyped-def]
    def resolve(host: str, port: int) -> list[str]:
        return list(addresses)

    return resolve


def failing_resolver(host: str, port: int) -> list[str]:
    raise OSError("Name or service not known")


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("fc00::1", "private"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("100.64.0.1", "non-public"),  # shared address space (CGNAT)
        ("93.184.215.14", None),
        ("2606:4700::1111", None),
    ],
)
def test_non_public_reason(address, reason):
    assert non_public_reason(ipaddress.ip_address(address)) == reason


def test_a_public_host_is_vetted_with_the_address_to_connect_to():
    target = vet_url(
        "https://hooks.example.com:8443/in?x=1",
        allow_private=False,
        resolver=resolver_to("93.184.215.14"),
    )
    assert (target.scheme, target.host, target.port, target.address) == (
        "https",
        "hooks.example.com",
        8443,
        "93.184.215.14",
    )
    assert (
        vet_url("http://example.com", allow_private=False, resolver=resolver_to("1.1.1.1")).port
        == 80
    )


def test_one_private_answer_among_public_ones_is_refused():
    # A rebinding server answers with both; the client could be handed either.
    with pytest.raises(UnsafeUrl, match=r"10\.0\.0\.7 \(private\)"):
        vet_url(
            "https://evil.example/",
            allow_private=False,
            resolver=resolver_to("1.1.1.1", "10.0.0.7"),
        )


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("ftp://example.com/x", "http or https"),
        ("file:///etc/passwd", "http or https"),
        ("http://user:pw@example.com/", "user name or password"),
        ("http:///nohost", "no host"),
        ("http://127.0.0.1:8080/", "loopback"),
        ("http://[::1]/", "loopback"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://example.com:99999/", "not a valid URL"),
    ],
)
def test_refused_urls_say_why(url, words):
    with pytest.raises(UnsafeUrl, match=words):
        vet_url(url, allow_private=False, resolver=resolver_to("1.1.1.1"))


def test_a_host_that_does_not_resolve_is_refused():
    with pytest.raises(UnsafeUrl, match="does not resolve"):
        vet_url("https://nowhere.invalid/", allow_private=False, resolver=failing_resolver)


def test_allow_private_admits_loopback_but_still_only_http():
    target = vet_url(
        "http://localhost:9000/hook", allow_private=True, resolver=resolver_to("127.0.0.1")
    )
    assert target.address == "127.0.0.1"
    with pytest.raises(UnsafeUrl, match="http or https"):
        vet_url("gopher://localhost/", allow_private=True, resolver=resolver_to("127.0.0.1"))
