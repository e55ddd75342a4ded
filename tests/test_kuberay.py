"""kuberay/rayservice.yaml, checked statically (no cluster, no network): the RayService validates
against KubeRay's own CRD schema (vendored in tests/data/kuberay/), every key in it is one the
schema declares (Kubernetes prunes unknown fields instead of failing, so a typo would be dropped
silently), the operator's own rules hold, the Serve config validates with Ray's schema, and the
manifest agrees with the application: deployments router + shard-0..S-1, R replicas each, the
artifact volume at args.artifact_root (read-write only where the router writes the item log), the
admin token from a Secret, replicas that fit their pods. The negative tests prove each check fails."""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import jsonschema
import pytest
import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "kuberay" / "rayservice.yaml"
SCHEMA = ROOT / "tests" / "data" / "kuberay" / "rayservice-v1-schema.json"
KUBERAY_VERSION = "v1.7.0"

APP_ARGS = {"artifact_root", "shards", "replicas", "pointer_file", "watch", "on_partial", "shard_deadline_s"}
# in the v1 schema, but ignored by KubeRay since v1.1 (ray-project/kuberay#1685): setting them misleads
DEPRECATED = {"serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold"}
UPGRADE_TYPES = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}
# the top-level metadata is an ObjectMeta the API server validates; the CRD schema says only "object"
OBJECT_META = {"name", "namespace", "labels", "annotations"}
MAX_RAYSERVICE_NAME = 47  # MaxRayClusterNameLength (53) - 6, utils/constant.go
DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
RAY_RESOURCE_PARAMS = ("num-cpus", "num-gpus", "memory", "resources")
UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


# ---------------------------------------------------------------------------------------------- loading


def load_docs(text: str | None = None) -> list[dict]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text() if text is None else text) if d is not None]


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(SCHEMA.read_text())


@pytest.fixture()
def docs() -> list[dict]:
    return load_docs()


def find(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def serve_config(rs: dict) -> dict:
    return yaml.safe_load(rs["spec"]["serveConfigV2"])


def set_serve_config(rs: dict, cfg: dict) -> None:
    rs["spec"]["serveConfigV2"] = yaml.safe_dump(cfg, sort_keys=False)


def quantity(q: object) -> float:
    """A Kubernetes quantity ("2", "500m", "4Gi") as a number (cores or bytes)."""
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([a-zA-Z]*)", str(q))
    assert m and m[2] in UNITS, f"not a quantity: {q!r}"
    return float(m[1]) * UNITS[m[2]]


def pods(spec: dict) -> Iterator[tuple[str, dict]]:
    """(group name, group spec) for the head ("head") and every worker group."""
    cluster = spec.get("rayClusterConfig", {})
    yield "head", cluster.get("headGroupSpec", {})
    for group in cluster.get("workerGroupSpecs", []):
        yield group.get("groupName", "?"), group


# ---------------------------------------------------------------------------------------------- checks


def schema_errors(rs: dict, schema: dict) -> list[str]:
    """The CRD's openAPIV3Schema, as jsonschema reads it (x-kubernetes-* extensions are ignored)."""
    validator = jsonschema.Draft7Validator(schema)
    errors = []
    for e in validator.iter_errors(rs):
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.absolute_path).lstrip(".")
        errors.append(f"{path or '<root>'}: {e.message}")
    return errors


def undeclared_keys(node: object, schema: dict, path: str = "") -> list[str]:
    """Keys the schema does not declare, at every level: what a structural schema would prune."""
    errors: list[str] = []
    if node is None:
        return [f"{path or '<root>'}: null (left empty?)"]
    if isinstance(node, dict):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if props is not None:
                if key not in props:
                    errors.append(f"{where}: not in the schema (Kubernetes would drop it)")
                else:
                    errors += undeclared_keys(value, props[key], where)
            elif isinstance(extra, dict):  # a map: any key, values by the schema
                errors += undeclared_keys(value, extra, where)
            elif extra is True or schema.get("x-kubernetes-preserve-unknown-fields"):
                continue
            elif path == "metadata":
                if key not in OBJECT_META:
                    errors.append(f"{where}: not an ObjectMeta field this manifest expects")
            else:
                errors.append(f"{where}: the schema declares no fields here (Kubernetes would drop it)")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            errors += undeclared_keys(item, schema.get("items", {}), f"{path}[{i}]")
    return errors


def operator_errors(rs: dict) -> list[str]:
    """What the operator checks beyond the schema (ray-operator/controllers/ray/utils/validation.go)."""
    errors = []
    name = rs.get("metadata", {}).get("name", "")
    if len(name) > MAX_RAYSERVICE_NAME or not DNS1035.fullmatch(name):
        errors.append(f"metadata.name {name!r}: a DNS-1035 label of at most {MAX_RAYSERVICE_NAME} characters")
    spec = rs.get("spec", {})
    errors += [f"spec.{k}: deprecated, ignored by KubeRay (kuberay#1685)" for k in DEPRECATED & set(spec)]
    kind = spec.get("upgradeStrategy", {}).get("type")
    if kind is not None and kind not in UPGRADE_TYPES:
        errors.append(f"spec.upgradeStrategy.type {kind!r} not in {sorted(UPGRADE_TYPES)}")
    if spec.get("rayClusterDeletionDelaySeconds", 0) < 0:
        errors.append("spec.rayClusterDeletionDelaySeconds: negative")
    cluster = spec.get("rayClusterConfig", {})
    autoscaling = cluster.get("enableInTreeAutoscaling", False)
    names = [g.get("groupName") for g in cluster.get("workerGroupSpecs", [])]
    if len(names) != len(set(names)):
        errors.append(f"worker group names repeat: {names}")
    for group_name, group in pods(spec):
        if not group.get("template", {}).get("spec", {}).get("containers"):
            errors.append(f"{group_name}: no container")
        params = group.get("rayStartParams", {})
        if any(params.get(p) for p in RAY_RESOURCE_PARAMS) and group.get("resources"):
            errors.append(f"{group_name}: resources in both rayStartParams and resources")
        if "labels" in params:
            errors.append(f"{group_name}: rayStartParams['labels'] is not supported, use labels")
        for key, value in group.get("labels", {}).items():
            prefix, _, label = key.rpartition("/")
            if (
                (prefix and not DNS1123_SUBDOMAIN.fullmatch(prefix))
                or len(label) > 63
                or not LABEL_NAME.fullmatch(label)
            ):
                errors.append(f"{group_name}: label key {key!r} is not a qualified name")
            if value and (len(value) > 63 or not LABEL_NAME.fullmatch(value)):
                errors.append(f"{group_name}: label value {value!r} is not a label value")
        if group_name == "head":
            continue
        lo, hi, n = group.get("minReplicas"), group.get("maxReplicas"), group.get("replicas")
        if not autoscaling and (lo is None or hi is None):
            errors.append(f"{group_name}: minReplicas and maxReplicas are required without the autoscaler")
        elif isinstance(lo, int) and isinstance(hi, int) and not 0 <= lo <= (n if isinstance(n, int) else lo) <= hi:
            errors.append(f"{group_name}: needs 0 <= minReplicas <= replicas <= maxReplicas, got {lo}, {n}, {hi}")
    return errors


def app_errors(docs: list[dict]) -> list[str]:
    """The manifest against the application's interface (cluster.app:app_builder) and itself."""
    rss, pvcs = find(docs, "RayService"), find(docs, "PersistentVolumeClaim")
    if len(rss) != 1:
        return [f"expected one RayService, found {len(rss)}"]
    spec = rss[0].get("spec", {})
    if "serveConfigV2" not in spec:
        return ["spec.serveConfigV2 missing"]
    cfg = serve_config(rss[0])
    errors = []
    apps = cfg.get("applications", [])
    if len(apps) != 1:
        return [f"expected one Serve application, found {len(apps)}"]
    app = apps[0]
    if app.get("name") != "jointpq" or app.get("import_path") != "cluster.app:app_builder":
        errors.append(f"application {app.get('name')!r} imports {app.get('import_path')!r}")
    if app.get("route_prefix") != "/":
        errors.append(f"route_prefix {app.get('route_prefix')!r}, expected '/'")
    args = app.get("args", {})
    if set(args) != APP_ARGS:
        errors.append(f"args {sorted(args)} != {sorted(APP_ARGS)}")
    shards, replicas, root = args.get("shards"), args.get("replicas"), args.get("artifact_root")
    if not (isinstance(shards, int) and isinstance(replicas, int) and shards >= 1 and replicas >= 1):
        return [*errors, f"args.shards {shards!r} and args.replicas {replicas!r} must be positive ints"]
    if not (isinstance(root, str) and root.startswith("/")):
        errors.append(f"args.artifact_root {root!r}: an absolute path inside the pods")
    if args.get("on_partial") not in ("partial", "503") or not isinstance(args.get("watch"), bool):
        errors.append(f"args.on_partial {args.get('on_partial')!r} / args.watch {args.get('watch')!r}")
    deadline = args.get("shard_deadline_s")
    if isinstance(deadline, bool) or not isinstance(deadline, int | float) or deadline <= 0:
        errors.append(f"args.shard_deadline_s {deadline!r}: a positive number of seconds")
    if not isinstance(args.get("pointer_file"), str) or not args.get("pointer_file"):
        errors.append("args.pointer_file: a file name")

    deployments = {d.get("name"): d for d in app.get("deployments", [])}
    expected = {"router"} | {f"shard-{i}" for i in range(shards)}
    if set(deployments) != expected:
        errors.append(f"deployments {sorted(deployments)} != {sorted(expected)}")
    for name in sorted(expected & set(deployments)):
        if name != "router" and deployments[name].get("num_replicas") != replicas:
            errors.append(f"{name}: num_replicas {deployments[name].get('num_replicas')} != args.replicas {replicas}")
        for key in ("health_check_period_s", "health_check_timeout_s"):
            if key not in deployments[name]:
                errors.append(f"{name}: {key} not set")

    # placement: every deployment selects one worker group by its Ray node labels, and fits there
    groups = {name: g for name, g in pods(spec) if name != "head"}
    hosts: dict[str, str] = {}
    load: dict[str, list[float]] = {name: [0.0, 0.0] for name in groups}
    for name, dep in deployments.items():
        opts = dep.get("ray_actor_options", {})
        selector = opts.get("label_selector") or {}
        matches = [
            g for g, spec_g in groups.items() if selector and selector.items() <= spec_g.get("labels", {}).items()
        ]
        if len(matches) != 1:
            errors.append(f"{name}: label_selector {selector} matches worker groups {matches}, expected one")
            continue
        hosts[name] = group = matches[0]
        pods_n, n = groups[group].get("replicas"), dep.get("num_replicas", 1)
        if not (isinstance(pods_n, int) and isinstance(n, int)):
            continue  # not ints: the schema (and Ray's) says so
        per_pod = math.ceil(n / pods_n) if pods_n else math.inf
        if per_pod > dep.get("max_replicas_per_node", math.inf):
            errors.append(f"{name}: {dep.get('num_replicas')} replicas on {pods_n} pods of {group}, max 1 per pod")
        load[group][0] += per_pod * opts.get("num_cpus", 1)
        load[group][1] += per_pod * opts.get("memory", 0)
    for name, group in groups.items():
        params = group.get("rayStartParams", {})
        limits = (
            group.get("template", {}).get("spec", {}).get("containers", [{}])[0].get("resources", {}).get("limits", {})
        )
        if "cpu" not in limits or "memory" not in limits:
            errors.append(f"{name}: the Ray container needs cpu and memory limits")
            continue
        cpus = float(params["num-cpus"]) if "num-cpus" in params else math.ceil(quantity(limits["cpu"]))
        memory = quantity(limits["memory"]) - float(params.get("object-store-memory", 0.3 * quantity(limits["memory"])))
        if cpus > quantity(limits["cpu"]):
            errors.append(f"{name}: num-cpus {cpus} over the pod's cpu limit {limits['cpu']}")
        if load[name][0] > cpus or load[name][1] > memory:
            errors.append(
                f"{name}: a pod holds {load[name][0]} CPU, {load[name][1] / 2**30:.2f} GiB of replicas; "
                f"it has {cpus} CPU, {memory / 2**30:.2f} GiB (limit - object store)"
            )
    head_params = spec.get("rayClusterConfig", {}).get("headGroupSpec", {}).get("rayStartParams", {})
    if head_params.get("num-cpus") != "0":
        errors.append("head: rayStartParams num-cpus must be '0' (no replicas next to the GCS)")

    # the artifact volume: an RWX claim, mounted at args.artifact_root in every Ray pod, read-write
    # only in the group hosting the router (it appends the item-update log)
    claims = {p.get("metadata", {}).get("name"): p for p in pvcs}
    for claim in claims.values():
        if claim.get("spec", {}).get("accessModes") != ["ReadWriteMany"]:
            errors.append(f"PVC {claim['metadata'].get('name')}: must be ReadWriteMany (pods on many nodes)")
    writers = {hosts.get("router")}
    for name, group in pods(spec):
        pod = group.get("template", {}).get("spec", {})
        vols = {v["name"]: v["persistentVolumeClaim"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        if not vols:
            errors.append(f"{name}: no artifact volume")
        for vol, claim in vols.items():
            if claim.get("claimName") not in claims:
                errors.append(f"{name}: volume {vol} claims {claim.get('claimName')!r}, not a PVC of this file")
            if claim.get("readOnly", False) != (name not in writers):
                errors.append(f"{name}: volume {vol} readOnly should be {name not in writers}")
        for container in pod.get("containers", []):
            for mount in container.get("volumeMounts", []):
                if mount.get("name") not in vols:
                    continue
                if mount.get("mountPath") != root:
                    errors.append(f"{name}: {mount['name']} mounted at {mount.get('mountPath')}, not {root}")
                if mount.get("readOnly", False) != (name not in writers):
                    errors.append(f"{name}: {mount['name']} mount readOnly should be {name not in writers}")

    # the admin token: from a Secret, in the router's pods; every JOINTPQ_* variable is a setting
    settings = {f"JOINTPQ_{field.upper()}" for field in Settings.model_fields}
    for name, group in pods(spec):
        env = {
            e["name"]: e
            for c in group.get("template", {}).get("spec", {}).get("containers", [])
            for e in c.get("env", [])
        }
        errors += [
            f"{name}: {var} is not a setting" for var in env if var.startswith("JOINTPQ_") and var not in settings
        ]
        token = env.get("JOINTPQ_ADMIN_TOKEN")
        if token is not None and "secretKeyRef" not in token.get("valueFrom", {}):
            errors.append(f"{name}: JOINTPQ_ADMIN_TOKEN must come from a Secret (secretKeyRef), not a literal")
        if name == hosts.get("router") and token is None:
            errors.append(f"{name}: hosts the router but has no JOINTPQ_ADMIN_TOKEN")

    # probes on every Ray container; a worker is ready only when its Serve proxy is (as KubeRay's own)
    port = cfg.get("http_options", {}).get("port", 8000)
    for name, group in pods(spec):
        containers = group.get("template", {}).get("spec", {}).get("containers", [])
        if not containers:
            continue
        ray = containers[0]
        if not ray.get("livenessProbe") or not ray.get("readinessProbe"):
            errors.append(f"{name}: the Ray container needs liveness and readiness probes")
            continue
        if name != "head":
            ports = {p.get("name"): p.get("containerPort") for p in ray.get("ports", [])}
            if ports.get("serve") != port:
                errors.append(f"{name}: container port 'serve' {ports.get('serve')} != Serve's http port {port}")
            probe = " ".join(ray["readinessProbe"].get("exec", {}).get("command", []))
            if f":{port}/-/healthz" not in probe:
                errors.append(f"{name}: the readiness probe does not check the Serve proxy at :{port}/-/healthz")
    return errors


def manifest_errors(docs: list[dict], schema: dict) -> list[str]:
    rss = find(docs, "RayService")
    if len(rss) != 1:
        return [f"expected one RayService, found {len(rss)}"]
    rs = rss[0]
    errors = [
        f"{d.get('kind')}: apiVersion {d.get('apiVersion')}"
        for d in docs
        if (d.get("kind"), d.get("apiVersion")) not in {("RayService", "ray.io/v1"), ("PersistentVolumeClaim", "v1")}
    ]
    errors += schema_errors(rs, schema) + undeclared_keys(rs, schema)
    for check in (operator_errors, app_errors):
        try:
            errors += check(docs) if check is app_errors else check(rs)
        except (KeyError, TypeError, AttributeError, ValueError) as e:  # a shape the schema errors above explain
            errors.append(f"{check.__name__}: could not check ({type(e).__name__}: {e})")
    return errors


def serve_errors(cfg: dict) -> list[str]:
    """serveConfigV2 with Ray's own schema, plus the same undeclared-key walk (pydantic ignores extras)."""
    from pydantic import ValidationError
    from ray.serve.schema import (
        DeploymentSchema,
        HTTPOptionsSchema,
        RayActorOptionsSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
    )

    try:
        ServeDeploySchema.model_validate(cfg)
    except ValidationError as e:
        return [f"ServeDeploySchema: {err['loc']}: {err['msg']}" for err in e.errors()]

    def unknown(node: dict, model: type, where: str) -> list[str]:
        known = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
        return [f"{where}.{k}: not a {model.__name__} field (Ray would ignore it)" for k in node if k not in known]

    errors = unknown(cfg, ServeDeploySchema, "serveConfigV2")
    errors += unknown(cfg.get("http_options", {}), HTTPOptionsSchema, "http_options")
    for i, app in enumerate(cfg.get("applications", [])):
        errors += unknown(app, ServeApplicationSchema, f"applications[{i}]")
        for dep in app.get("deployments", []):
            where = f"applications[{i}].{dep.get('name')}"
            errors += unknown(dep, DeploymentSchema, where)
            errors += unknown(dep.get("ray_actor_options", {}), RayActorOptionsSchema, f"{where}.ray_actor_options")
    return errors


# ---------------------------------------------------------------------------------------------- tests


def test_vendored_schema_is_the_rayservice_v1_schema(schema):
    jsonschema.Draft7Validator.check_schema(schema)
    assert KUBERAY_VERSION in schema["$comment"] and "Apache-2.0" in schema["$comment"]
    spec = schema["properties"]["spec"]
    assert spec["required"] == ["rayClusterConfig"]
    assert {"serveConfigV2", "rayClusterConfig", "upgradeStrategy"} <= set(spec["properties"])
    assert KUBERAY_VERSION in (SCHEMA.parent / "README.md").read_text()


def test_manifest_is_valid(docs, schema):
    assert sorted(d["kind"] for d in docs) == ["PersistentVolumeClaim", "RayService"]
    assert manifest_errors(docs, schema) == []


def test_serve_config_validates_with_rays_schema(docs):
    pytest.importorskip("ray.serve")
    assert serve_errors(serve_config(find(docs, "RayService")[0])) == []


def test_ray_version_matches_the_images_pin(docs):
    """The image installs Ray at the version docker/constraints.txt pins; rayVersion must say the same
    (KubeRay picks its probes and commands by it), and our probes use /api/healthz, which needs Ray >= 2.53."""
    version = find(docs, "RayService")[0]["spec"]["rayClusterConfig"]["rayVersion"]
    assert tuple(int(p) for p in version.split(".")[:2]) >= (2, 53)
    pins = re.findall(r"^ray==([0-9.]+)$", (ROOT / "docker" / "constraints.txt").read_text(), re.MULTILINE)
    assert pins == [version]


def _rs(docs: list[dict]) -> dict:
    return find(docs, "RayService")[0]


def _spec(docs: list[dict]) -> dict:
    return _rs(docs)["spec"]


def _group(docs: list[dict], name: str) -> dict:
    return next(g for g in _spec(docs)["rayClusterConfig"]["workerGroupSpecs"] if g["groupName"] == name)


def _edit_serve(docs: list[dict], edit: Callable[[dict], None]) -> None:
    cfg = serve_config(_rs(docs))
    edit(cfg)
    set_serve_config(_rs(docs), cfg)


def _app(cfg: dict) -> dict:
    return cfg["applications"][0]


def _dep(cfg: dict, name: str) -> dict:
    return next(d for d in _app(cfg)["deployments"] if d["name"] == name)


def _rename(d: dict, old: str, new: str) -> None:
    d[new] = d.pop(old)


MUTATIONS: dict[str, tuple[Callable[[list[dict]], None], str]] = {
    "misspelt serveConfigV2": (
        lambda docs: _rename(_spec(docs), "serveConfigV2", "serveConfigv2"),
        "spec.serveConfigv2: not in the schema",
    ),
    "misspelt field in the pod template": (
        lambda docs: _rename(_group(docs, "shard")["template"]["spec"]["containers"][0], "volumeMounts", "volumeMount"),
        "volumeMount: not in the schema",
    ),
    "string where an int goes": (
        lambda docs: _group(docs, "shard").update(replicas="2"),
        "'2' is not of type 'integer'",
    ),
    "int where a string goes": (
        lambda docs: _spec(docs)["rayClusterConfig"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
        "0 is not of type 'string'",
    ),
    "missing required groupName": (
        lambda docs: _group(docs, "router").pop("groupName"),
        "'groupName' is a required property",
    ),
    "deprecated threshold": (lambda docs: _spec(docs).update(serviceUnhealthySecondThreshold=900), "deprecated"),
    "unknown upgrade type": (
        lambda docs: _spec(docs)["upgradeStrategy"].update(type="Rolling"),
        "upgradeStrategy.type",
    ),
    "minReplicas over maxReplicas": (
        lambda docs: _group(docs, "router").update(minReplicas=5),
        "minReplicas <= replicas <= maxReplicas",
    ),
    "wrong import path": (
        lambda docs: _edit_serve(docs, lambda c: _app(c).update(import_path="cluster.app:app")),
        "imports 'cluster.app:app'",
    ),
    "shard replicas != args.replicas": (
        lambda docs: _edit_serve(docs, lambda c: _app(c)["args"].update(replicas=3)),
        "num_replicas 2 != args.replicas 3",
    ),
    "a shard deployment missing": (
        lambda docs: _edit_serve(docs, lambda c: _app(c)["args"].update(shards=3)),
        "deployments ['router', 'shard-0', 'shard-1'] != ['router', 'shard-0', 'shard-1', 'shard-2']",
    ),
    "mount elsewhere than artifact_root": (
        lambda docs: _edit_serve(docs, lambda c: _app(c)["args"].update(artifact_root="/data")),
        "mounted at /artifacts, not /data",
    ),
    "shards mount read-write": (
        lambda docs: _group(docs, "shard")["template"]["spec"]["containers"][0]["volumeMounts"][0].pop("readOnly"),
        "shard: artifacts mount readOnly should be True",
    ),
    "RWO claim": (
        lambda docs: find(docs, "PersistentVolumeClaim")[0]["spec"].update(accessModes=["ReadWriteOnce"]),
        "must be ReadWriteMany",
    ),
    "literal admin token": (
        lambda docs: _group(docs, "router")["template"]["spec"]["containers"][0]["env"][0].update(
            value="not-a-secret", valueFrom={}
        ),
        "must come from a Secret",
    ),
    "shards do not fit their pods": (
        lambda docs: _edit_serve(docs, lambda c: _dep(c, "shard-1")["ray_actor_options"].update(memory=6 * 2**30)),
        "shard: a pod holds",
    ),
    "router selects no group": (
        lambda docs: _edit_serve(
            docs, lambda c: _dep(c, "router")["ray_actor_options"].update(label_selector={"jointpq-role": "ingress"})
        ),
        "matches worker groups []",
    ),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_mutated_manifest_is_rejected(docs, schema, mutation):
    mutate, expected = MUTATIONS[mutation]
    mutate(docs)
    errors = manifest_errors(docs, schema)
    assert any(expected in e for e in errors), f"{mutation}: {expected!r} not in {errors}"


def test_schema_alone_lets_a_misspelt_field_through(docs, schema):
    """Why the undeclared-key walk exists: jsonschema, like Kubernetes, accepts unknown fields."""
    _rename(_spec(docs), "serveConfigV2", "serveConfigv2")
    assert schema_errors(_rs(docs), schema) == []
    assert undeclared_keys(_rs(docs), schema) == ["spec.serveConfigv2: not in the schema (Kubernetes would drop it)"]


SERVE_MUTATIONS: dict[str, tuple[Callable[[dict], None], str]] = {
    "misspelt num_replicas": (
        lambda c: _rename(_dep(c, "shard-0"), "num_replicas", "num_replica"),
        "num_replica: not a DeploymentSchema field",
    ),
    "misspelt ray_actor_options key": (
        lambda c: _rename(_dep(c, "router")["ray_actor_options"], "num_cpus", "cpus"),
        "cpus: not a RayActorOptionsSchema field",
    ),
    "string replicas": (lambda c: _dep(c, "shard-0").update(num_replicas="two"), "num_replicas"),
    "zero health-check period": (lambda c: _dep(c, "router").update(health_check_period_s=0), "greater than 0"),
}


@pytest.mark.parametrize("mutation", sorted(SERVE_MUTATIONS))
def test_mutated_serve_config_is_rejected(docs, mutation):
    pytest.importorskip("ray.serve")
    mutate, expected = SERVE_MUTATIONS[mutation]
    cfg = copy.deepcopy(serve_config(_rs(docs)))
    mutate(cfg)
    errors = serve_errors(cfg)
    assert any(expected in e for e in errors), f"{mutation}: {expected!r} not in {errors}"
