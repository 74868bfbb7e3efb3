"""The ``tenantrag`` command: the composition root of API, workers and embedded stack."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, TypeVar

import httpx
import typer
import uvicorn
from pydantic import ValidationError
from rich.console import Console

from app.auth.keys import Grantor, Scope
from app.auth.principal import CLI
from app.db.engine import Database, make_engine
from app.db.migrate import migrate
from app.db.models import Tier
from app.devstack.embedded import EmbeddedStack
from app.devstack.stack import (
    attach_to_running_stack,
    remove_stack_file,
    with_folder_secrets,
    write_stack_file,
)
from app.domain.keys.schemas import ApiKeyCreate, ApiKeyCreated
from app.domain.keys.service import ApiKeyService
from app.domain.tenants.schemas import TenantCreate
from app.domain.tenants.service import TenantService
from app.errors import DomainError
from app.http.tracing import TracingUnavailableError
from app.ingest_client import FolderIngester, print_summary
from app.logs import configure_logging
from app.server.factory import create_app
from app.server.http_protocol import OneWriteHttpToolsProtocol
from app.settings import DatabaseSettings, ServerSettings, Settings, load_settings

T = TypeVar("T")
cli = typer.Typer(help="Tenant-isolated RAG assistant backend.", no_args_is_help=True)
tenants_cli = typer.Typer(help="Manage tenants (platform operator).", no_args_is_help=True)
keys_cli = typer.Typer(help="Manage tenant API keys.", no_args_is_help=True)
cli.add_typer(tenants_cli, name="tenants")
cli.add_typer(keys_cli, name="keys")


def _settings() -> Settings:
    """Settings from the environment; with no DATABASE_URL, those of a running dev stack."""
    try:
        server = ServerSettings()
        running = None if os.environ.get("DATABASE_URL") else attach_to_running_stack(server)
        settings = running or load_settings()
    except ValidationError as exc:
        typer.secho(f"invalid settings:\n{exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    configure_logging(settings.server)
    return settings


def _serve(settings: Settings) -> None:
    from workers.embedded import embedded_workers  # composition root: only here

    lifespans = [embedded_workers(settings)] if settings.worker.embedded else []
    try:
        app = create_app(settings, extra_lifespans=lifespans)
    except TracingUnavailableError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    # Our logging (app/logs.py) formats uvicorn's lines too; the access log is ours
    # (app/http/request_context.py), with the request and tenant ids.
    # A response's head and body leave in one write (app/server/http_protocol.py).
    config = uvicorn.Config(app, host=settings.server.host, port=settings.server.port,
                            log_config=None, access_log=False, lifespan="on",
                            http=OneWriteHttpToolsProtocol)
    uvicorn.Server(config).run()


@cli.command()
def serve(host: str | None = None, port: int | None = None) -> None:
    """Run the API (production: settings from the environment)."""
    settings = _settings()
    settings.server.host = host or settings.server.host
    settings.server.port = port if port is not None else settings.server.port
    _serve(settings)


@cli.command()
def worker(threads: int | None = None) -> None:
    """Run Dramatiq workers in this process until SIGINT/SIGTERM."""
    from workers.process import start_workers

    settings = _settings()
    settings.worker.threads = threads or settings.worker.threads
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    running = start_workers(settings)
    typer.echo("worker ready", err=True)
    stop.wait()
    running.stop()


@cli.command("migrate")
def migrate_cmd() -> None:
    """Bring the database schema to the latest version (runs as the owner role)."""
    if os.environ.get("DATABASE_URL"):  # the migration job holds the owner URL and no other secret
        configure_logging(ServerSettings())
        database = DatabaseSettings()
    else:
        database = _settings().database  # a running dev stack's
    asyncio.run(migrate(database))
    typer.echo("database is at the latest schema")


@cli.command()
def dev(port: Annotated[int, typer.Option(help="HTTP port")] = 8000) -> None:
    """Run everything in one process on the embedded stack (no settings needed)."""
    settings = Settings(server=ServerSettings(env="dev", port=port))
    settings.worker.embedded = True
    configure_logging(settings.server)
    data_dir = settings.server.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    with EmbeddedStack(data_dir) as stack, contextlib.ExitStack() as servers:
        endpoints = stack.start()
        settings.database.url = settings.database.url or endpoints.database_url
        settings.redis.url = settings.redis.url or endpoints.redis_url
        settings.auth = with_folder_secrets(settings.auth, data_dir)  # never public defaults
        asyncio.run(migrate(settings.database))
        pools = settings.dispatch.pools_file or settings.dispatch.pools
        if settings.llm.base_url is None and not pools and settings.llm.start_local:
            settings.llm.base_url = _start_local_vllm(servers, data_dir)
        write_stack_file(data_dir, settings.database.url, settings.redis.url)
        try:
            _announce(settings)
            _serve(settings)
        except KeyboardInterrupt:
            pass  # uvicorn re-raises Ctrl-C after its graceful shutdown; ours follows
        finally:
            remove_stack_file(data_dir)


def _start_local_vllm(servers: contextlib.ExitStack, data_dir: Path) -> str:
    """The default generation server of the dev stack: vLLM on the CPU with SmolLM2-135M
    (installed into ``.cache/vllm`` on first use, several minutes; then reused)."""
    from app.devstack.local_vllm import LocalVLLM, default_cache_dir, prepare

    typer.echo("preparing the local vLLM server (the first time installs it: minutes)...",
               err=True)
    prepared = prepare(default_cache_dir())
    typer.echo("starting the local vLLM server (about a minute)...", err=True)
    server = servers.enter_context(LocalVLLM(prepared, data_dir / "vllm"))
    return server.base_url


def _announce(settings: Settings) -> None:
    base = f"http://{settings.server.host}:{settings.server.port}"
    admin = settings.auth.platform_admin_key
    key = admin.get_secret_value() if admin else "(AUTH_PLATFORM_ADMIN_KEY)"
    typer.secho("\ntenantrag is starting on the embedded stack", bold=True)
    typer.echo(f"  base URL:            {base}")
    typer.echo(f"  API docs (OpenAPI):  {base}/docs")
    typer.echo(f"  platform admin key:  {key}")
    if settings.dispatch.pools_file or settings.dispatch.pools:
        typer.echo(f"  generation pools:    {settings.dispatch.pools_file or 'DISPATCH_POOLS'}")
    else:
        typer.echo(f"  generation server:   {settings.llm.base_url} (models: "
                   f"{', '.join(settings.llm.models)})")
    typer.echo(f"  data folder:         {settings.server.data_dir.resolve()}")
    typer.echo("  stop with Ctrl-C\n")


@asynccontextmanager
async def _database(settings: Settings) -> AsyncIterator[Database]:
    if not settings.database.url:
        typer.secho("DATABASE_URL is not set and no dev stack is running", fg="red", err=True)
        raise typer.Exit(2)
    db = Database(make_engine(settings.database.application_url(), settings.database))
    try:
        yield db
    finally:
        await db.close()


def _run(work: Callable[[Database, Settings], Awaitable[T]]) -> T:
    settings = _settings()

    async def main() -> T:
        async with _database(settings) as db:
            return await work(db, settings)

    try:
        return asyncio.run(main())
    except DomainError as exc:
        typer.secho(f"error: {exc.detail}", fg="red", err=True)
        raise typer.Exit(1) from exc


async def _resolve_tenant(db: Database, ref: str) -> uuid.UUID:
    service = TenantService(db)
    try:
        return (await service.get(uuid.UUID(ref))).id
    except ValueError:
        return (await service.get_by_slug(ref)).id


@tenants_cli.command("create")
def tenants_create(
    slug: str, name: str, tier: Tier = Tier.free,
    model: Annotated[list[str] | None, typer.Option(help="allowed model (repeat)")] = None,
) -> None:
    """Create a tenant."""
    try:
        data = TenantCreate(slug=slug, name=name, tier=tier, allowed_models=model or [])
    except ValidationError as exc:
        typer.secho(f"invalid tenant: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    tenant = _run(lambda db, _: TenantService(db).create(data, CLI))
    typer.echo(f"created tenant {tenant.slug} ({tenant.id}), tier {tenant.tier}")


@tenants_cli.command("list")
def tenants_list() -> None:
    """List tenants."""
    rows, total = _run(lambda db, _: TenantService(db).list(limit=1000, offset=0))
    for t in rows:
        typer.echo(f"{t.id}  {t.slug:<30} {t.tier:<10} {t.status}")
    typer.echo(f"{total} tenant(s)")


@keys_cli.command("create")
def keys_create(
    tenant: Annotated[str, typer.Argument(help="tenant slug or id")],
    name: str = "cli",
    scope: Annotated[list[Scope] | None, typer.Option(help="scope (repeat)")] = None,
) -> None:
    """Mint an API key for a tenant; the key is printed once."""
    data = ApiKeyCreate(name=name, scopes=scope or [Scope.chat])

    async def work(db: Database, settings: Settings) -> ApiKeyCreated:
        service = ApiKeyService(db, settings.auth.key_pepper.get_secret_value())
        return await service.create(await _resolve_tenant(db, tenant), data, Grantor(CLI, None))

    created = _run(work)
    typer.echo(f"key id: {created.id}\nkey:    {created.key}")
    typer.echo("(store it now: it is not shown again)")


@keys_cli.command("revoke")
def keys_revoke(
    tenant: Annotated[str, typer.Argument(help="tenant slug or id")], key_id: uuid.UUID
) -> None:
    """Revoke a tenant's API key (effective on the next request)."""

    async def work(db: Database, settings: Settings) -> None:
        service = ApiKeyService(db, settings.auth.key_pepper.get_secret_value())
        await service.revoke(await _resolve_tenant(db, tenant), key_id, Grantor(CLI, None))

    _run(work)
    typer.echo(f"revoked {key_id}")


@cli.command()
def ingest(
    folder: Annotated[Path, typer.Argument(exists=True, file_okay=False, readable=True)],
    kb: Annotated[str, typer.Option(help="knowledge base id")],
    key: Annotated[str, typer.Option(envvar="TENANTRAG_API_KEY", help="tenant key (ingest)")],
    url: Annotated[str, typer.Option(envvar="TENANTRAG_URL")] = "http://127.0.0.1:8000",
    timeout: Annotated[float, typer.Option(help="seconds to wait for processing")] = 3600,
) -> None:
    """Upload every file of FOLDER into a knowledge base and wait until each is processed."""
    console = Console()
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
        report = FolderIngester(client, kb, timeout).run(folder, console)
    print_summary(report, console)
    if report.failed:
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry point (each command sets up logging from its settings)."""
    cli()
