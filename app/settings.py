"""Typed settings, grouped by concern, read once from the environment and injected.

Every group reads its own prefix (``DATABASE_URL``, ``REDIS_URL``, ``QDRANT_URL``...).
Outside the ``dev`` and ``test`` environments, default or missing secrets are refused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Environment = Literal["dev", "test", "prod"]
DEV_KEY_PEPPER = "dev-only-pepper-do-not-use-in-production"


class ServerSettings(BaseSettings):
    """Where the API listens and where local data lives."""

    model_config = SettingsConfigDict(env_prefix="APP_", extra="ignore")

    env: Environment = "prod"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    data_dir: Path = Path(".data")
    max_request_bytes: int = Field(default=60 * 1024 * 1024, gt=0)
    # ``POST /v1/chat/completions`` by the fast door (app/server/fast_chat.py); off: by
    # Litestar's own route, as with tracing on (the dispatch benchmark measures both).
    fast_chat: bool = True
    # One JSON object per line (unset: in prod) or plain text (unset: in dev and test).
    log_format: Literal["json", "text"] | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    def effective_log_format(self) -> Literal["json", "text"]:
        """``APP_LOG_FORMAT``, else JSON in production and text elsewhere."""
        return self.log_format or ("json" if self.env == "prod" else "text")


class TracingSettings(BaseSettings):
    """OpenTelemetry tracing, on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (OTLP over
    HTTP; the exporter reads the other standard ``OTEL_EXPORTER_OTLP_*`` variables)."""

    model_config = SettingsConfigDict(env_prefix="OTEL_", extra="ignore")

    exporter_otlp_endpoint: str | None = None  # e.g. http://otel-collector:4318
    service_name: str = "tenantrag"


class DatabaseSettings(BaseSettings):
    """PostgreSQL: the owner URL runs migrations; the app connects as a non-owner role."""

    model_config = SettingsConfigDict(env_prefix="DATABASE_", extra="ignore")

    url: str | None = None
    app_url: str | None = None
    app_role: str = Field(default="tenantrag_app", pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    app_password: SecretStr | None = None
    pool_size: int = Field(default=10, ge=1, le=200)
    max_overflow: int = Field(default=5, ge=0, le=200)
    pool_timeout_s: float = Field(default=10.0, gt=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    statement_timeout_ms: int = Field(default=30_000, ge=0)

    def owner_url(self) -> str:
        """The migration (owner) URL in SQLAlchemy asyncpg form."""
        if self.url is None:
            raise ValueError("DATABASE_URL is not set")
        return as_asyncpg_url(self.url)

    def application_url(self) -> str:
        """The URL the app connects with: ``DATABASE_APP_URL`` or the owner URL's
        server and database with the app role's name and password."""
        if self.app_url:
            return as_asyncpg_url(self.app_url)
        parts = urlsplit(self.owner_url())
        password = self.app_password.get_secret_value() if self.app_password else ""
        host = parts.netloc.rpartition("@")[2]
        auth = f"{self.app_role}:{password}" if password else self.app_role
        return urlunsplit(parts._replace(netloc=f"{auth}@{host}"))


class RedisSettings(BaseSettings):
    """Redis: rate limits, the Dramatiq broker."""

    model_config = SettingsConfigDict(env_prefix="REDIS_", extra="ignore")

    url: str | None = None
    max_connections: int = Field(default=50, ge=1)
    # The limiter's pipelined connection: commands waiting for Redis before a request
    # is answered 503 "overloaded" instead of queueing more.
    max_in_flight: int = Field(default=1024, ge=1)
    socket_timeout_s: float = Field(default=2.0, gt=0)


class QdrantSettings(BaseSettings):
    """Vector store: a Qdrant server when ``QDRANT_URL`` is set, else embedded shards on disk."""

    model_config = SettingsConfigDict(env_prefix="QDRANT_", extra="ignore")

    url: str | None = None
    api_key: SecretStr | None = None
    path: Path | None = None
    dense_dim: int = Field(default=384, ge=1)
    timeout_s: float = Field(default=10.0, gt=0)


class AuthSettings(BaseSettings):
    """API-key hashing pepper and the platform operator's key."""

    model_config = SettingsConfigDict(env_prefix="AUTH_", extra="ignore")

    key_pepper: SecretStr = SecretStr(DEV_KEY_PEPPER)
    platform_admin_key: SecretStr | None = None
    last_used_resolution_s: int = Field(default=60, ge=0)
    # Resolved tenant keys are reused this long; revocations and tenant changes reach
    # every process at once through PostgreSQL NOTIFY (0 = look up every request).
    cache_ttl_s: float = Field(default=5.0, ge=0, le=300)
    # A refused key (unknown, revoked, expired, suspended tenant) is refused from memory
    # this long: a flood of bad keys costs one lookup per key, not a connection per request.
    negative_cache_ttl_s: float = Field(default=5.0, ge=0, le=60)
    # Embed tokens (browsers): signed with this key (default: derived from the pepper),
    # valid for at most this long.
    embed_signing_key: SecretStr | None = None
    embed_default_ttl_s: int = Field(default=900, ge=30)
    embed_max_ttl_s: int = Field(default=3600, ge=30, le=86400)

    def embed_key(self) -> bytes:
        """The embed tokens' HMAC key."""
        if self.embed_signing_key is not None:
            return self.embed_signing_key.get_secret_value().encode()
        return hashlib.sha256(b"embed-tokens:" + self.key_pepper.get_secret_value().encode()
                              ).digest()


class IngestSettings(BaseSettings):
    """Uploads, parsing, chunking, embedding and the ingestion queue."""

    model_config = SettingsConfigDict(env_prefix="INGEST_", extra="ignore")

    max_file_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    max_files_per_request: int = Field(default=20, ge=1, le=1000)
    chunk_max_tokens: int = Field(default=200, ge=16, le=512)
    chunk_overlap_tokens: int = Field(default=30, ge=0, le=256)
    embedding_model: str | None = None
    embedding_device: str = "cpu"
    # Texts per forward pass; unset: 8 on the CPU (less padding), 64 on an accelerator.
    embedding_batch_size: int | None = Field(default=None, ge=1, le=1024)
    # Copies of the model (shared weights) that embed at once in a worker, one torch
    # thread each; unset: one per core on the CPU, one on an accelerator.
    embedding_replicas: int | None = Field(default=None, ge=1, le=64)
    # Worker threads' embedding calls are merged: up to this many texts per model call,
    # waiting at most this long for more (large, length-sorted batches: ~1.5x throughput).
    coalesce_max_texts: int = Field(default=256, ge=1)
    coalesce_wait_s: float = Field(default=0.5, ge=0)
    # ...but run as soon as this many wait (texts queued while the model was busy).
    coalesce_eager_texts: int = Field(default=256, ge=1)
    message_time_limit_s: int = Field(default=900, ge=10)
    # Each file is parsed in a child process of its own, killed past this time or
    # address-space size (the file then fails); at most parse_processes at once.
    parse_timeout_s: float = Field(default=60.0, gt=0)
    parse_memory_mb: int = Field(default=1024, ge=256)
    parse_processes: int = Field(default=2, ge=1, le=64)
    max_attempts: int = Field(default=5, ge=1, le=50)
    resend_queued_after_s: int = Field(default=300, ge=1)
    resend_processing_after_s: int = Field(default=120, ge=1)
    # A reader may have read the live-version map just before a swap; the old version's
    # points stay this long so its query still finds them (no gap).
    stale_version_grace_s: float = Field(default=30.0, ge=0)
    sweep_interval_s: float = Field(default=30.0, gt=0)
    relay_interval_s: float = Field(default=0.2, gt=0)
    # Fair share: documents of one tenant sent to the broker and not yet done, across
    # all workers; the rest wait in the outbox and are released round-robin across
    # tenants. Unset: twice WORKER_THREADS of the relaying process (what one worker
    # holds and prefetches anyway, so a lone tenant loses no throughput).
    tenant_inflight: int | None = Field(default=None, ge=1, le=100_000)

    @model_validator(mode="after")
    def _overlap_below_size(self) -> IngestSettings:
        if self.chunk_overlap_tokens >= self.chunk_max_tokens:
            raise ValueError("INGEST_CHUNK_OVERLAP_TOKENS must be below INGEST_CHUNK_MAX_TOKENS")
        return self


class WorkerSettings(BaseSettings):
    """Dramatiq workers: threads inside the API process in dev, separate processes otherwise."""

    model_config = SettingsConfigDict(env_prefix="WORKER_", extra="ignore")

    embedded: bool = False
    # Mostly waiting on the model, the database or the store: enough of them keep the
    # embedding batcher fed with large batches.
    threads: int = Field(default=8, ge=1, le=64)
    namespace: str = Field(default="tenantrag", pattern=r"^[a-zA-Z0-9_-]{1,40}$")
    heartbeat_timeout_s: int = Field(default=60, ge=1)


class LlmSettings(BaseSettings):
    """Talking to OpenAI-compatible generation servers (vLLM). ``LLM_BASE_URL`` is the
    one-server setup (a shared pool of one); ``DISPATCH_POOLS_FILE`` configures pools.
    Unset both in ``dev`` = a local vLLM CPU server started with the embedded stack."""

    model_config = SettingsConfigDict(env_prefix="LLM_", extra="ignore")

    base_url: str | None = None  # e.g. http://127.0.0.1:8001/v1
    api_key: SecretStr | None = None
    models: list[str] = Field(default_factory=lambda: ["smollm2"])
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=300.0, gt=0)
    max_connections: int = Field(default=200, ge=1)
    # The model's context window; 0 = ask the server (vLLM's /v1/models max_model_len).
    context_window: int = Field(default=0, ge=0)
    default_max_tokens: int = Field(default=512, ge=1)
    start_local: bool = True  # dev: start the local vLLM server when base_url is unset


class DispatchSettings(BaseSettings):
    """Generation pools and how requests are spread over them (see docs/dispatch.md)."""

    model_config = SettingsConfigDict(env_prefix="DISPATCH_", extra="ignore")

    pools_file: Path | None = None  # TOML, YAML or JSON; else DISPATCH_POOLS, else LLM_BASE_URL
    pools: str | None = None  # the same document as JSON, for environment-only setups
    # The price table alone as JSON, when the pools document has none (docs/quotas.md).
    prices: str | None = None
    max_in_flight: int = Field(default=32, ge=1)  # per replica of the LLM_BASE_URL pool
    queue_timeout_s: float = Field(default=30.0, gt=0)
    max_queued_per_tenant: int = Field(default=500, ge=1)
    # Small against a request's cost keeps turns short (a turn serves about
    # quantum x weight tokens); rounds that serve nobody are skipped, so small is cheap.
    quantum_tokens: float = Field(default=64.0, gt=0)
    weight_free: float = Field(default=1.0, gt=0)
    weight_pro: float = Field(default=2.0, gt=0)
    weight_enterprise: float = Field(default=4.0, gt=0)
    # vLLM runs lower values first (pools with priority_scheduling only).
    priority_free: int = 10
    priority_pro: int = 5
    priority_enterprise: int = 0
    affinity_headroom: float = Field(default=0.25, ge=0)
    # On shared pools no tenant holds more than this share of the slots: the rest stay
    # free for other tenants' next requests (1.0 = off: a lone tenant may use them all).
    max_tenant_share: float = Field(default=0.875, gt=0, le=1)
    health_interval_s: float = Field(default=5.0, gt=0)
    health_timeout_s: float = Field(default=2.0, gt=0)
    breaker_failures: int = Field(default=3, ge=1)
    breaker_cooldown_s: float = Field(default=15.0, gt=0)

    def weight(self, tier: str) -> float:
        """Fair-queue weight of a tier."""
        return float(getattr(self, f"weight_{tier}"))

    def priority(self, tier: str) -> int:
        """vLLM request priority of a tier."""
        return int(getattr(self, f"priority_{tier}"))


class QuotaSettings(BaseSettings):
    """Rate limits, concurrency leases and token budgets (Redis), usage metering."""

    model_config = SettingsConfigDict(env_prefix="QUOTA_", extra="ignore")

    # Redis unreachable: refuse with 503 (default) or admit unmetered by Redis.
    fail_open: bool = False
    # A concurrency slot or budget reservation of a crashed process frees after this;
    # live streams renew theirs.
    lease_ttl_s: float = Field(default=120.0, ge=5)
    # A chat request with an X-Request-Id is answered once: for this long its id and
    # body are remembered, and a replay gets the stored answer (docs/quotas.md).
    idempotency_window_s: int = Field(default=86_400, ge=60)


class MetricsSettings(BaseSettings):
    """Prometheus ``/metrics``."""

    model_config = SettingsConfigDict(env_prefix="METRICS_", extra="ignore")

    # Bearer token Prometheus scrapes with; the operator's key works too.
    token: SecretStr | None = None
    # Tenants beyond this many (per process) share the label "other".
    max_tenant_labels: int = Field(default=100, ge=0, le=10_000)


class ChatSettings(BaseSettings):
    """Retrieval-augmented chat."""

    model_config = SettingsConfigDict(env_prefix="CHAT_", extra="ignore")

    top_k: int = Field(default=5, ge=1, le=50)
    # A passage counts as relevant if its cosine similarity to the question reaches
    # min_dense_score, or it shares a term (stop words aside) with the question with a
    # BM25 score above min_sparse_score. BM25 scores grow with the corpus (IDF), so the
    # default counts any shared term; raise it only after looking at your scores.
    min_dense_score: float = Field(default=0.3, ge=-1, le=1)
    min_sparse_score: float = Field(default=0.0, ge=0)
    snippet_chars: int = Field(default=300, ge=0)
    max_history_messages: int = Field(default=50, ge=0)
    rerank_model: str | None = None  # a sentence-transformers CrossEncoder folder; off
    # Content rules: all of one request's matching (input, snippets, answer, stream) may
    # take this long, then the next check counts as a hit; texts longer than
    # content_rules_offload_chars are matched in a thread, off the event loop.
    content_rules_budget_ms: int = Field(default=250, ge=1, le=60_000)
    content_rules_offload_chars: int = Field(default=4096, ge=0)
    # Threads for that matching (its own pool: retrieval's query embedding is not queued
    # behind it); each uses a core while it runs.
    content_rules_threads: int = Field(default=2, ge=1, le=64)


class ConsoleSettings(BaseSettings):
    """The web console's sessions (app/auth/sessions.py, docs/console.md)."""

    model_config = SettingsConfigDict(env_prefix="CONSOLE_", extra="ignore")

    session_idle_s: int = Field(default=1800, ge=30, le=86_400)  # unused this long: ended
    session_max_s: int = Field(default=43_200, ge=60, le=30 * 86_400)  # then always ended
    signin_per_minute: int = Field(default=10, ge=1, le=10_000)  # per client and key prefix


class Settings(BaseSettings):
    """All settings; build once with :func:`load_settings` and pass it down."""

    model_config = SettingsConfigDict(extra="ignore")

    server: ServerSettings = Field(default_factory=ServerSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    qdrant: QdrantSettings = Field(default_factory=QdrantSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    llm: LlmSettings = Field(default_factory=LlmSettings)
    chat: ChatSettings = Field(default_factory=ChatSettings)
    dispatch: DispatchSettings = Field(default_factory=DispatchSettings)
    quota: QuotaSettings = Field(default_factory=QuotaSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    console: ConsoleSettings = Field(default_factory=ConsoleSettings)

    @model_validator(mode="after")
    def _refuse_default_secrets(self) -> Settings:
        if self.server.env != "prod":
            return self
        problems = []
        if self.auth.key_pepper.get_secret_value() == DEV_KEY_PEPPER:
            problems.append("AUTH_KEY_PEPPER must be set to a random secret in production")
        elif len(self.auth.key_pepper.get_secret_value()) < 32:
            problems.append("AUTH_KEY_PEPPER must be at least 32 characters")
        embed_key = self.auth.embed_signing_key
        if embed_key is not None and len(embed_key.get_secret_value()) < 32:
            problems.append("AUTH_EMBED_SIGNING_KEY must be at least 32 characters")
        admin = self.auth.platform_admin_key
        if admin is None or len(admin.get_secret_value()) < 32:
            problems.append("AUTH_PLATFORM_ADMIN_KEY must be set (at least 32 characters)")
        if not (self.database.url or self.database.app_url):
            problems.append("DATABASE_APP_URL (or DATABASE_URL) must be set")
        if not self.redis.url:
            problems.append("REDIS_URL must be set")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def is_production(self) -> bool:
        """True outside the dev and test environments."""
        return self.server.env == "prod"

    def vector_path(self) -> Path:
        """Root folder of the embedded vector store's shards."""
        return self.qdrant.path or self.server.data_dir / "qdrant"


def load_settings() -> Settings:
    """Read settings from the environment (one call per process)."""
    return Settings()


def as_asyncpg_url(url: str) -> str:
    """Accept ``postgres://``, ``postgresql://`` or ``postgresql+driver://`` URLs."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"not a database URL: {url!r}")
    if scheme not in {"postgres", "postgresql"} and not scheme.startswith("postgresql+"):
        raise ValueError(f"DATABASE_URL must be a PostgreSQL URL, got scheme {scheme!r}")
    return f"postgresql+asyncpg://{rest}"
