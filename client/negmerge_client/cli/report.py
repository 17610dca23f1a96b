"""`negmerge-client jobs report` for people: who asked, what was forgotten, the before/after table,
lambda, the kept fraction and the hashes that identify the models."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from negmerge_client.cli.output import console, number, print_fields, when
from negmerge_client.client import JSON

METRICS = {
    "forget_acc": "forget accuracy (Acc D_f)",
    "forget_test_acc": "forget test accuracy",
    "retain_acc": "retain accuracy (Acc D_r)",
    "test_acc": "test accuracy (Acc D_test)",
    "mia": "MIA-efficacy",
}


def print_verdict(report: JSON) -> None:
    """The target, and once the job has ended the verdict with every check."""
    verdict, target = report.get("verdict"), report.get("target") or {}
    bounds = ", ".join(f"{k} {v:g}" for k, v in target.items() if v is not None)
    default = " (the default for this kind of request)" if report.get("default_target") else ""
    out = console()
    if bounds:
        out.print(f"target       {escape(bounds)}{default}", highlight=False)
    if not verdict:
        return
    style = "bold green" if verdict["met"] else "bold dark_orange"
    head = "MET" if verdict["met"] else "NOT MET"
    reason = escape(verdict["reason"].split(": ", 1)[-1])
    out.print(f"verdict      [{style}]{head}[/{style}]: {reason}", highlight=False)
    for check in verdict["checks"]:
        mark = "ok" if check["met"] else "NO"
        out.print(f"             {mark}  {escape(check['text'])}", highlight=False)


def print_report(report: JSON, job: JSON) -> None:
    requested = report["requested_by"]
    forgotten = report["forgotten"]
    selection = report.get("forget_selection") or {}
    chosen = (
        f"classes {', '.join(selection['classes'])}"
        if selection.get("classes")
        else f"{len(selection['ids'])} ids"
        if selection.get("ids")
        else "the whole data set"
    )
    base, new = report["base_model"], report.get("unlearned_model")
    result = job.get("result") or {}
    error = report.get("error")
    out = console()
    status = "final" if report["final"] else "not final: the job has not ended"
    out.print(f"[bold]Unlearning report[/bold] for job {report['job_id']}: "
              f"{report['state']} ({status})")  # fmt: skip
    print_fields(
        [
            ("requested", f"{when(requested['requested_at'])} by API key "
             f"{requested.get('api_key_name') or requested.get('api_key_id')!r} of tenant "
             f"{requested.get('tenant_name') or requested.get('tenant_id')!r}"),
            ("subject", requested.get("subject_reference")),
            ("legal basis", requested.get("legal_basis")),
            ("forgotten", f"{forgotten['count']} samples ({chosen}) of data set "
             f"{forgotten.get('dataset_name') or forgotten['dataset_id']!r}"),
            ("forget set", f"manifest sha256 {forgotten['manifest_sha256']}"),
            ("error", f"{error['code']}: {error['message']}" if error else None),
        ]
    )  # fmt: skip
    print_verdict(report)
    metrics = report.get("metrics") or {}
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    if before or after:
        table = Table(title="before / after")
        table.add_column("metric")
        table.add_column("before", justify="right")
        table.add_column("after", justify="right")
        for key, label in METRICS.items():
            if before.get(key) is not None or after.get(key) is not None:
                table.add_row(label, number(before.get(key)), number(after.get(key)))
        out.print(table)
    elif not report["final"]:
        out.print("no metrics yet: the workers have not evaluated the new model")
    rounds = report.get("rounds") or []
    if len(rounds) > 1:  # escalation ran: the result is the last round's
        table = Table(title="rounds (the result is the last one's)")
        for column in ("round", "variants merged", "kept", "lambda", "verdict"):
            table.add_column(column, justify="left" if column == "verdict" else "right")
        for r in rounds:
            outcome = "met" if r["verdict"]["met"] else "not met"
            merged, kept = str(len(r["variants_merged"])), f"{r['kept_fraction']:.2%}"
            table.add_row(str(r["round"]), merged, kept, number(r["lambda"], "g"), outcome)
        out.print(table)
    kept = result.get("kept_fraction")
    audit, signature = report.get("audit") or {}, report.get("signature")
    print_fields(
        [
            ("lambda", number(report.get("lambda"), "g")),
            ("kept", f"{kept:.2%} of the merged task vector's elements" if kept is not None
             else None),
            ("base model", f"{base['model_id']} v{base['version']}  sha256 "
             f"{base['weights_sha256']}"),
            ("new model", f"{new['model_id']} v{new['version']}  sha256 {new['weights_sha256']}"
             if new else None),
            ("merged tau", f"sha256 {result['merged_sha256']}" if result.get("merged_sha256")
             else None),
            ("code", report.get("code_version")),
            ("audit head", f"#{audit['head_seq_at_end']} {audit['head_hash_at_end']}"
             if audit.get("head_hash_at_end") else None),
            ("signature", f"{signature['algorithm']} by key {signature['key_id']} (check it: "
             "negmerge admin report verify FILE)" if signature else None),
            ("timeline", ", ".join(f"{e['state']} {when(e['at'])}" for e in report["timeline"]
                                   if e["kind"] == "state") or None),
        ]
    )  # fmt: skip
