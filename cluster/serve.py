"""`jointpq serve --cluster`: deploy the sharded application on a Ray cluster and keep it up.

Starts a local Ray (or joins `--address`), starts Serve's HTTP proxy on --host/--port and deploys
`cluster.app.build(...)` as application "jointpq". Service settings come from the same flags and
`JOINTPQ_*` variables as `jointpq serve` (the router runs the same app). Runs until SIGINT/SIGTERM,
then deletes the application and, when it started Ray itself, stops Ray.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import threading

from .sharded import ClusterConfig


def replica_cpus(shards: int, replicas: int, cpus: float) -> float:
    """Ray CPUs per replica so S x R shard replicas and the router fit `cpus` (capped at 1): Ray
    would otherwise leave replicas pending forever on a small machine."""
    return min(1.0, math.floor(1000 * cpus / (shards * replicas + 1)) / 1000)  # rounded down: they must fit


def run_cluster(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from service.logs import configure_logging
    from service.serve import settings_from_flags

    from .app import APP_NAME, build

    for flag, v in (("--shards", args.shards), ("--replicas", args.replicas), ("--replica-cpus", args.replica_cpus)):
        if v is not None and v <= 0:
            raise ValueError(f"{flag} must be > 0, got {v}")
    if args.shard_deadline_s is not None and args.shard_deadline_s <= 0:
        raise ValueError(f"--shard-deadline-s must be > 0, got {args.shard_deadline_s}")
    settings = settings_from_flags(args)
    if settings is None:
        return 2
    config = ClusterConfig(
        shards=args.shards if args.shards is not None else 1,
        replicas=args.replicas if args.replicas is not None else 1,
        on_partial=args.on_partial or "partial",
        shard_deadline_s=args.shard_deadline_s if args.shard_deadline_s is not None else 5.0,
    )
    configure_logging(settings.log_level)
    started = not ray.is_initialized()
    if started:
        ray.init(address=args.address, include_dashboard=False) if args.address else ray.init(include_dashboard=False)
    cpus = args.replica_cpus or replica_cpus(config.shards, config.replicas, ray.cluster_resources().get("CPU", 1))
    env = {k: v for k, v in os.environ.items() if k.startswith("JOINTPQ_")}  # flags were written there too
    serve.start(http_options={"host": settings.host, "port": settings.port})
    device = "cpu" if settings.device == "auto" else settings.device
    app = build(
        config, artifact_root=str(settings.artifact_root.resolve()), replica_cpus=cpus, router_cpus=cpus,
        shard_threads=settings.torch_threads or 1, device=device, backend=settings.backend, env=env,
    )  # fmt: skip
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    print(f"jointpq cluster: {config.shards} shards x {config.replicas} replicas at "
          f"http://{settings.host}:{settings.port} (Ray {ray.__version__}; Ctrl-C stops)", flush=True)  # fmt: skip
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.delete(APP_NAME)
    if started:
        serve.shutdown()
        ray.shutdown()
    return 0
