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


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        # 6to4 (2002::/16) of 127.0.0.1, 169.254.169.254 and 10.0.0.1
        ("2002:7f00:1::", "6to4 of 127.0.0.1, loopback"),
        ("2002:a9fe:a9fe::", "6to4 of 169.254.169.254, link-local"),
        ("2002:a00:1::1", "6to4 of 10.0.0.1, private"),
        ("fec0::1", "site-local"),
        ("feff:ffff::1", "site-local"),
        # NAT64: the well-known prefix translates to the embedded address; local-use never
        ("64:ff9b::7f00:1", "NAT64 of 127.0.0.1, loopback"),
        ("64:ff9b::a9fe:a9fe", "NAT64 of 169.254.169.254, link-local"),
        ("64:ff9b:1::5db8:d70e", "NAT64 local-use prefix"),
        ("64:ff9b:1:7f00:1::", "NAT64 local-use prefix"),
        ("::ffff:169.254.169.254", "link-local"),  # IPv4-mapped
        ("::ffff:0:7f00:1", "IPv4-translated of 127.0.0.1, loopback"),  # SIIT
        ("::127.0.0.1", "IPv4-compatible of 127.0.0.1, loopback"),
        ("::a9fe:a9fe", "IPv4-compatible of 169.254.169.254, link-local"),
        # Teredo: server 65.54.227.120, client 127.0.0.1 (stored inverted: 80ff:fefe)
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "Teredo client of 127.0.0.1, loopback"),
        ("2001:0:7f00:1::", "Teredo server of 127.0.0.1, loopback"),
        ("2001:db8::5efe:7f00:1", "ISATAP of 127.0.0.1, loopback"),
        ("2606:4700::200:5efe:a9fe:a9fe", "ISATAP of 169.254.169.254, link-local"),
        # Forms of public addresses: translations are the address itself; tunnels of a public
        # endpoint are judged by the IPv6 address (6to4 is global, Teredo is not).
        ("64:ff9b::5db8:d70e", None),
        ("::ffff:93.184.215.14", None),
        ("2002:5db8:d70e::1", None),
        ("2001:0:4136:e378:8000:63bf:a247:28f1", "private"),
        ("::93.184.215.14", "reserved"),
    ],
)
def test_ipv6_transition_forms_are_judged_by_the_ipv4_address_they_reach(address, reason):
    assert non_public_reason(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize(
    "url",
    ["http://[2002:7f00:1::]/", "http://[2002:a9fe:a9fe::]/", "http://[fec0::1]/"],
)
def test_the_reported_ipv6_urls_are_refused(url):
    with pytest.raises(UnsafeUrl, match="webhooks may only call public addresses"):
        vet_url(url, allow_private=False, resolver=resolver_to("1.1.1.1"))


def test_a_host_resolving_to_a_6to4_loopback_is_refused():
    with pytest.raises(UnsafeUrl, match=r"resolves to 2002:7f00:1:: \(6to4 of 127\.0\.0\.1"):
        vet_url(
            "https://rebind.example/", allow_private=False, resolver=resolver_to("2002:7f00:1::")
        )


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
