"""The dashboard over plain HTTP: signing in, filters, tenancy, the auditor's read-only view,
CSRF, escaping, and what a finished job's page must show given its result."""

from __future__ import annotations

import html
import re
from urllib.parse import parse_qs, urlsplit

from fastapi.testclient import TestClient

from app.dashboard.session import COOKIE
from tests.app.conftest import Registered
from tests.app.dashboard.conftest import sign_in, submit
from tests.app.jobs_driver import MET_TARGET, drive_to_success, three_outcomes

JOBS = "/dashboard/jobs"


def rows(page: str) -> list[str]:
    """The job ids of the list's rows, in order."""
    return re.findall(r'<tr data-job-id="([0-9a-f-]+)"', page)


def csrf_token(page: str) -> str:
    match = re.search(r'name="csrf_token" value="([0-9a-f]+)"', page)
    assert match, "no CSRF token in the page"
    return match.group(1)


def fmt(value: float, spec: str = ".2f") -> str:
    return format(value, spec).replace("-", "−")


# ---- signing in ------------------------------------------------------------------------------


def test_pages_redirect_to_sign_in_without_a_valid_key(client: TestClient, registered):
    job_id = submit(client, registered)
    for path in (JOBS, f"{JOBS}/{job_id}", "/dashboard", f"{JOBS}?state=QUEUED"):
        response = client.get(path, follow_redirects=True)
        assert response.status_code == 200
        assert urlsplit(str(response.url)).path == "/dashboard/sign-in"
        assert 'name="api_key"' in response.text
    first = client.get(f"{JOBS}?state=QUEUED", follow_redirects=False)
    assert first.status_code == 303
    assert parse_qs(urlsplit(first.headers["location"]).query)["next"] == [f"{JOBS}?state=QUEUED"]
    client.cookies.set(COOKIE, "nmk_not-a-real-key", path="/dashboard")
    assert client.get(JOBS, follow_redirects=False).status_code == 303
    # The pages' script gets a 401, not an HTML redirect.
    assert client.get(f"/dashboard/jobs.json?id={job_id}").status_code == 401
    assert client.get(f"{JOBS}/{job_id}/report.json").status_code == 401


def test_a_bad_key_is_refused_and_no_cookie_is_set(client: TestClient, caller):
    response = client.post("/dashboard/sign-in", data={"api_key": caller.key + "x"})
    assert response.status_code == 401
    assert "Unknown or revoked API key" in response.text
    assert "set-cookie" not in response.headers
    assert client.post("/dashboard/sign-in", data={"api_key": ""}).status_code == 401


def test_a_key_without_jobs_read_or_audit_read_is_refused(client: TestClient, make_caller):
    models_only = make_caller("acme", ("models:read",))
    response = client.post("/dashboard/sign-in", data={"api_key": models_only.key})
    assert response.status_code == 403
    assert "jobs:read or audit:read" in response.text
    assert "set-cookie" not in response.headers


def test_sign_in_keeps_the_key_in_a_strict_http_only_cookie(client: TestClient, caller):
    response = client.post(
        "/dashboard/sign-in",
        data={"api_key": caller.key, "next": f"{JOBS}?state=FAILED"},
        follow_redirects=False,
    )
    assert response.status_code == 303
    assert response.headers["location"] == f"{JOBS}?state=FAILED"
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}={caller.key};")
    for attribute in ("HttpOnly", "Path=/dashboard", "SameSite=strict", "Max-Age="):
        assert attribute.lower() in cookie.lower()
    assert "secure" not in cookie.lower()  # plain http here
    page = client.get(JOBS)
    assert page.status_code == 200 and "Deletion jobs" in page.text


def test_the_cookie_is_secure_over_https_and_next_never_leaves_the_dashboard(app, db, caller):
    with TestClient(app, base_url="https://testserver") as secure:
        for next_url in ("https://evil.example/", "//evil.example/x", "/v1/audit", "/dashboard\\x"):
            response = secure.post(
                "/dashboard/sign-in",
                data={"api_key": caller.key, "next": next_url},
                follow_redirects=False,
            )
            assert response.status_code == 303
            assert response.headers["location"] == JOBS
            assert "secure" in response.headers["set-cookie"].lower()


def test_sign_out_needs_the_csrf_token_and_clears_the_cookie(client: TestClient, caller):
    sign_in(client, caller.key)
    token = csrf_token(client.get(JOBS).text)
    assert client.post("/dashboard/sign-out", data={}).status_code == 403
    assert client.post("/dashboard/sign-out", data={"csrf_token": "0" * 64}).status_code == 403
    other_site = client.post(
        "/dashboard/sign-out",
        data={"csrf_token": token},
        headers={"Origin": "https://evil.example"},
    )
    assert other_site.status_code == 403
    assert client.get(JOBS, follow_redirects=False).status_code == 200  # still signed in

    response = client.post(
        "/dashboard/sign-out",
        data={"csrf_token": token},
        headers={"Origin": "http://testserver"},
        follow_redirects=False,
    )
    assert response.status_code == 303
    assert response.headers["location"] == "/dashboard/sign-in"
    assert f'{COOKIE}=""' in response.headers["set-cookie"]
    assert client.get(JOBS, follow_redirects=False).status_code == 303


def test_sign_in_from_another_site_is_refused(client: TestClient, caller):
    response = client.post(
        "/dashboard/sign-in",
        data={"api_key": caller.key},
        headers={"Origin": "https://evil.example"},
    )
    assert response.status_code == 403
    assert "set-cookie" not in response.headers


# ---- the job list ----------------------------------------------------------------------------


def test_filters_map_onto_the_job_list(client: TestClient, registered: Registered, register):
    caller = registered.caller
    first = submit(client, registered, subject_reference="DSR-A")
    second = submit(client, registered, subject_reference="DSR-B")
    third = submit(client, registered, subject_reference="DSR-A")
    cancelled = client.post(f"/v1/unlearning-jobs/{second}:cancel", headers=caller.headers)
    assert cancelled.json()["state"] == "CANCELLED"
    created = {
        j["id"]: j["created_at"]
        for j in client.get("/v1/unlearning-jobs", headers=caller.headers).json()["items"]
    }
    sign_in(client, caller.key)

    assert rows(client.get(JOBS).text) == [third, second, first]  # newest first
    assert rows(client.get(JOBS, params={"state": "CANCELLED"}).text) == [second]
    both = client.get(JOBS, params=[("state", "CANCELLED"), ("state", "QUEUED")]).text
    assert rows(both) == [third, second, first]
    assert rows(client.get(JOBS, params={"subject": "DSR-A"}).text) == [third, first]
    assert rows(client.get(JOBS, params={"model": registered.model_id}).text) == [
        third,
        second,
        first,
    ]
    after = client.get(JOBS, params={"created_after": created[second]}).text
    assert rows(after) == [third, second]
    before = client.get(JOBS, params={"created_before": created[second]}).text
    assert rows(before) == [first]
    # What the form was sent with is shown again.
    page = client.get(JOBS, params={"state": "CANCELLED", "subject": "DSR-A"}).text
    assert 'value="CANCELLED" checked' in page and 'value="DSR-A"' in page
    assert rows(page) == []
    assert "No jobs match these filters." in page


def test_the_list_shows_state_stage_progress_subject_and_time(client, registered, caller):
    job_id = submit(client, registered, subject_reference="DSR-77")
    job = client.get(f"/v1/unlearning-jobs/{job_id}", headers=caller.headers).json()
    sign_in(client, caller.key)
    page = client.get(JOBS).text
    row = page[page.index(f'data-job-id="{job_id}"') :].split("</tr>", 1)[0]
    assert 'class="badge state-queued"' in row and ">QUEUED<" in row
    assert f'<progress max="100" value="{job["progress"]["percent"]}"' in row
    assert "DSR-77" in row
    assert job["created_at"][:10] in row
    assert f'href="/dashboard/jobs/{job_id}"' in row


def test_bad_filter_values_are_named_not_a_422(client: TestClient, caller):
    sign_in(client, caller.key)
    response = client.get(
        JOBS,
        params={
            "state": "NOPE",
            "model": "not-a-uuid",
            "created_after": "yesterday",
            "page_token": "garbage",
        },
    )
    assert response.status_code == 200
    for problem in ("not a job state", "not a model id", "not a date and time", "no longer valid"):
        assert problem in response.text


def test_pages_follow_with_the_filters_kept(client, registered, caller, settings, monkeypatch):
    monkeypatch.setattr(settings, "page_size_default", 2)
    ids = [submit(client, registered, subject_reference="DSR-P") for _ in range(3)]
    submit(client, registered, subject_reference="other")
    sign_in(client, caller.key)
    first = client.get(JOBS, params={"subject": "DSR-P"}).text
    assert rows(first) == ids[::-1][:2]
    next_url = html.unescape(re.search(r'href="([^"]+)" rel="next"', first).group(1))
    assert parse_qs(urlsplit(next_url).query)["subject"] == ["DSR-P"]
    second = client.get(next_url).text
    assert rows(second) == ids[:1]
    assert 'rel="next"' not in second


def test_live_status_json_gives_the_callers_jobs_only(
    client, registered, caller, register, make_caller
):
    job_id = submit(client, registered)
    other = register(make_caller("globex", ("admin",)))
    foreign = submit(client, other)
    sign_in(client, caller.key)
    response = client.get(
        "/dashboard/jobs.json", params=[("id", job_id), ("id", foreign), ("id", "junk")]
    )
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    api = client.get(f"/v1/unlearning-jobs/{job_id}", headers=caller.headers).json()
    (status,) = response.json()["jobs"]
    assert status["id"] == job_id
    assert status["state"] == api["state"]
    assert status["percent"] == api["progress"]["percent"]
    assert status["terminal"] is False


# ---- a job's page ----------------------------------------------------------------------------


def test_a_finished_jobs_page_shows_its_evidence(client, registered, caller, finished_job):
    ratio = 0.9
    job_id, result = finished_job(
        search={"rule": "retain-threshold", "strategy": "grid", "retain_ratio": ratio},
        legal_basis="GDPR Art. 17(1)(b)",
        target=MET_TARGET,
    )
    job = client.get(f"/v1/unlearning-jobs/{job_id}", headers=caller.headers).json()
    assert job["state"] == "SUCCEEDED"
    base = client.get(f"/v1/models/{registered.model_id}/versions/1", headers=caller.headers)
    sign_in(client, caller.key)
    page = client.get(f"{JOBS}/{job_id}").text
    # Finished: no current stage, on the page and in the list.
    assert '<dd data-field="stage">—</dd>' in page
    listed = client.get(JOBS).text
    row = listed[listed.index(f'<tr data-job-id="{job_id}"') :].split("</tr>", 1)[0]
    assert 'data-field="stage">—</td>' in row

    # The curve: an accessible SVG with one point per evaluation and series, the threshold
    # at ratio x retain accuracy at lambda = 0, and the chosen lambda marked.
    curve = result["lambda_curve"]
    svg = page[page.index("<svg") : page.index("</svg>")]
    assert 'role="img"' in svg and '<title id="curve-title">' in svg
    for series, key in (("forget", "forget_acc"), ("retain", "retain_acc")):
        group = svg[svg.index(f'data-series="{series}"') :].split("</g>", 1)[0]
        assert group.count('class="point"') == len(curve)
        for point in curve:
            assert f'data-lambda="{point["lambda"]}" data-value="{point[key]}"' in group
    reference = next(p for p in curve if p["lambda"] == 0)
    assert f'data-threshold="{ratio * reference["retain_acc"]}"' in svg
    assert f'data-chosen-lambda="{result["lambda"]}"' in svg
    assert svg.count('class="chosen-point"') == 2  # on the forget and the retain line

    # The metrics, before and after, with the change.
    for key, before in result["metrics"]["before"].items():
        after = result["metrics"]["after"][key]
        row = page[page.index(f'data-metric="{key}"') :].split("</tr>", 1)[0]
        assert f"<td>{fmt(before)}</td>" in row
        assert f"<td>{fmt(after)}</td>" in row
        assert f">{fmt(after - before, '+.2f')}</td>" in row

    # The facts a compliance team files.
    assert job["forget"]["manifest_sha256"] in page
    assert base.json()["weights_sha256"] in page
    assert result["model"]["weights_sha256"] in page
    assert f'data-fact="lambda">{result["lambda"]:.4f}<' in page
    assert f'data-fact="kept-fraction">{result["kept_fraction"] * 100:.2f}%<' in page
    assert "GDPR Art. 17(1)(b)" in page and "DSR-1" in page
    assert str(caller.key_id) in page
    assert f'href="/dashboard/jobs/{job_id}/report.json"' in page

    # The audit trail: every entry of the chain from the job's first to its end, without a
    # gap (the model version the job added is a "model" entry, and is shown too).
    ours = client.get(
        "/v1/audit",
        params={"resource_type": "unlearning_job", "resource_id": job_id, "page_size": 200},
        headers=caller.headers,
    ).json()["items"]
    chain = client.get("/v1/audit", params={"page_size": 200}, headers=caller.headers).json()
    by_seq = {e["seq"]: e for e in chain["items"]}
    first, last = min(e["seq"] for e in ours), max(e["seq"] for e in ours)
    shown = [int(s) for s in re.findall(r'data-audit-seq="(\d+)"', page)]
    assert shown == list(range(first, last + 1))
    assert {"job.created", "job.state_changed", "job.stage_changed"} <= {e["action"] for e in ours}
    added = next(s for s in shown if by_seq[s]["action"] == "model.version_added")
    row = page[page.index(f'data-audit-seq="{added}"') :].split("</tr>", 1)[0]
    assert 'data-about-job="yes"' in row and "model.version_added" in row
    # The chain's head at the end: the job's terminal entry, cited by the page and report.
    assert by_seq[last]["action"] == "job.state_changed"
    assert f"#{last} {by_seq[last]['hash']}" in page

    # Who asked, what was forgotten, the verdict: at the top of the page.
    summary = page[page.index("data-summary") :].split("</p>", 1)[0]
    assert "Forgot" in summary and "2 samples" in summary and "“shapes”" in summary
    assert "API key “test”" in summary and "verdict: target met" in summary
    assert 'data-fact="sample-count">2<' in page and "Samples forgotten" in page
    assert "of tenant “acme”" in page


def test_a_missed_target_is_amber_with_its_reasons_and_a_met_one_green(
    app, client, registered, caller
):  # type: ignore[no-untyped-def]
    met, missed, unchanged = three_outcomes(app, client, registered)
    sign_in(client, caller.key)
    listing = client.get(JOBS).text

    def badge(page: str, job_id: str) -> str:
        row = page[page.index(f'data-job-id="{job_id}"') :]
        return re.search(r'<span class="badge ([^"]+)"[^>]*>([^<]+)<', row).groups()

    assert badge(listing, met) == ("state-succeeded", "SUCCEEDED · target met")
    assert badge(listing, missed) == ("state-not-met", "SUCCEEDED · target not met")
    assert badge(listing, unchanged) == ("state-not-met", "SUCCEEDED · target not met")

    page = client.get(f"{JOBS}/{missed}").text
    assert badge(page, missed)[0] == "state-not-met"
    panel = page[page.index('data-verdict="not_met"') :].split("</section>", 1)[0]
    assert "Target not met" in panel and "do not treat this deletion as done" in panel
    assert html.escape("forget accuracy 25.00 (must be <= 0)") in panel
    assert 'data-check="forget_acc_max:forget_test_acc" class="missed"' in panel
    assert "<code>forget_acc_max 0.0</code>" in panel

    page = client.get(f"{JOBS}/{unchanged}").text
    panel = page[page.index('data-verdict="not_met"') :].split("</section>", 1)[0]
    assert "No new model version was made" in panel and "nothing was forgotten" in panel

    page = client.get(f"{JOBS}/{met}").text
    assert 'data-verdict="met"' in page and "Target met" in page


def test_the_chart_and_the_table_name_their_splits_and_agree(app, client, registered, caller):  # type: ignore[no-untyped-def]
    job_id = submit(client, registered, target=MET_TARGET)
    result = drive_to_success(app, job_id)
    sign_in(client, caller.key)
    page = client.get(f"{JOBS}/{job_id}").text
    note = page[page.index('data-splits="forget_val retain_val"') :].split("</p>", 1)[0]
    assert "validation splits" in note and "(4 samples)" in note and "(16 samples)" in note
    # The chart's numbers at lambda = 0 and the chosen lambda are rows of the table.
    curve = {p["lambda"]: p for p in result["lambda_curve"]}
    for key in ("forget_acc", "retain_acc"):
        row = page[page.index(f'data-metric="search_{key}"') :].split("</tr>", 1)[0]
        assert "validation split" in row
        assert f"<td>{fmt(curve[0.0][key])}</td>" in row
        assert f"<td>{fmt(curve[result['lambda']][key])}</td>" in row
    row = page[page.index('data-metric="forget_acc"') :].split("</tr>", 1)[0]
    assert "forget set, train split" in row and "(12 samples)" in row


def test_the_json_report_is_the_apis_report(client, caller, finished_job):
    job_id, _ = finished_job()
    sign_in(client, caller.key)
    response = client.get(f"{JOBS}/{job_id}/report.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    api = client.get(f"/v1/unlearning-jobs/{job_id}/report", headers=caller.headers)
    assert response.json() == api.json()


def test_a_cancelled_job_says_what_was_requested_not_forgotten(client, registered, caller):
    headers = caller.headers
    job_id = submit(client, registered, forget={"dataset_id": registered.dataset_id,
                                                "classes": ["circle"]})  # fmt: skip
    assert client.post(f"/v1/unlearning-jobs/{job_id}:cancel", headers=headers).status_code == 200
    sign_in(client, caller.key)
    page = client.get(f"{JOBS}/{job_id}").text
    assert "Samples forgotten" not in page and "Classes forgotten" not in page
    assert "Samples requested" in page and 'data-fact="classes">circle<' in page
    summary = page[page.index("data-summary") :].split("</p>", 1)[0]
    assert "Asked to forget" in summary and "circle" in summary
    assert "no verdict: the job cancelled" in summary


def test_a_running_job_shows_no_curve_yet(client, registered, caller):
    job_id = submit(client, registered)
    sign_in(client, caller.key)
    page = client.get(f"{JOBS}/{job_id}").text
    assert "<svg" not in page
    assert "appears here once" in page
    assert 'data-state="QUEUED"' in page


# ---- tenancy, scopes, CSRF, escaping ---------------------------------------------------------


def test_another_tenants_job_is_not_found(client, registered, register, make_caller):
    job_id = submit(client, registered)
    outsider = make_caller("globex", ("admin",))
    register(outsider)
    sign_in(client, outsider.key)
    page = client.get(f"{JOBS}/{job_id}")
    assert page.status_code == 404
    assert job_id in page.text  # the message names what was asked for, nothing more
    assert client.get(f"{JOBS}/{job_id}/report.json").status_code == 404
    assert client.get(f"{JOBS}/not-a-uuid").status_code == 404
    token = csrf_token(client.get(JOBS).text)
    assert job_id not in client.get(JOBS).text
    cancel = client.post(f"{JOBS}/{job_id}/cancel", data={"csrf_token": token})
    assert cancel.status_code == 404
    state = client.get(f"/v1/unlearning-jobs/{job_id}", headers=registered.caller.headers)
    assert state.json()["state"] == "QUEUED"


def test_the_auditor_reads_but_cannot_cancel(client, registered, make_caller):
    job_id = submit(client, registered)
    auditor = make_caller("acme", ("audit:read",))
    sign_in(client, auditor.key)
    page = client.get(f"{JOBS}/{job_id}")
    assert page.status_code == 200
    assert f"{job_id}/cancel" not in page.text
    assert "Read-only" in page.text
    assert 'data-audit-seq="' in page.text  # audit:read sees the trail
    refused = client.post(f"{JOBS}/{job_id}/cancel", data={"csrf_token": csrf_token(page.text)})
    assert refused.status_code == 403
    state = client.get(f"/v1/unlearning-jobs/{job_id}", headers=registered.caller.headers)
    assert state.json()["state"] == "QUEUED"


def test_a_reader_without_audit_read_sees_no_audit_trail(client, registered, make_caller):
    job_id = submit(client, registered)
    reader = make_caller("acme", ("jobs:read",))
    sign_in(client, reader.key)
    page = client.get(f"{JOBS}/{job_id}").text
    assert 'data-audit-seq="' not in page
    assert "needs an API key with the" in page
    assert f"{job_id}/cancel" not in page


def test_an_operator_cancels_through_the_form(client, registered, make_caller):
    job_id = submit(client, registered)
    operator = make_caller("acme", ("jobs:write", "audit:read"))
    sign_in(client, operator.key)
    page = client.get(f"{JOBS}/{job_id}").text
    assert f'action="/dashboard/jobs/{job_id}/cancel"' in page
    response = client.post(
        f"{JOBS}/{job_id}/cancel",
        data={"csrf_token": csrf_token(page)},
        headers={"Origin": "http://testserver"},
        follow_redirects=False,
    )
    assert response.status_code == 303
    assert response.headers["location"] == f"{JOBS}/{job_id}"
    after = client.get(f"{JOBS}/{job_id}").text
    assert 'data-state="CANCELLED"' in after
    assert f"{job_id}/cancel" not in after  # a job that has ended has no cancel button
    assert "job.cancel_requested" in after
    again = client.post(f"{JOBS}/{job_id}/cancel", data={"csrf_token": csrf_token(page)})
    assert again.status_code == 409


def test_cancel_without_the_token_or_from_another_site_is_refused(client, registered, caller):
    job_id = submit(client, registered)
    sign_in(client, caller.key)
    token = csrf_token(client.get(f"{JOBS}/{job_id}").text)
    assert client.post(f"{JOBS}/{job_id}/cancel", data={}).status_code == 403
    assert client.post(f"{JOBS}/{job_id}/cancel", data={"csrf_token": "f" * 64}).status_code == 403
    for header, value in (
        ("Origin", "https://evil.example"),
        ("Referer", "https://evil.example/x"),
    ):
        response = client.post(
            f"{JOBS}/{job_id}/cancel", data={"csrf_token": token}, headers={header: value}
        )
        assert response.status_code == 403
    state = client.get(f"/v1/unlearning-jobs/{job_id}", headers=caller.headers)
    assert state.json()["state"] == "QUEUED"


def test_text_from_requests_is_escaped(client, registered, caller):
    subject = '<script>alert("subject")</script>'
    basis = '"><img src=x onerror=alert(1)>'
    job_id = submit(client, registered, subject_reference=subject, legal_basis=basis)
    sign_in(client, caller.key)
    for page in (client.get(JOBS).text, client.get(f"{JOBS}/{job_id}").text):
        assert subject not in page
        assert "<img src=x" not in page
        # Shown as text: escaped in the HTML, the same characters once unescaped.
        assert "&lt;script&gt;alert(" in page and subject in html.unescape(page)
    page = client.get(f"{JOBS}/{job_id}").text
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and basis in html.unescape(page)
    filtered = client.get(JOBS, params={"subject": subject}).text
    assert rows(filtered) == [job_id]
    assert subject not in filtered


def test_pages_load_nothing_from_elsewhere(client: TestClient, caller, registered):
    submit(client, registered)
    sign_in(client, caller.key)
    page = client.get(JOBS)
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy
    assert page.headers["cache-control"] == "no-store"
    assert not re.search(r'(src|href)="(https?:)?//', page.text)
    assert 'rel="icon" href="data:,"' in page.text
    for name, media_type in (("dashboard.css", "text/css"), ("dashboard.js", "text/javascript")):
        url = re.search(rf'"(/dashboard/static/{re.escape(name)}\?v=[0-9a-f]+)"', page.text)
        assert url, name
        asset = client.get(url.group(1))
        assert asset.status_code == 200
        assert asset.headers["content-type"].startswith(media_type)
        assert "http://" not in asset.text and "https://" not in asset.text
    assert client.get("/dashboard/static/../../app/settings.py").status_code == 404
    assert "/dashboard" not in str(client.get("/openapi.json").json()["paths"])


def test_an_escalated_job_lists_its_rounds(app, client, registered, caller):  # type: ignore[no-untyped-def]
    job_id = submit(client, registered, target=MET_TARGET)
    drive_to_success(app, job_id, rounds=2)
    sign_in(client, caller.key)
    page = client.get(f"{JOBS}/{job_id}").text
    table = page[page.index('id="rounds-heading"') :].split("</table>", 1)[0]
    assert 'data-round="0" class="missed"' in table and 'data-round="1" class="ok"' in table
    assert "not met" in table and "43.21%" in table  # the driver's kept fraction
    single = submit(client, registered, target=MET_TARGET)
    drive_to_success(app, single)
    assert 'id="rounds-heading"' not in client.get(f"{JOBS}/{single}").text


# ---- deletion requests -----------------------------------------------------------------------


def request_row(page: str, request_id: str) -> str:
    match = re.search(rf'<tr data-request-id="{request_id}".*?</tr>', page, re.S)
    assert match, f"no row for request {request_id}"
    return match.group(0)


def test_the_request_list_shows_who_what_due_state_and_deletion(client, caller, carried_requests):
    sign_in(client, caller.key)
    page = client.get("/dashboard/requests")
    assert page.status_code == 200
    assert '<a href="/dashboard/requests">Deletion requests</a>' in page.text  # in the nav
    alice = request_row(page.text, carried_requests.forgotten["DSR-ALICE"]["id"])
    assert "DSR-ALICE" in alice and "2 samples" in alice and "faces" in alice
    assert ">FORGOTTEN<" in alice and ">data deleted<" in alice and "overdue" not in alice
    bob = request_row(page.text, carried_requests.forgotten["DSR-BOB"]["id"])
    assert "1 sample<" in bob and ">data deleted<" in bob
    carol = request_row(page.text, carried_requests.pending["id"])
    # Received 5 January 2026: due a month later, long past, and nothing has settled it.
    assert "2026-02-05 09:00:00 UTC · overdue" in re.sub(r"<[^>]+>", "", carol)
    assert ">PENDING<" in carol and ">not batched yet<" in carol


def test_a_requests_page_shows_its_evidence_job_version_and_deletion(
    client, caller, carried_requests
):
    sign_in(client, caller.key)
    alice = carried_requests.forgotten["DSR-ALICE"]
    page = client.get(f"/dashboard/requests/{alice['id']}").text
    assert "Subject “DSR-ALICE”" in page and "asked to forget 2 samples of data set “faces”" in page
    assert "u0, u1" in page and "GDPR Art. 17" in page
    assert f'href="/dashboard/jobs/{carried_requests.job_id}"' in page
    assert f"version {alice['model_version']}" in page and alice["model_version"] == 2
    before, after = alice["evidence"]["before"], alice["evidence"]["after"]
    acc = re.search(r'<tr data-evidence="acc">.*?</tr>', page, re.S).group(0)
    assert f"<td>{before['acc']:.2f}</td><td>{after['acc']:.2f}</td>" in acc
    # Retention deleted the forgotten images of the uploaded data set: its job's three.
    assert 'data-deletion="succeeded"' in page
    assert "deleted: 3 samples, 3 files," in page

    pending = client.get(f"/dashboard/requests/{carried_requests.pending['id']}").text
    assert "not batched yet" in pending and "· overdue" in pending
    assert "The evidence appears here once" in pending


def test_a_jobs_page_lists_its_requests_and_its_data_deletion(client, caller, carried_requests):
    sign_in(client, caller.key)
    page = client.get(f"{JOBS}/{carried_requests.job_id}").text
    for subject, request in carried_requests.forgotten.items():
        row = request_row(page, request["id"])
        assert subject in row and ">FORGOTTEN<" in row
    assert carried_requests.pending["id"] not in page
    deletion = re.search(r'<section[^>]*data-deletion="succeeded".*?</section>', page, re.S)
    assert deletion, "no data deletion section"
    text = deletion.group(0)
    assert "deleted: 3 samples, 3 files," in text and "Recorded at" in text
    # The report the page links to names the same requests, signed.
    report = client.get(f"{JOBS}/{carried_requests.job_id}/report.json").json()
    assert {r["subject_reference"] for r in report["requests"]} == {"DSR-ALICE", "DSR-BOB"}
    assert report["signature"]


def test_a_direct_jobs_page_says_it_carries_no_request(client, caller, finished_job):
    job_id, _ = finished_job()
    sign_in(client, caller.key)
    page = client.get(f"{JOBS}/{job_id}").text
    assert "None: this job was submitted directly" in page
    assert "deletion pending" in page  # retention has not run for it yet


def test_another_tenants_request_is_not_found(client, make_caller, carried_requests):
    other = make_caller("globex", ("jobs:read",))
    sign_in(client, other.key)
    alice = carried_requests.forgotten["DSR-ALICE"]["id"]
    assert client.get(f"/dashboard/requests/{alice}").status_code == 404
    assert client.get("/dashboard/requests/not-a-uuid").status_code == 404
    assert alice not in client.get("/dashboard/requests").text
