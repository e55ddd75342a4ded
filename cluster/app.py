"""The Ray Serve application: a `router` ingress (the service's HTTP contract) over S shard
deployments (`shard-0` ... `shard-{S-1}`, R replicas each).

    app_builder(args)   the import path a RayService / `serve run` uses: cluster.app:app_builder
    build(...)          the same from Python (`jointpq serve --cluster`, tests)

The router runs the very app `jointpq serve` runs (`service.app.create_app`: /search bodies and
errors, /readyz, /info, /metrics, /admin/*, item writes, the pointer watcher) over a
`cluster.sharded.ShardedHolder`, so the two cannot drift apart. It encodes queries and computes the
coarse probe once per batch, fans out to one replica of each shard and merges the top-k.
Settings come from `JOINTPQ_*` environment variables (the pod's, e.g. the admin token from a
Kubernetes Secret), overridden by the app's `settings` argument.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from .shard_server import ShardServer
from .sharded import ClusterConfig, ShardedHolder

APP_NAME = "jointpq"


@serve.deployment(name="router")
@serve.ingress()
class Router:
    """The HTTP ingress. Its app is built at replica start (`__serve_build_asgi_app__`), where the
    shard handles exist; its lifespan loads the first version, as `jointpq serve` does."""

    def __init__(self, config: dict[str, Any], settings: dict[str, Any], shards: list[DeploymentHandle]):
        self.config, self.settings, self.shards = ClusterConfig(**config), settings, shards

    def __serve_build_asgi_app__(self):
        from service.app import create_app
        from service.logs import configure_logging
        from service.settings import Settings

        settings = Settings(**self.settings)
        configure_logging(settings.log_level)
        return create_app(settings, ShardedHolder(settings, self.config, list(self.shards)))


def build(
    config: ClusterConfig,
    *,
    artifact_root: str,
    settings: dict[str, Any] | None = None,
    replica_cpus: float = 1.0,
    router_cpus: float = 1.0,
    shard_threads: int | None = None,
    device: str = "cpu",
    backend: str = "auto",
    env: dict[str, str] | None = None,
) -> serve.Application:
    """The bound application: S shard deployments with `config.replicas` replicas each, and the router.

    `settings`: service settings for the router (fields of `service.settings.Settings`), over the
    environment's. `env`: environment variables for the router's process (e.g. the admin token
    when running locally; on Kubernetes it comes from the pod). Replica CPUs are Ray's scheduling
    units (fractions allowed): on one machine, S x R replicas + the router must fit its CPUs."""
    settings = {"artifact_root": artifact_root, **(settings or {})}
    shards = [
        serve.deployment(ShardServer)
        .options(
            name=f"shard-{i}",
            num_replicas=config.replicas,
            ray_actor_options={"num_cpus": replica_cpus},
            health_check_period_s=5,
            health_check_timeout_s=30,
            max_ongoing_requests=32,
        )
        .bind(str(artifact_root), i, config.shards, device, backend, shard_threads)
        for i in range(config.shards)
    ]
    options: dict[str, Any] = {"num_cpus": router_cpus}
    if env:
        options["runtime_env"] = {"env_vars": dict(env)}
    return Router.options(num_replicas=1, ray_actor_options=options, max_ongoing_requests=256).bind(
        asdict(config), settings, shards
    )


def app_builder(args: dict[str, Any]) -> serve.Application:
    """The RayService entry (`import_path: cluster.app:app_builder`); `args` from serveConfigV2:
    artifact_root, shards, replicas, pointer_file, watch, on_partial, shard_deadline_s (and any
    other `ClusterConfig` field), `settings` (a mapping of service settings), replica_cpus, router_cpus,
    shard_threads, device, backend."""
    args = dict(args)
    known = {f.name for f in fields(ClusterConfig)}
    config = ClusterConfig(**{k: args.pop(k) for k in list(args) if k in known})
    settings = dict(args.pop("settings", {}) or {})
    for key in ("pointer_file", "watch"):
        if key in args:
            settings[key] = args.pop(key)
    root = args.pop("artifact_root", None)
    if not root:
        raise ValueError("app args: artifact_root is required (the shared directory of artifact versions)")
    return build(config, artifact_root=str(root), settings=settings, **args)
