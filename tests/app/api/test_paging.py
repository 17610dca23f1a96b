"""Every list endpoint pages the same way (app.api.common Paging.page): a token this service
did not hand out is a 422 naming page_token, whatever the repository behind it."""

from __future__ import annotations

import pytest

from app.db.repositories import encode_page_token

LISTS = [
    "/v1/models",
    "/v1/datasets",
    "/v1/unlearning-jobs",
    "/v1/audit",
    "/v1/webhook-endpoints",
    "/v1/deletion-requests",
]
# Not base64 JSON; JSON of the wrong shape; the right shape with values that do not parse.
BAD_TOKENS = ["garbage!", encode_page_token([]), encode_page_token(["not a date", "x"])]


@pytest.mark.parametrize("path", LISTS)
@pytest.mark.parametrize("token", BAD_TOKENS)
def test_a_token_this_service_did_not_hand_out_is_refused_by_name(client, caller, path, token):
    answer = client.get(path, params={"page_token": token}, headers=caller.headers)
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["fields"] == [
        {"field": "page_token", "problem": "not a token this service handed out"}
    ]
    assert error["message"] == "page_token: not a token this service handed out"


@pytest.mark.parametrize("path", LISTS)
def test_the_next_page_token_of_a_page_is_accepted(client, caller, path):
    first = client.get(path, params={"page_size": 1}, headers=caller.headers)
    assert first.status_code == 200, first.text
    token = first.json()["next_page_token"] or encode_page_token(
        ["9" * 12] if path == "/v1/audit" else ["2000-01-01T00:00:00+00:00", "0" * 32]
    )
    again = client.get(path, params={"page_token": token}, headers=caller.headers)
    assert again.status_code == 200, again.text
