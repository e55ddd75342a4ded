"""The HTTP routes, one `APIRouter` per concern, included by `service.app.create_app`:

    search   POST /search (the documented route; the middleware's fast path answers it the same)
    ops      GET /healthz, /readyz, /info, /metrics
    admin    POST /admin/reload, /admin/rollback (bearer token: `service.deps.require_admin`)

Routers take what they need from `service.deps` (objects on `app.state`) and fail through
`service.errors`, so a new one is a module here plus one `include_router` line in create_app.
"""
