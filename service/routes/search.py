"""POST /search, as documented in the OpenAPI schema. Most requests never reach it: the
middleware's fast path calls the same `SearchEngine.answer` (see service/middleware.py); this
route serves the app without that middleware and carries the schema clients read."""

# no `from __future__ import annotations`: FastAPI reads the route's annotations at registration.
from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.responses import Response

from ..deps import EngineDep
from ..errors import unsupported_media_type
from ..middleware import is_json
from ..schemas import SEARCH_EXAMPLES, ErrorResponse, SearchResponse


async def search(request: Request, engine: EngineDep) -> Response:
    if not is_json(request.scope["headers"]):
        return unsupported_media_type()
    return await engine.answer(await request.body())


def router(request_model: type[BaseModel]) -> APIRouter:
    """The router for one app: the request schema comes from its settings (limits on k, nprobe,
    batch size, query length), so it is built per app. The body is read as bytes by
    `SearchEngine.answer`, not declared as a parameter: the schema is given explicitly."""
    search_body = {
        "required": True,
        "content": {"application/json": {"schema": request_model.model_json_schema(), "examples": SEARCH_EXAMPLES}},
    }
    r = APIRouter()
    r.add_api_route(
        "/search",
        search,
        methods=["POST"],
        response_model=SearchResponse,
        responses={
            400: {"model": ErrorResponse, "description": "an empty query, or text for an artifact without an encoder"},
            413: {"model": ErrorResponse, "description": "too many queries in one request, or the body is too large"},
            503: {"model": ErrorResponse, "description": "no artifact loaded yet"},
        },
        openapi_extra={"requestBody": search_body},
        summary="Top-k item ids for text queries or query vectors",
    )
    return r
