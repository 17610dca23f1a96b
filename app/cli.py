"""`negmerge admin ...`: tenants, API keys and the audit chain, straight on the database
(NEGMERGE_DATABASE_URL). Attached to the `negmerge` command through the `negmerge.commands`
entry-point group, so the library never imports the service."""

from __future__ import annotations

import getpass
import json
import sys
import uuid

import click

from app.db.repositories import ApiKeyRepository
from app.db.session import Database
from app.services import audit
from app.services.tenants import AdminError, create_key, create_tenant, find_tenant, revoke_key
from app.settings import get_settings


def _database() -> Database:
    return Database(get_settings().database_url, pool_size=1)


def _actor() -> str:
    return f"cli:{getpass.getuser()}"


@click.group()
def admin() -> None:
    """Administer the service: tenants, API keys, the audit chain."""


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
