"""Service settings, read from `JOINTPQ_*` environment variables (pydantic-settings), so the same
image runs anywhere with configuration supplied by the deployment, never baked in."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "JOINTPQ_"


def env_name(field: str) -> str:
    """The environment variable that sets `field`: admin_token -> JOINTPQ_ADMIN_TOKEN."""
    return f"{ENV_PREFIX}{field.upper()}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", env_ignore_empty=True)

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
    encoder_runtime: Literal["auto", "torch", "onnx"] = Field(
        "auto",
        description="query encoder engine: auto = ONNX Runtime where it measured faster (MiniLM on CPU) and the "
        "artifact ships a graph that checks out, else torch; onnx = refuse an artifact whose graph cannot serve",
    )
    encoder_threads: int | None = Field(
        None, ge=1, description="ONNX Runtime intra-op threads (default: torch_threads, else one per core)"
    )

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

    query_cache_size: int = Field(10_000, ge=0, description="LRU of query embeddings per artifact (0: off)")
    query_cache_bytes: int = Field(
        64 << 20, ge=0, description="memory bound of that cache, keys and vectors counted (10k x 384-d ~ 16 MB)"
    )
    max_vector_norm: float = Field(
        1e15,
        gt=0,
        le=1e18,
        description="largest L2 norm a query vector may have: far above any embedding, far below where "
        "float32 scores overflow (a 3e38 vector is finite yet its scores are not)",
    )
    request_piece_queries: int = Field(
        32, ge=1, description="a request with more queries is run in pieces of this many, others' pieces between"
    )
    request_piece_chars: int = Field(
        4096, ge=1, description="and in pieces of at most this many characters of text (the encoder's cost)"
    )

    timeout_keep_alive_s: int = Field(5, ge=1, description="close an idle keep-alive connection after this")
    header_timeout_s: float = Field(
        10.0, gt=0, description="close a connection whose request line and headers are not in by then"
    )
    body_timeout_s: float = Field(10.0, gt=0, description="answer 408 when the body is not in by then")
    limit_concurrency: int | None = Field(
        1024, ge=1, description="open connections + requests in flight per worker before new requests get 503"
    )

    wal_fsync: bool = Field(
        True, description="fsync the item-update log before a write is answered (off: a crash may lose acked writes)"
    )
    max_item_chars: int = Field(16384, ge=1, description="longest item text POST /admin/items accepts")
    max_id_chars: int = Field(512, ge=1, description="longest item id")
    admin_token: SecretStr | None = Field(None, description="bearer token for /admin/*; admin is off when unset")
    canary_min_recall: float | None = Field(
        None, ge=0, le=1, description="quality gate on reload; default: the artifact's own min_recall"
    )

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("admin_token")
    @classmethod
    def _long_enough(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < 8:  # the token itself is never echoed
            raise ValueError(f"must be at least 8 characters, got {len(v.get_secret_value())}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        """Cross-field rules; the message names both variables (the error has no single field)."""
        for low, high in (("default_k", "max_k"), ("default_nprobe", "max_nprobe")):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(
                    f"{env_name(low)} ({getattr(self, low)}) exceeds {env_name(high)} ({getattr(self, high)})"
                )
        return self


def describe_errors(e: ValidationError, flags: dict[str, str] | None = None) -> list[str]:
    """One line per settings error naming what the user set: the flag when one was given
    (`flags`: field -> flag, e.g. {"port": "--port"}), else the environment variable."""
    flags = flags or {}
    lines = []
    for err in e.errors(include_url=False):
        loc = [str(part) for part in err["loc"]]
        msg = err["msg"].removeprefix("Value error, ")
        if not loc:  # a cross-field rule: its message already names the variables
            lines.append(msg)
            continue
        field = loc[0]
        where = f"{flags[field]} ({env_name(field)})" if field in flags else env_name(field)
        lines.append(f"{where}{''.join(f'[{p}]' for p in loc[1:])}: {msg}")
    return lines
