"""Service settings, read from `JOINTPQ_*` environment variables (pydantic-settings), so the same
image runs anywhere with configuration supplied by the deployment, never baked in."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="JOINTPQ_", extra="ignore", env_ignore_empty=True)

    artifact_root: Path = Field(Path("artifacts"), description="directory of artifact versions")
    artifact: str | None = Field(
        None, description="version (or path inside the root) to serve at start; default: the pointer, else the newest"
    )
    pointer_file: str = Field("CURRENT", description="file in the root naming the version to serve")
    watch: bool = Field(False, description="poll the pointer file and hot-reload when it changes")
    watch_interval_s: float = Field(2.0, gt=0)

    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    backend: Literal["auto", "torch", "faiss"] = "auto"
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's)")
    search_threads: int = Field(1, ge=1, le=64, description="worker threads running encode + search")

    default_k: int = Field(10, ge=1)
    max_k: int = Field(1000, ge=1)
    default_nprobe: int = Field(16, ge=1)
    max_nprobe: int = Field(4096, ge=1)
    max_batch: int = Field(256, ge=1, description="queries or vectors per request")
    max_query_chars: int = Field(2048, ge=1)
    max_body_bytes: int = Field(4 << 20, ge=1024)

    batching: bool = Field(True, description="coalesce concurrent requests into one encode + search call")
    batch_max_queries: int = Field(128, ge=1, description="largest coalesced batch")
    batch_wait_ms: float = Field(1.0, ge=0, description="how long a batch waits for company once a worker is free")
    inline_vector_search: bool = Field(
        False,
        description="with batching off, search vector queries on the event loop instead of a worker thread: "
        "no thread hand-off (measured +23-70% vector RPS), but the loop waits for each search; "
        "for sub-millisecond searches and one worker process per core",
    )

    query_cache_size: int = Field(
        10_000, ge=0, description="LRU of query embeddings per artifact (0: off); 10k x 384-d = 15 MB"
    )

    admin_token: SecretStr | None = Field(None, description="bearer token for /admin/*; admin is off when unset")
    canary_min_recall: float | None = Field(
        None, ge=0, le=1, description="quality gate on reload; default: the artifact's own min_recall"
    )

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) exceeds max_k ({self.max_k})")
        if self.default_nprobe > self.max_nprobe:
            raise ValueError(f"default_nprobe ({self.default_nprobe}) exceeds max_nprobe ({self.max_nprobe})")
        if self.admin_token is not None and len(self.admin_token.get_secret_value()) < 8:
            raise ValueError("admin_token must be at least 8 characters")
        return self
