"""FastAPI dependencies for the routers: what `create_app` put on `app.state` (the holder, the
settings, the metrics, the search engine, the pointer-watch status) and the admin check.

Routers read per-app objects from `request.app.state`, never from module globals or closures,
so several apps live side by side in one process (the tests run many) and a new router (e.g.
admin item routes) needs nothing but these imports: ``dependencies=[Depends(require_admin)]``
or a parameter ``_: AdminDep``.
"""

# no `from __future__ import annotations`: FastAPI reads these annotations at route registration.
import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .engine import SearchEngine
from .errors import ApiError
from .holder import IndexHolder
from .metrics import Metrics
from .settings import Settings
from .watch import WatchStatus


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_holder(request: Request) -> IndexHolder:
    return request.app.state.holder


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_engine(request: Request) -> SearchEngine:
    return request.app.state.engine


def get_watch(request: Request) -> WatchStatus:
    return request.app.state.watch


SettingsDep = Annotated[Settings, Depends(get_settings)]
HolderDep = Annotated[IndexHolder, Depends(get_holder)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
EngineDep = Annotated[SearchEngine, Depends(get_engine)]
WatchDep = Annotated[WatchStatus, Depends(get_watch)]

bearer = HTTPBearer(auto_error=False, description="JOINTPQ_ADMIN_TOKEN")


async def require_admin(
    settings: SettingsDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    """404 while admin is off (no token configured), 401 without a bearer token, 403 with a
    wrong one (compared in constant time)."""
    if settings.admin_token is None:
        raise ApiError(404, "admin endpoints are disabled: set JOINTPQ_ADMIN_TOKEN to enable them")
    if credentials is None:
        challenge = {"WWW-Authenticate": "Bearer"}
        raise ApiError(401, "admin token required (Authorization: Bearer ...)", headers=challenge)
    expected = settings.admin_token.get_secret_value().encode()
    if not hmac.compare_digest(credentials.credentials.encode(), expected):
        raise ApiError(403, "wrong admin token")


AdminDep = Annotated[None, Depends(require_admin)]
