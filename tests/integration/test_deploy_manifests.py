"""deploy/: the files users deploy with, checked offline (no Docker engine, no cluster here).

What these checks prove: every Kubernetes manifest (base, overlay, and the overlay as
``kubectl kustomize`` renders it) is valid against the Kubernetes schemas with unknown fields
rejected (``kubernetes-validate --strict``, for the versions in ``K8S_VERSIONS``); the
invariants we promise hold in the rendered objects, the Dockerfile, the compose file and the
systemd unit (non-root, read-only root, probes on paths the admin port serves, ports equal to
``Settings``' defaults, workers matched to the CPU limit, grace periods longer than our drain,
the lock file installed, ``serve`` the entry point, the HEALTHCHECK through our own probe); and
``systemd-analyze verify`` accepts the unit. What they do not prove: that the image builds or
runs, that compose starts, that a cluster admits or schedules the objects (admission, quotas,
CRDs, network plugins), or that the systemd unit's sandbox lets ``serve`` run. Each check is
shown to fail on a planted breach (``test_*_breach``)."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from session_authority.config import Settings
from session_authority.workers import _KILL_AFTER

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
PORT = Settings.model_fields["port"].default
ADMIN_PORT = Settings.model_fields["admin_port"].default
GRACE = Settings.model_fields["shutdown_grace_seconds"].default
#: What the admin port serves (observability/admin.py and fleet.py).
ADMIN_PATHS = {"/livez", "/readyz", "/health", "/metrics"}

Resource = dict[str, Any]

#: The environment names ``serve`` reads (Settings ignores any other: a misspelt name would be
#: silently lost), and the probe's own.
KNOWN_ENV = {name.upper() for name in Settings.model_fields}
PROBE_ENV = {f"SESSION_AUTHORITY_{n}" for n in ("CA_FILE", "SERVER_NAME", "API_KEY")}


def unknown_env(names: Iterable[object]) -> set[str]:
    return {str(n) for n in names} - KNOWN_ENV - PROBE_ENV


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not on PATH: the deploy checks need it (they fail, never skip)")
    return found


# --- Kubernetes -------------------------------------------------------------------------


def render(directory: Path) -> list[Resource]:
    done = subprocess.run(
        [_tool("kubectl"), "kustomize", str(directory)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def schema_errors(resources: list[Resource]) -> list[str]:
    errors = []
    for resource in resources:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(resource, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                name = f"{resource.get('kind')}/{resource.get('metadata', {}).get('name')}"
                errors.append(f"{name} ({version}): {exc.message} at {list(exc.path)}")
    return errors


def _one(resources: list[Resource], kind: str, component: str | None = None) -> Resource:
    found = [r for r in resources if r["kind"] == kind]
    if component is not None:
        found = [r for r in found if _pod_labels(r).get("app.kubernetes.io/component") == component]
    assert len(found) == 1, f"expected one {kind} ({component}), found {len(found)}"
    return found[0]


def _pod_labels(resource: Resource) -> dict[str, str]:
    labels: dict[str, str] = resource["spec"]["template"]["metadata"]["labels"]
    return labels


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _cpu(quantity: object) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def check_k8s(resources: list[Resource], *, complete: bool) -> None:
    """The promises of deploy/k8s on rendered objects. ``complete``: an overlay, whose
    references (ConfigMap, Secrets) must all resolve."""
    deployment = _one(resources, "Deployment")
    spec, pod = deployment["spec"], deployment["spec"]["template"]["spec"]
    labels = _pod_labels(deployment)
    assert _selects(spec["selector"]["matchLabels"], labels), "Deployment selects its pods"
    assert spec["replicas"] >= 2, "at least 2 replicas"
    assert labels.get("app") == "session-authority", "the runbook's -l app=session-authority"
    (container,) = pod["containers"]
    config: dict[str, str] = next((r["data"] for r in resources if r["kind"] == "ConfigMap"), {})

    # Non-root, read-only root (with /tmp writable for the workers' sockets).
    assert pod["securityContext"]["runAsNonRoot"] is True, "runAsNonRoot"
    assert pod["securityContext"].get("runAsUser", 1) != 0, "runAsUser is not root"
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True, "readOnlyRootFilesystem"
    assert context["allowPrivilegeEscalation"] is False, "allowPrivilegeEscalation"
    assert "ALL" in context["capabilities"]["drop"], "capabilities dropped"
    volumes = {v["name"]: v for v in pod["volumes"]}
    tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert tmp and "emptyDir" in volumes[tmp[0]["name"]], "/tmp is a writable emptyDir"

    settings = [r for r in resources if r["kind"] in ("ConfigMap", "Secret")]
    for item in settings:
        names = {**item.get("data", {}), **item.get("stringData", {})}
        if item["metadata"]["name"] == "session-authority":
            assert not unknown_env(names), f"{item['kind']}: unknown settings {unknown_env(names)}"

    # Ports: Settings' defaults, in the container and in the ConfigMap.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports.get("grpc") == PORT, f"gRPC port {ports.get('grpc')} is not {PORT}"
    assert ports.get("admin") == ADMIN_PORT, f"admin port {ports.get('admin')} != {ADMIN_PORT}"
    assert int(config.get("PORT", PORT)) == PORT, "ConfigMap PORT"
    assert int(config.get("ADMIN_PORT", ADMIN_PORT)) == ADMIN_PORT, "ConfigMap ADMIN_PORT"

    # Probes: HTTP on the admin port (which must then listen beyond loopback), or the native
    # gRPC probe only where the port is plaintext (the kubelet's cannot do TLS).
    tls = bool(config.get("TLS_CERT_FILE"))
    for kind, wanted in (("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
        probe = container.get(kind)
        assert probe, f"{kind} missing"
        if "grpc" in probe:
            assert kind != "livenessProbe", (
                "livenessProbe on grpc.health.v1, which says NOT_SERVING while Postgres is down: "
                "a database outage would restart every replica"
            )
            assert not tls, f"{kind}: native grpc probe on a TLS port cannot handshake"
            assert probe["grpc"]["port"] == PORT, f"{kind}: grpc probe port"
        else:
            get = probe["httpGet"]
            assert get["port"] in ("admin", ADMIN_PORT), f"{kind}: not on the admin port"
            assert get["path"] == wanted, f"{kind}: path {get['path']} (want {wanted})"
            assert get["path"] in ADMIN_PATHS
            assert config.get("ADMIN_HOST", "127.0.0.1") not in ("127.0.0.1", "localhost", "::1"), (
                "ADMIN_HOST is loopback: the kubelet cannot reach the probes"
            )

    # Workers follow the CPU limit (WORKERS=0) or equal it; requests match limits.
    resources_ = container["resources"]
    limit = _cpu(resources_["limits"]["cpu"])
    assert limit == int(limit) and limit >= 1, f"CPU limit {limit}: whole CPUs (one per worker)"
    assert _cpu(resources_["requests"]["cpu"]) == limit, "CPU request equals the limit"
    workers = int(config.get("WORKERS", 0))
    assert workers in (0, int(limit)), f"WORKERS={workers} but the CPU limit is {limit}"
    assert "--workers" not in " ".join(container.get("args", [])), "--workers fixed in args"
    assert resources_["limits"].get("memory"), "memory limit"

    # Termination: preStop, then the drain, then serve's kill margin, within the grace period.
    grace = float(config.get("SHUTDOWN_GRACE_SECONDS", GRACE))
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", "preStop sleeps while endpoints let go"
    pre_stop = float(command[1])
    needed = pre_stop + grace + _KILL_AFTER
    assert pod["terminationGracePeriodSeconds"] >= needed, (
        f"terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']} < "
        f"preStop {pre_stop} + SHUTDOWN_GRACE_SECONDS {grace} + kill margin {_KILL_AFTER}"
    )

    # Service: headless, for dns:/// client-side balancing, on the gRPC port.
    services = [r for r in resources if r["kind"] == "Service"]
    headless = [s for s in services if s["spec"].get("clusterIP") == "None"]
    assert headless, "a headless Service (clusterIP: None) for dns:/// balancing"
    service = headless[0]["spec"]
    assert _selects(service["selector"], labels), "the headless Service selects the pods"
    assert PORT in [p["port"] for p in service["ports"]], "the Service exposes the gRPC port"

    hpa = _one(resources, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"]["kind"] == "Deployment"
    assert hpa["scaleTargetRef"]["name"] == deployment["metadata"]["name"], "HPA target"
    assert hpa["minReplicas"] >= 2, "HPA minReplicas >= 2"

    pdb = _one(resources, "PodDisruptionBudget")["spec"]
    assert _selects(pdb["selector"]["matchLabels"], labels), "the PDB selects the pods"
    assert pdb.get("maxUnavailable", 0) >= 1 or pdb.get("minAvailable", 0) < spec["replicas"]

    policy = _one(resources, "NetworkPolicy")["spec"]
    assert _selects(policy["podSelector"]["matchLabels"], labels), "the policy selects the pods"
    assert "Ingress" in policy["policyTypes"]
    opened = {p["port"] for rule in policy["ingress"] for p in rule.get("ports", [])}
    assert {PORT, ADMIN_PORT} <= opened, f"NetworkPolicy opens {opened}"

    job = _one(resources, "Job")
    job_pod = job["spec"]["template"]["spec"]
    (migrate,) = job_pod["containers"]
    assert migrate["command"][-1] == "migrate", "the Job runs `session-authority migrate`"
    assert migrate["image"] == container["image"], "the Job runs the Deployment's image"
    assert job_pod["securityContext"]["runAsNonRoot"] is True
    assert migrate["securityContext"]["readOnlyRootFilesystem"] is True

    if complete:
        rendered = {(r["kind"], r["metadata"]["name"]) for r in resources}
        sources = container["envFrom"]
        refs = [("ConfigMap", e["configMapRef"]["name"]) for e in sources if "configMapRef" in e]
        refs += [("Secret", e["secretRef"]["name"]) for e in sources if "secretRef" in e]
        refs += [("Secret", v["secret"]["secretName"]) for v in pod["volumes"] if "secret" in v]
        missing = [ref for ref in refs if ref not in rendered]
        assert not missing, f"referenced but not rendered: {missing}"
    for secret in (r for r in resources if r["kind"] == "Secret"):
        for key, value in {**secret.get("stringData", {}), **secret.get("data", {})}.items():
            assert "REPLACE-ME" in str(value), f"Secret {key}: not a placeholder"


@pytest.fixture(scope="module")
def overlay() -> list[Resource]:
    return render(K8S / "overlays" / "example")


def _manifest_files() -> list[Path]:
    files = sorted(K8S.rglob("*.yaml"))
    return [f for f in files if f.name != "kustomization.yaml"]


def test_every_manifest_file_is_valid_against_the_schemas() -> None:
    files = _manifest_files()
    assert len(files) >= 10, files
    resources = [doc for f in files for doc in yaml.safe_load_all(f.read_text()) if doc]
    assert not schema_errors(resources)


def test_rendered_overlay_is_valid_and_keeps_the_promises(overlay: list[Resource]) -> None:
    kinds = sorted(r["kind"] for r in overlay)
    assert kinds == sorted(
        ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Job", "Namespace",
         "NetworkPolicy", "PodDisruptionBudget", "Secret", "Secret", "Service",
         "ServiceAccount"]
    )  # fmt: skip
    assert not schema_errors(overlay)
    check_k8s(overlay, complete=True)
    assert {r["metadata"].get("namespace") for r in overlay if r["kind"] != "Namespace"} == {
        "session-authority"
    }


def test_rendered_mesh_overlay_uses_the_native_grpc_probe() -> None:
    """Plaintext gRPC behind a mesh's mTLS: readiness on grpc.health.v1 through the kubelet."""
    mesh = render(K8S / "overlays" / "mesh")
    assert not schema_errors(mesh)
    check_k8s(mesh, complete=True)
    container = _container(mesh)
    assert container["readinessProbe"]["grpc"]["port"] == PORT
    assert "TLS_CERT_FILE" not in _config(mesh)
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"/tmp"}, mounts


def test_rendered_base_keeps_the_promises() -> None:
    base = render(K8S / "base")
    assert not schema_errors(base)
    check_k8s(base, complete=False)


def _deployment(resources: list[Resource]) -> Resource:
    return _one(resources, "Deployment")


def _container(resources: list[Resource]) -> Resource:
    container: Resource = _deployment(resources)["spec"]["template"]["spec"]["containers"][0]
    return container


def _config(resources: list[Resource]) -> dict[str, str]:
    data: dict[str, str] = _one(resources, "ConfigMap")["data"]
    return data


def _set(path: str, value: object) -> Callable[[list[Resource]], None]:
    def apply(resources: list[Resource]) -> None:
        in_container = path.startswith("container.")
        node: Any = _container(resources) if in_container else _deployment(resources)
        keys = path.removeprefix("container.").split(".")
        for key in keys[:-1]:
            node = node[int(key)] if key.isdigit() else node[key]
        node[keys[-1]] = value

    return apply


def _grpc_probe(resources: list[Resource]) -> None:
    _container(resources)["readinessProbe"] = {"grpc": {"port": PORT}}


def _grpc_liveness(resources: list[Resource]) -> None:
    _config(resources).pop("TLS_CERT_FILE")
    _container(resources)["livenessProbe"] = {"grpc": {"port": PORT}}


def _not_headless(resources: list[Resource]) -> None:
    del _one(resources, "Service")["spec"]["clusterIP"]


def _policy_without_admin(resources: list[Resource]) -> None:
    _one(resources, "NetworkPolicy")["spec"]["ingress"].pop()


def _pdb_elsewhere(resources: list[Resource]) -> None:
    _one(resources, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] = {"app": "other"}


def _real_secret(resources: list[Resource]) -> None:
    secret = next(r for r in resources if r["kind"] == "Secret")
    secret["stringData"]["AUTH_API_KEYS"] = "login:" + "a" * 64


def _workers_fixed(resources: list[Resource]) -> None:
    _config(resources)["WORKERS"] = "3"


def _admin_loopback(resources: list[Resource]) -> None:
    _config(resources)["ADMIN_HOST"] = "127.0.0.1"


def _misspelt_setting(resources: list[Resource]) -> None:
    _config(resources)["ADMIN_HOTS"] = "0.0.0.0"


def _missing_secret(resources: list[Resource]) -> None:
    resources.remove(next(r for r in resources if r["kind"] == "Secret"))


@pytest.mark.parametrize(
    ("plant", "says"),
    [
        (_set("spec.replicas", 1), "at least 2 replicas"),
        (_set("spec.template.spec.securityContext.runAsNonRoot", False), "runAsNonRoot"),
        (_set("container.securityContext.readOnlyRootFilesystem", False), "readOnlyRootFilesystem"),
        (_set("container.ports.0.containerPort", PORT + 1), "gRPC port"),
        (_set("container.ports.1.containerPort", 9090), "admin port"),
        (_set("spec.template.spec.terminationGracePeriodSeconds", 15), "GracePeriodSeconds"),
        (_set("container.resources.limits.cpu", "4"), "CPU request equals the limit"),
        (_set("container.resources.limits.cpu", "1500m"), "whole CPUs"),
        (_set("container.livenessProbe.httpGet.path", "/healthz"), "livenessProbe: path"),
        (_grpc_probe, "native grpc probe on a TLS port"),
        (_grpc_liveness, "a database outage would restart every replica"),
        (_workers_fixed, "WORKERS=3"),
        (_admin_loopback, "ADMIN_HOST is loopback"),
        (_not_headless, "headless Service"),
        (_policy_without_admin, "NetworkPolicy opens"),
        (_pdb_elsewhere, "the PDB selects the pods"),
        (_real_secret, "not a placeholder"),
        (_missing_secret, "referenced but not rendered"),
        (_misspelt_setting, "unknown settings {'ADMIN_HOTS'}"),
        (_set("spec.template.metadata.labels.app", "sa"), "-l app=session-authority"),
    ],
)
def test_k8s_breach(
    overlay: list[Resource], plant: Callable[[list[Resource]], None], says: str
) -> None:
    breached = copy.deepcopy(overlay)
    plant(breached)
    with pytest.raises(AssertionError, match=re.escape(says)):
        check_k8s(breached, complete=True)


@pytest.mark.parametrize(
    ("field", "value"),
    [("runAsNonRoot", "yes"), ("runAsNobody", True)],  # a wrong type; an unknown field (strict)
)
def test_schema_breach(overlay: list[Resource], field: str, value: object) -> None:
    breached = copy.deepcopy(overlay)
    _deployment(breached)["spec"]["template"]["spec"]["securityContext"][field] = value
    errors = schema_errors(breached)
    assert errors and all("Deployment/session-authority" in e for e in errors), errors


# --- Dockerfile --------------------------------------------------------------------------

DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
PROBES = (["python", "-m", "session_authority.probe"], ["session-authority", "health"])


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    found = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def check_dockerfile(text: str) -> None:
    steps = instructions(text)
    froms = [i for i, (word, _) in enumerate(steps) if word == "FROM"]
    assert len(froms) >= 2, "multi-stage: a build stage and a runtime stage"
    build, final = steps[: froms[-1]], steps[froms[-1] :]
    runs = " ".join(rest for word, rest in build if word == "RUN")
    assert re.search(r"uv sync\b[^&;]*--locked", runs), "uv sync --locked (the lock file)"
    assert "--require-hashes -r .ci/uv-bootstrap.txt" in runs, "uv from its hashed pin"
    copied = " ".join(rest for word, rest in build if word == "COPY")
    assert "uv.lock" in copied.split(), "uv.lock copied into the build"
    for word, rest in steps:
        if word == "COPY" and not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY source {source} is not in the repository"
    assert not any(
        "pip install" in rest or "uv " in rest for word, rest in final if word == "RUN"
    ), "the runtime stage installs nothing (it copies the build's virtualenv)"

    users = [rest for word, rest in final if word == "USER"]
    assert users, "USER in the runtime stage"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, f"USER {users[-1]}: numeric and not root"

    checks = [rest for word, rest in final if word == "HEALTHCHECK"]
    assert len(checks) == 1, "one HEALTHCHECK"
    cmd = checks[0].partition("CMD")[2].strip()
    assert json.loads(cmd) in PROBES, f"HEALTHCHECK {cmd}: not our own probe"

    (entry,) = [json.loads(rest) for word, rest in final if word == "ENTRYPOINT"]
    assert entry == ["session-authority", "serve"], f"ENTRYPOINT {entry}"
    cmds = [json.loads(rest) for word, rest in final if word == "CMD"]
    assert not any("--workers" in c for c in cmds), "--workers fixed: it follows the CPU quota"

    exposes = [rest for word, rest in final if word == "EXPOSE"]
    exposed = {int(p.split("/")[0]) for rest in exposes for p in rest.split()}
    assert {PORT, ADMIN_PORT} <= exposed, f"EXPOSE {exposed}"
    env = dict(
        pair.split("=", 1) for word, rest in final if word == "ENV" for pair in shlex.split(rest)
    )
    assert int(env.get("PORT", PORT)) == PORT, "ENV PORT"
    assert int(env.get("ADMIN_PORT", ADMIN_PORT)) == ADMIN_PORT, "ENV ADMIN_PORT"
    assert env.get("ADMIN_HOST") not in (None, "127.0.0.1"), "ENV ADMIN_HOST beyond loopback"
    assert env.get("WORKERS", "0") == "0", "ENV WORKERS fixed: it follows the CPU quota"
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1", "no bytecode written (read-only root)"


def test_dockerfile_keeps_the_promises() -> None:
    check_dockerfile(DOCKERFILE.read_text())


@pytest.mark.parametrize(
    ("old", "new", "says"),
    [
        ("USER 10001:10001", "USER root", "USER root"),
        ("USER 10001:10001", "USER 0", "USER 0"),
        ('["python", "-m", "session_authority.probe"]', '["curl", "localhost:9464/readyz"]',
         "not our own probe"),
        ("EXPOSE 50051 9464", "EXPOSE 50052 9464", "EXPOSE"),
        ("PORT=50051", "PORT=8080", "ENV PORT"),
        ("uv sync --locked", "uv sync", "uv sync --locked"),
        ('["session-authority", "serve"]', '["session-authority", "dev"]', "ENTRYPOINT"),
        ("CMD []", 'CMD ["--workers", "4"]', "--workers fixed"),
        ("FROM ${PYTHON_IMAGE} AS runtime", "", "multi-stage"),
        ("pyproject.toml uv.lock README.md", "pyproject.toml README.md", "uv.lock copied"),
    ],
)  # fmt: skip
def test_dockerfile_breach(old: str, new: str, says: str) -> None:
    text = DOCKERFILE.read_text()
    assert old in text
    with pytest.raises(AssertionError, match=re.escape(says)):
        check_dockerfile(text.replace(old, new))


# --- compose -----------------------------------------------------------------------------

COMPOSE = DEPLOY / "compose.yaml"
APP = "services.session-authority"
SCRAPE_ONLY = "./compose/prometheus.yml:/etc/prometheus/prometheus.yml:ro"  # no rules mounted


def _env(service: Resource) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _mounts(service: Resource) -> dict[str, str]:
    """Container path -> host path, for the short bind syntax."""
    found = {}
    for volume in service.get("volumes", []):
        host, container = volume.split(":")[:2]
        found[container] = host
    return found


def check_compose(doc: Resource, base: Path) -> None:
    services = doc["services"]
    wanted = {"postgres", "redis", "migrate", "session-authority", "otel-collector"}
    assert wanted | {"prometheus", "grafana"} <= set(services), f"services {sorted(services)}"
    app, migrate = services["session-authority"], services["migrate"]

    assert app["depends_on"]["migrate"]["condition"] == "service_completed_successfully", (
        "the service starts after migrate succeeded"
    )
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy", "migrate waits"
    assert migrate["entrypoint"][-1] == "migrate", "migrate runs `session-authority migrate`"
    for name, service in (("session-authority", app), ("migrate", migrate)):
        build = service["build"]
        dockerfile = (base / build["context"] / build["dockerfile"]).resolve()
        assert dockerfile == (base / "docker" / "Dockerfile").resolve(), "image"
        assert str(service.get("user", "0")).split(":")[0] not in ("0", "root"), f"{name}: user"
        assert service.get("read_only") is True, f"{name}: read_only"
    assert "/tmp" in app.get("tmpfs", []), "a tmpfs at /tmp (the workers' sockets)"
    assert "healthcheck" not in app, "the image's HEALTHCHECK (our probe) is used"

    env = _env(app)
    for name, service in (("session-authority", app), ("migrate", migrate)):
        unknown = unknown_env(_env(service))
        assert not unknown, f"{name}: unknown settings {unknown}"
    assert int(env.get("PORT", PORT)) == PORT, "PORT"
    assert int(env.get("ADMIN_PORT", ADMIN_PORT)) == ADMIN_PORT, "ADMIN_PORT"
    assert any(str(p).endswith(f":{PORT}") for p in app["ports"]), f"ports {app['ports']}"
    assert not any(str(p).endswith(f":{ADMIN_PORT}") for p in app["ports"]), "admin published"
    targets = {f"/run/secrets/{s['target']}" for s in app["secrets"]}
    for name in ("TLS_CERT_FILE", "TLS_KEY_FILE", "SESSION_AUTHORITY_CA_FILE"):
        assert env.get(name) in targets, f"{name} is not a mounted secret"
    assert env.get("AUTH_API_KEYS"), "AUTH_API_KEYS (API keys, by hash)"
    assert env.get("ALLOW_UNAUTHENTICATED", "false").lower() in ("false", "0"), "open port"
    assert env.get("WORKERS", "0") == "0", "WORKERS fixed: it follows `cpus`"
    assert float(app["cpus"]) == int(app["cpus"]), "whole CPUs (one worker each)"
    grace = float(env.get("SHUTDOWN_GRACE_SECONDS", GRACE))
    assert float(app["stop_grace_period"].rstrip("s")) >= grace + _KILL_AFTER, "stop_grace_period"
    for secret in doc["secrets"].values():
        assert secret["file"].startswith("./secrets/"), "secrets from the git-ignored secrets/"

    collector = services["otel-collector"]
    (config,) = (base / h for c, h in _mounts(collector).items() if c.endswith("config.yaml"))
    receiver = yaml.safe_load(config.read_text())["receivers"]["otlp"]["protocols"]["grpc"]
    port = receiver["endpoint"].rsplit(":", 1)[1]
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"].rsplit(":", 1)[1] == port, "OTLP endpoint"

    prometheus = _mounts(services["prometheus"])
    config = base / prometheus["/etc/prometheus/prometheus.yml"]
    scrape = yaml.safe_load(config.read_text())
    statics = [s for job in scrape["scrape_configs"] for s in job["static_configs"]]
    scraped = [t for s in statics for t in s["targets"]]
    assert f"session-authority:{ADMIN_PORT}" in scraped, f"Prometheus scrapes {scraped}"
    rules = [c for c, h in prometheus.items() if h == "./observability/prometheus-rules.yml"]
    assert rules, "our alert rules are mounted into Prometheus"
    assert any(Path(rules[0]).match(pattern) for pattern in scrape["rule_files"]), "rules loaded"

    grafana = _mounts(services["grafana"])
    dashboards = [c for c, h in grafana.items() if h == "./observability/grafana-dashboard.json"]
    assert dashboards, "our dashboard is mounted into Grafana"
    providers = [base / h for c, h in grafana.items() if "provisioning/dashboards" in c]
    loaded = [p for f in providers for p in yaml.safe_load(f.read_text())["providers"]]
    paths = [p["options"]["path"] for p in loaded]
    assert str(Path(dashboards[0]).parent) in paths, "the dashboard is provisioned"
    sources = [base / h for c, h in grafana.items() if "provisioning/datasources" in c]
    data = [d for f in sources for d in yaml.safe_load(f.read_text())["datasources"]]
    assert any(d["type"] == "prometheus" for d in data), "a Prometheus data source"

    for service in services.values():
        for host in _mounts(service).values():
            if host.startswith("."):
                assert (base / host).exists(), f"bind mount {host} does not exist"


def test_compose_keeps_the_promises() -> None:
    check_compose(yaml.safe_load(COMPOSE.read_text()), DEPLOY)


def _drop(path: str) -> Callable[[Resource], None]:
    def apply(doc: Resource) -> None:
        *keys, last = path.split(".")
        node = doc
        for key in keys:
            node = node[key]
        del node[last]

    return apply


def _put(path: str, value: object) -> Callable[[Resource], None]:
    def apply(doc: Resource) -> None:
        *keys, last = path.split(".")
        node = doc
        for key in keys:
            node = node[key]
        node[last] = value

    return apply


@pytest.mark.parametrize(
    ("plant", "says"),
    [
        (_put("services.session-authority.user", "0:0"), "session-authority: user"),
        (_put("services.session-authority.read_only", False), "read_only"),
        (_put("services.session-authority.ports", ["50052:50052"]), "ports"),
        (_put(f"{APP}.depends_on.migrate.condition", "service_started"), "after migrate"),
        (_drop("services.session-authority.environment.TLS_CERT_FILE"), "TLS_CERT_FILE"),
        (_put("services.session-authority.environment.ALLOW_UNAUTHENTICATED", "true"), "open port"),
        (_put("services.session-authority.stop_grace_period", "10s"), "stop_grace_period"),
        (_put("services.prometheus.volumes", [SCRAPE_ONLY]), "alert rules"),
        (_put("services.grafana.volumes", []), "dashboard"),
        (_put("services.session-authority.healthcheck", {"test": ["CMD", "true"]}), "HEALTHCHECK"),
        (_put("services.session-authority.environment.PORT", "8080"), "PORT"),
        (_put("services.session-authority.environment.TLS_CERT", "x"), "unknown settings"),
    ],
)  # fmt: skip
def test_compose_breach(plant: Callable[[Resource], None], says: str) -> None:
    doc = yaml.safe_load(COMPOSE.read_text())
    plant(doc)
    with pytest.raises(AssertionError, match=re.escape(says)):
        check_compose(doc, DEPLOY)


def test_compose_breach_in_the_scrape_config(tmp_path: Path) -> None:
    shutil.copytree(DEPLOY, tmp_path / "deploy", ignore=shutil.ignore_patterns("secrets", ".env"))
    scrape = tmp_path / "deploy" / "compose" / "prometheus.yml"
    text = scrape.read_text().replace(f"session-authority:{ADMIN_PORT}", "session-authority:9100")
    scrape.write_text(text)
    with pytest.raises(AssertionError, match="Prometheus scrapes"):
        check_compose(yaml.safe_load(COMPOSE.read_text()), tmp_path / "deploy")


# --- systemd -----------------------------------------------------------------------------

UNIT = DEPLOY / "systemd" / "session-authority.service"
VENV_BIN = Path(sys.executable).parent  # where `session-authority` is installed


def unit_directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def check_unit(text: str, directory: Path) -> None:
    """The unit's promises, then systemd's own verdict on a copy whose ExecStart points at
    this checkout's virtualenv (verify checks that the executables exist)."""
    d = unit_directives(text)
    user = d.get("User", ["root"])[-1]
    assert d.get("DynamicUser") == ["yes"] or user not in ("root", "0"), "User"
    assert d.get("ProtectSystem") == ["strict"], "ProtectSystem=strict"
    assert d.get("NoNewPrivileges") == ["yes"], "NoNewPrivileges"
    assert d.get("PrivateTmp") == ["yes"], "PrivateTmp (the workers' sockets)"
    assert d.get("EnvironmentFile"), "EnvironmentFile"
    (start,) = d["ExecStart"]
    assert start.split()[-1] == "serve", f"ExecStart {start}"
    assert "--workers" not in start
    assert float(d["TimeoutStopSec"][-1]) >= GRACE + _KILL_AFTER, "TimeoutStopSec < the drain"
    assert d.get("KillMode") == ["mixed"], "KillMode=mixed: the supervisor drains its workers"

    unit = directory / "session-authority.service"  # the name `journalctl -u` uses
    unit.write_text(text.replace("/opt/session-authority/bin/", f"{VENV_BIN}/"))
    analyze = _tool("systemd-analyze")
    done = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, timeout=60, check=False
    )
    said = (done.stdout + done.stderr).decode()
    assert done.returncode == 0 and not said.strip(), f"systemd-analyze verify: {said}"
    done = subprocess.run(
        [analyze, "security", "--offline=yes", "--threshold=20", str(unit)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    exposure = done.stdout.decode()[-400:]
    assert done.returncode == 0, f"systemd-analyze security: exposure above 2.0\n{exposure}"


def test_systemd_unit_keeps_the_promises(tmp_path: Path) -> None:
    assert UNIT.name == "session-authority.service"  # journalctl -u session-authority
    check_unit(UNIT.read_text(), tmp_path)
    env_file = UNIT.with_suffix(".env").read_text()
    lines = [line for line in env_file.splitlines() if "=" in line and line[0] != "#"]
    names = {line.split("=", 1)[0] for line in lines}
    assert names and not unknown_env(names), unknown_env(names)


@pytest.mark.parametrize(
    ("old", "new", "says"),
    [
        ("User=session-authority", "User=root", "User"),
        ("ProtectSystem=strict", "ProtectSystem=full", "ProtectSystem=strict"),
        ("TimeoutStopSec=30", "TimeoutStopSec=15", "TimeoutStopSec"),
        ("bin/session-authority serve", "bin/session-authority dev", "ExecStart"),
        ("Restart=on-failure", "Restart=on-failure\nRestartSecs=2", "systemd-analyze verify"),
        ("ExecStart=/opt/session-authority/bin/", "ExecStart=/opt/none/", "systemd-analyze verify"),
        ("CapabilityBoundingSet=\n", "", "exposure"),  # 1.4 -> 3.2
    ],
)
def test_systemd_breach(tmp_path: Path, old: str, new: str, says: str) -> None:
    text = UNIT.read_text()
    assert old in text
    with pytest.raises(AssertionError, match=re.escape(says)):
        check_unit(text.replace(old, new), tmp_path)


# --- the compose secrets script, against a real serve ------------------------------------


@pytest.fixture
def compose_secrets(tmp_path: Path) -> Path:
    (tmp_path / "compose").mkdir()
    script = tmp_path / "compose" / "make-secrets.sh"
    shutil.copy(DEPLOY / "compose" / "make-secrets.sh", script)
    done = subprocess.run([_tool("sh"), str(script)], capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode()
    (line,) = done.stdout.decode().splitlines()
    key = (tmp_path / "secrets" / "api-key").read_text()
    assert line == f"AUTH_API_KEYS=login:{hashlib.sha256(key.encode()).hexdigest()}"
    return tmp_path / "secrets"


def test_make_secrets_gives_what_compose_mounts(compose_secrets: Path) -> None:
    doc = yaml.safe_load(COMPOSE.read_text())
    for secret in doc["secrets"].values():
        assert (compose_secrets.parent / secret["file"]).is_file(), secret["file"]
    assert (compose_secrets / "server.key").stat().st_mode & 0o004, "readable by user 10001"
    assert compose_secrets.stat().st_mode & 0o777 == 0o700
    assert (compose_secrets / "api-key").stat().st_mode & 0o777 == 0o600
