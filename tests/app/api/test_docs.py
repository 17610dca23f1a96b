"""/docs and /redoc work on a machine without internet: every asset they load is served by
the app itself."""

import re
from urllib.parse import urlparse

import pytest


def referenced_urls(html: str) -> list[str]:
    """The src/href URLs of a page, and the URLs its inline script passes to Swagger UI."""
    return re.findall(r'(?:src|href)="([^"]+)"', html) + re.findall(r"url: '([^']+)'", html)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_local_assets_and_the_app_serves_them(client, page: str) -> None:
    answer = client.get(page)
    assert answer.status_code == 200
    urls = referenced_urls(answer.text)
    assert any(url.endswith(".js") for url in urls), urls
    for url in urls:
        parsed = urlparse(url)
        assert not parsed.scheme and not parsed.netloc, f"{page} loads {url} from elsewhere"
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 100, url
    assert "fonts.googleapis.com" not in answer.text
