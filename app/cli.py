"""`negmerge admin ...`: tenants, API keys and the audit chain, straight on the database
(NEGMERGE_DATABASE_URL). Attached to the `negmerge` command through the `negmerge.commands`
entry-point group, so the library never imports the service."""

from __future__ import annotations

import getpass
import json
import sys
import uuid
from pathlib import Path

import click

from app.db.repositories import ApiKeyRepository
from app.db.session import Database
from app.services import audit, report_signing
from app.services.tenants import AdminError, create_key, create_tenant, find_tenant, revoke_key
from app.settings import get_settings


def _database() -> Database:
    return Database(get_settings().database_url, pool_size=1)


def _actor() -> str:
    return f"cli:{getpass.getuser()}"


@click.group()
def admin() -> None:
    """Administer the service: tenants (and their retention), API keys, versions, the audit
    chain, report signatures."""


@admin.group()
def tenants() -> None:
    """Tenants."""


@tenants.command("create")
@click.argument("name")
def tenants_create(name: str) -> None:
    """Create the tenant NAME."""
    try:
        with _database().unit_of_work() as session:
            tenant = create_tenant(session, name, _actor())
    except AdminError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{tenant.id}  {tenant.name}")


@tenants.command("list")
def tenants_list() -> None:
    """List tenants."""
    from app.db.repositories import TenantRepository

    with _database().unit_of_work() as session:
        for tenant in TenantRepository(session).all():
            click.echo(f"{tenant.id}  {tenant.name}")


_DEFAULT = "default"


@tenants.command("retention")
@click.argument("tenant")
@click.option(
    "--forget-data",
    type=click.Choice(["delete", "keep", _DEFAULT]),
    help="A job's forget data when it ends (default: the service's setting).",
)
@click.option(
    "--intermediates",
    type=click.Choice(["delete", "keep", _DEFAULT]),
    help="A job's task vectors, merged vector, base copies and caches when it ends.",
)
@click.option(
    "--superseded",
    type=click.Choice(["block", "delete", "keep", _DEFAULT]),
    help="Versions a job unlearned from: blocked, their bytes deleted, or kept usable.",
)
def tenants_retention(
    tenant: str, forget_data: str | None, intermediates: str | None, superseded: str | None
) -> None:
    """Show or set TENANT's retention policy (printed as JSON: the policy in force and the
    tenant's own choices; `default` clears a choice)."""
    from app.services import retention

    given = {"forget_data": forget_data, "intermediates": intermediates, "superseded": superseded}
    changes = {k: "" if v == _DEFAULT else v for k, v in given.items() if v is not None}
    settings = get_settings()
    try:
        with _database().unit_of_work() as session:
            row = find_tenant(session, tenant)
            if changes:
                retention.set_policy(session, row, changes, _actor())
            own = row.retention_policy or {}
            policy = retention.policy_for(session, row.id, settings)
            session.flush()
    except AdminError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps({"policy": policy.model_dump(), "tenant_choices": own}))


@admin.group()
def versions() -> None:
    """Model versions."""


@versions.command("keep")
@click.argument("model_id", type=click.UUID)
@click.argument("version", type=int)
@click.option("--reason", required=True, help="Why it is kept (recorded in the audit trail).")
def versions_keep(model_id: uuid.UUID, version: int, reason: str) -> None:
    """Keep VERSION of MODEL_ID downloadable and usable as a base although it is superseded
    (it still holds the data a later job forgot): a stated reason, recorded."""
    from app.db.repositories import TenantRepository
    from app.errors import ApiError
    from app.services import retention

    try:
        with _database().unit_of_work() as session:
            tenant_id = TenantRepository(session).owner_of_model(model_id)
            if tenant_id is None:
                raise click.ClickException(f"no model {model_id}")
            found = retention.get_version(session, tenant_id, model_id, version)
            retention.keep_version(session, found, reason, _actor())
    except ApiError as exc:
        raise click.ClickException(exc.message) from None
    click.echo(f"kept version {version} of model {model_id}: {reason}")


@admin.group()
def keys() -> None:
    """API keys."""


@keys.command("create")
@click.option("--tenant", required=True, help="Tenant name or id.")
@click.option(
    "--scopes",
    required=True,
    help="Comma-separated: jobs:write, jobs:read, models:write, models:read, audit:read, admin.",
)
@click.option(
    "--name",
    help="Who or what uses the key (shown in `keys list`, the dashboard and the audit trail); "
    "default: its scopes.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the key and its id as JSON.")
def keys_create(tenant: str, scopes: str, name: str | None, as_json: bool) -> None:
    """Create an API key; it is printed once and only its hash is kept."""
    wanted = [scope.strip() for scope in scopes.split(",") if scope.strip()]
    name = name or ",".join(sorted(set(wanted)))
    try:
        with _database().unit_of_work() as session:
            row, key = create_key(session, find_tenant(session, tenant), wanted, name, _actor())
    except AdminError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(
            json.dumps({"id": str(row.id), "key": key, "name": row.name, "scopes": row.scopes})
        )
    else:
        click.echo(key)
        click.echo(
            f"id {row.id}, name {row.name!r}, scopes {', '.join(row.scopes)} (store the key now)",
            err=True,
        )


@keys.command("list")
@click.option("--tenant", required=True, help="Tenant name or id.")
@click.option("--json", "as_json", is_flag=True, help="Print the keys as JSON.")
def keys_list(tenant: str, as_json: bool) -> None:
    """List a tenant's API keys, oldest first: id, prefix, name, scopes, created, revoked."""
    try:
        with _database().unit_of_work() as session:
            rows = [
                {
                    "id": str(key.id),
                    "prefix": key.prefix,
                    "name": key.name,
                    "scopes": key.scopes,
                    "created_at": key.created_at.isoformat(timespec="seconds"),
                    "revoked_at": key.revoked_at.isoformat(timespec="seconds")
                    if key.revoked_at
                    else None,
                }
                for key in ApiKeyRepository(session).for_tenant(find_tenant(session, tenant).id)
            ]
    except AdminError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(rows))
        return
    for row in rows:
        revoked = f"revoked {row['revoked_at']}" if row["revoked_at"] else "active"
        click.echo(
            f"{row['id']}  {row['prefix']}...  {row['name']}  {','.join(row['scopes'])}  "
            f"created {row['created_at']}  {revoked}"
        )


@keys.command("revoke")
@click.argument("key_id", type=click.UUID)
def keys_revoke(key_id: uuid.UUID) -> None:
    """Revoke the API key KEY_ID."""
    try:
        with _database().unit_of_work() as session:
            revoke_key(session, key_id, _actor())
    except AdminError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"revoked {key_id}")


@admin.group("audit")
def audit_group() -> None:
    """The audit trail."""


@audit_group.command("verify")
def audit_verify() -> None:
    """Recompute every audit chain; exit 1 if a row was edited, deleted or reordered."""
    failed = False
    with _database().unit_of_work() as session:
        for report in audit.verify_all(session):
            status = "ok" if report.ok else "BROKEN"
            click.echo(
                f"{report.chain}  {report.entries} entries  head {report.head_hash}  {status}"
            )
            for problem in report.problems:
                click.echo(f"  {problem}", err=True)
            failed = failed or not report.ok
    if failed:
        click.echo("audit chain verification FAILED", err=True)
        sys.exit(1)


@admin.group("report")
def report_group() -> None:
    """Evidence reports' signatures."""


@report_group.command("public-key")
def report_public_key() -> None:
    """Print the public key (PEM) that report signatures are checked with; its key id goes
    to stderr. The key pair is NEGMERGE_REPORT_SIGNING_KEY_FILE (made if missing)."""
    signer = report_signing.signer_for(get_settings().report_signing_key_file)
    click.echo(report_signing.public_key_pem(signer.public_key), nl=False)
    click.echo(f"key id {signer.key_id}", err=True)


@report_group.command("verify")
@click.argument("report_file", type=click.File("rb"))
@click.option(
    "--public-key",
    "public_key_file",
    type=click.File("rb"),
    help="The service's public key (PEM, from `report public-key` or GET "
    "/v1/report-signing-key). Default: the key of NEGMERGE_REPORT_SIGNING_KEY_FILE.",
)
def report_verify(report_file, public_key_file) -> None:  # type: ignore[no-untyped-def]
    """Check a filed report's signature offline: prints "valid" (exit 0), or why not (1)."""
    try:
        report = json.loads(report_file.read())
    except ValueError as exc:
        raise click.ClickException(f"{report_file.name}: not a JSON report ({exc})") from None
    try:
        if public_key_file is not None:
            key = report_signing.load_public_key(public_key_file.read())
        else:
            key_file = get_settings().report_signing_key_file
            if not Path(key_file).is_file():  # a new key would verify nothing
                raise click.ClickException(
                    f"no signing key at {key_file} (NEGMERGE_REPORT_SIGNING_KEY_FILE): pass "
                    "--public-key with the service's public key"
                )
            key = report_signing.signer_for(key_file).public_key
        if not isinstance(report, dict):
            raise report_signing.SignatureProblem("the file is not a report (a JSON object)")
        key_id = report_signing.verify(report, key)
    except report_signing.SignatureProblem as exc:
        click.echo(f"INVALID: {report_file.name}: {exc}", err=True)
        sys.exit(1)
    click.echo(f"valid: job {report.get('job_id')}, signed by key {key_id}")
