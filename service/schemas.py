"""Request and response bodies. The search request is built from the settings so its limits
(max k, max nprobe, max query length) appear in the OpenAPI schema clients read."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .settings import Settings

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]

SEARCH_EXAMPLES: dict[str, dict[str, Any]] = {
    "text": {
        "summary": "one text query",
        "value": {"query": "vitamin D deficiency and bone density", "k": 10},
    },
    "batch": {
        "summary": "several text queries",
        "value": {"queries": ["aspirin lowers stroke risk", "gene expression in T cells"], "k": 5, "nprobe": 32},
    },
    "vector": {"summary": "one pre-encoded query vector (the artifact's dim)", "value": {"vector": [0.1, -0.2, 0.3]}},
    "vectors": {"summary": "several pre-encoded vectors", "value": {"vectors": [[0.1, -0.2, 0.3], [0.0, 0.5, -0.1]]}},
}


def search_request_model(s: Settings) -> type[BaseModel]:
    Text = Annotated[str, Field(max_length=s.max_query_chars)]

    class SearchRequest(BaseModel):
        """Exactly one of `query`, `queries`, `vector`, `vectors`; `k` and `nprobe` are optional."""

        model_config = ConfigDict(extra="forbid", strict=True)

        query: Text | None = Field(None, description="one text query (the artifact must hold a query encoder)")
        queries: list[Text] | None = Field(None, description=f"several text queries (at most {s.max_batch})")
        vector: list[FiniteFloat] | None = Field(None, description="one query vector of the artifact's dimension")
        vectors: list[list[FiniteFloat]] | None = Field(None, description=f"several vectors (at most {s.max_batch})")
        k: int | None = Field(None, ge=1, le=s.max_k, description=f"hits per query (default {s.default_k})")
        nprobe: int | None = Field(
            None, ge=1, le=s.max_nprobe, description=f"cells to scan (default {s.default_nprobe}; capped at nlist)"
        )

        @model_validator(mode="after")
        def _exactly_one(self) -> SearchRequest:
            given = [f for f in ("query", "queries", "vector", "vectors") if getattr(self, f) is not None]
            if len(given) != 1:
                raise ValueError(f"give exactly one of query, queries, vector, vectors (got {given or 'none'})")
            return self

    return SearchRequest


class QueryResult(BaseModel):
    ids: list[str] = Field(description="item ids, best first")
    scores: list[float] = Field(description="inner products (descending) or squared L2 distances (ascending)")


class Coverage(BaseModel):
    answered: int = Field(description="shards whose top-k is merged into these results")
    shards: int = Field(description="shards of the served version (S)")
    partial: bool = Field(description="true when a shard missed its deadline: results hold only the others' items")


class SearchResponse(BaseModel):
    version: str = Field(description="the artifact version that produced every result in this response")
    k: int
    nprobe: int = Field(description="cells actually scanned (the request's, capped at the artifact's nlist)")
    took_ms: float
    results: list[QueryResult] = Field(description="one entry per query, in request order")
    coverage: Coverage | None = Field(
        None, description="sharded serving only (`jointpq serve --cluster`): how many shards answered"
    )

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "version": "scifact-demo-v1",
                    "k": 2,
                    "nprobe": 16,
                    "took_ms": 3.1,
                    "results": [{"ids": ["4983", "1281"], "scores": [0.71, 0.64]}],
                }
            ]
        }
    )


class FieldError(BaseModel):
    field: str
    message: str


class ErrorResponse(BaseModel):
    error: str = Field(description="what went wrong, naming the field where there is one")
    detail: list[FieldError] | None = None


class ReloadRequest(BaseModel):
    """Exactly one of `version` (a directory name in the artifact root) or `path` (relative to it)."""

    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"examples": [{"version": "scifact-v2"}, {"path": "team/v7"}]}
    )

    version: str | None = Field(None, min_length=1, max_length=255, pattern=r"^[^/\\]+$")
    path: str | None = Field(None, min_length=1, max_length=1024)

    @model_validator(mode="after")
    def _exactly_one(self) -> ReloadRequest:
        if (self.version is None) == (self.path is None):
            raise ValueError("give exactly one of version, path")
        return self

    @property
    def name(self) -> str:
        return self.version if self.version is not None else self.path  # type: ignore[return-value]


class ReloadResponse(BaseModel):
    version: str
    previous: str | None
    took_ms: float
    checks: dict[str, Any]


class InfoResponse(BaseModel):
    ready: bool
    artifact: dict[str, Any] | None
    previous_version: str | None
    uptime_s: float
    settings: dict[str, Any]


def item_models(s: Settings) -> tuple[type[BaseModel], type[BaseModel]]:
    """(UpsertRequest, DeleteRequest) with the settings' limits, as the search request is built."""
    Id = Annotated[str, Field(min_length=1, max_length=s.max_id_chars)]

    class ItemIn(BaseModel):
        """One item: its id and exactly one of `text` (encoded by the artifact's item tower) or
        `vector` (the item embedding, the artifact's dimension)."""

        model_config = ConfigDict(extra="forbid", strict=True)

        id: Id
        text: str | None = Field(None, min_length=1, max_length=s.max_item_chars)
        vector: list[FiniteFloat] | None = Field(None, min_length=1)

        @model_validator(mode="after")
        def _exactly_one(self) -> ItemIn:
            if (self.text is None) == (self.vector is None):
                raise ValueError("give exactly one of text, vector")
            return self

    class UpsertRequest(BaseModel):
        """Insert or replace items; an existing id is replaced. At most `max_batch` a request."""

        model_config = ConfigDict(extra="forbid", strict=True)
        items: list[ItemIn] = Field(min_length=1, max_length=s.max_batch)

    class DeleteRequest(BaseModel):
        """Delete items by id; ids not present are reported in the answer, not an error."""

        model_config = ConfigDict(extra="forbid", strict=True)
        ids: list[Id] = Field(min_length=1, max_length=s.max_batch)

    return UpsertRequest, DeleteRequest


class UpsertResponse(BaseModel):
    upserted: int
    seq: int = Field(description="the write-ahead-log sequence number of this batch")
    version: str
    items: int = Field(description="items searchable after this batch")


class DeleteResponse(BaseModel):
    deleted: int
    unknown: list[str] = Field(description="ids that were not present")
    seq: int | None
    version: str
    items: int


class CompactResponse(BaseModel):
    compacted: bool
    version: str
    previous: str | None = None
    applied_seq: int | None = None
    log_records_kept: int | None = None
    took_ms: float
