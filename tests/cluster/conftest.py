"""One real local Ray cluster for all Ray tests (starting one costs seconds): 2 CPUs, as CI has."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A local Ray instance (`ray.init(num_cpus=2)`), shut down at the end of the session.
    Skips with the reason when the `cluster` extra (Ray) is not installed."""
    ray = pytest.importorskip("ray", reason="the cluster extra is not installed: pip install 'jointpq[cluster]'")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 _temp_dir=str(tmp_path_factory.mktemp("ray")))  # fmt: skip
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # serve never started
        pass
    ray.shutdown()
