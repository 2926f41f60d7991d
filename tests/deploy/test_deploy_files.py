"""The deployment files (no Docker engine here): they parse, run real ``idhub`` commands with real
settings, and agree with each other, the targets file and the code they deploy."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from fastapi.testclient import TestClient

from connectors.sandbox import runner
from orchestrator.cli import build_parser
from orchestrator.settings import Settings
from orchestrator.targets import TargetConfig, parse_targets
from tests.hub import make_hub
from workers.app import ADMIN_QUEUE, FANOUT_QUEUE, WorkerSettings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_SERVICES = {
    "postgres",
    "redis",
    "migrate",
    "api",
    "relay",
    "worker-fanout",
    "worker-targets",
    "beat",
    "flower",
    "sandbox",
}
IMAGE = "idhub"  # the name every Kubernetes container uses; kustomization.yaml maps it to a registry
SECRET = "idhub-secrets"
PLACEHOLDER = "REPLACE_ME"
SECRET_NAME_RE = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|AUTH|KEY", re.IGNORECASE)


# -- helpers ---------------------------------------------------------------------------------------------


def strings(node: Any) -> Iterator[str]:
    """Every string value (and mapping key) in a parsed YAML tree."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from strings(key)
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)


def parse_command(argv: list[str], where: str) -> Any:
    """The namespace ``idhub`` would run ``argv`` with; a failed test naming ``where`` if it would not."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `idhub {' '.join(argv)}` is not a valid idhub command")


def queues_of(argv: list[str], where: str) -> set[str]:
    args = parse_command(argv, where)
    assert args.command == "worker", where
    assert args.queues, f"{where}: a worker group names its queues"
    return set(args.queues.split(","))


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return data


def env_example() -> dict[str, str]:
    values = {}
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: not KEY=VALUE: {line!r}"
            values[key.strip()] = value.strip()
    return values


def compose_variables(data: Any) -> set[str]:
    """Names compose substitutes (``$VAR``, ``${VAR}``, ``${VAR:-x}``, ``${VAR:?msg}``); ``$$`` is a ``$``."""
    pattern = re.compile(r"\$(?:\{([A-Za-z_]\w*)[^}]*\}|([A-Za-z_]\w*))")
    found = set()
    for text in strings(data):
        for m in pattern.finditer(text.replace("$$", "")):
            found.add(m.group(1) or m.group(2))
    return found


def example_targets() -> list[TargetConfig]:
    return parse_targets(
        (DEPLOY / "targets.example.yaml").read_text(), "targets.example.yaml", check_env=False
    )


def k8s_docs(folder: Path = K8S) -> list[tuple[str, dict[str, Any]]]:
    """(file name, document) of every manifest under ``folder``, kustomizations excluded."""
    docs = []
    for path in sorted(folder.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((str(path.relative_to(K8S)), doc))
    return docs


def base_docs() -> list[dict[str, Any]]:
    return [doc for name, doc in k8s_docs() if "/" not in name]


def of_kind(kind: str, docs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    return [d for d in (base_docs() if docs is None else docs) if d["kind"] == kind]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = doc["spec"]["template"]["spec"]
    return spec


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(doc)
    result: list[dict[str, Any]] = spec.get("initContainers", []) + spec["containers"]
    return result


def workloads() -> list[dict[str, Any]]:
    return of_kind("Deployment") + of_kind("Job")


def deployment_running(command: str) -> list[dict[str, Any]]:
    return [d for d in of_kind("Deployment") if containers(d)[0]["args"][0] == command]


def secret_refs(doc: dict[str, Any]) -> set[str]:
    """Keys of the idhub Secret the workload's containers read."""
    keys = set()
    for c in containers(doc):
        for env in c.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref is not None:
                assert ref["name"] == SECRET, f"{doc['metadata']['name']}: unknown Secret {ref['name']}"
                keys.add(ref["key"])
        assert not any("secretRef" in e for e in c.get("envFrom", [])), (
            "secrets by key, so each gets only its own"
        )
    return keys


def k8s_targets() -> list[TargetConfig]:
    (cm,) = [d for d in of_kind("ConfigMap") if d["metadata"]["name"] == "idhub-targets"]
    return parse_targets(cm["data"]["targets.yaml"], "idhub-targets", check_env=False)


def flower_handler(path: str) -> str | None:
    """The name of the Flower handler class that serves ``path`` (its first matching route)."""
    import flower.urls

    for spec in flower.urls.handlers:
        pattern, handler = (spec.regex.pattern, spec.handler_class) if hasattr(spec, "regex") else spec[:2]
        if re.fullmatch(pattern, path):
            return str(handler.__name__)
    return None


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    joined, current = [], ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        joined.append(current + line)
        current = ""
    return [(i.split(None, 1)[0].upper(), i.split(None, 1)[1] if " " in i else "") for i in joined]


# -- every file parses -------------------------------------------------------------------------------------


def test_every_yaml_file_parses() -> None:
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(files) >= 12
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path.name} is empty"
        assert all(isinstance(d, dict) for d in docs), path.name


# -- docker compose ----------------------------------------------------------------------------------------


def test_compose_names_every_service() -> None:
    assert set(compose()["services"]) == COMPOSE_SERVICES


def test_compose_variables_are_declared_in_env_example_and_none_is_unused() -> None:
    used, declared = compose_variables(compose()), set(env_example())
    assert used - declared == set(), "used by docker-compose.yml but missing from .env.example"
    assert declared - used == set(), "declared in .env.example but never used"


def test_compose_idhub_services_run_real_idhub_commands() -> None:
    services = compose()["services"]
    ran = set()
    for name, svc in services.items():
        if "entrypoint" in svc or svc["image"] != "${IMAGE:-idhub:local}":
            continue
        args = parse_command(svc["command"], f"compose service {name}")
        ran.add(args.command)
    assert ran == {"db", "serve", "relay", "worker", "beat", "flower"}


def test_compose_idhub_services_share_the_store_and_the_broker() -> None:
    for name, svc in compose()["services"].items():
        if svc.get("image") == "${IMAGE:-idhub:local}" and name != "sandbox":
            env = svc["environment"]
            assert {"IDHUB_DATABASE_URL", "IDHUB_BROKER_URL", "IDHUB_TARGETS_FILE"} <= set(env), name
            assert Settings(database_url=env["IDHUB_DATABASE_URL"]).database_url.startswith(
                "postgresql+psycopg"
            )


def test_compose_workers_cover_every_queue_in_their_groups() -> None:
    services = compose()["services"]
    fanout = queues_of(services["worker-fanout"]["command"], "worker-fanout")
    targets = queues_of(services["worker-targets"]["command"], "worker-targets")
    assert fanout == {FANOUT_QUEUE, ADMIN_QUEUE}
    assert targets == {cfg.queue for cfg in example_targets()}


def test_compose_runs_exactly_one_beat() -> None:
    beat = compose()["services"]["beat"]
    assert beat.get("deploy", {}).get("replicas", 1) == 1
    assert "scale" not in beat


def test_compose_dependencies_wait_for_health_or_completion() -> None:
    services = compose()["services"]
    for name, svc in services.items():
        for dep, cond in svc.get("depends_on", {}).items():
            target = services[dep]
            if cond["condition"] == "service_healthy":
                assert not target.get("healthcheck", {}).get("disable"), f"{name} waits on {dep}'s health"
                assert target["healthcheck"]["test"], f"{name} waits on {dep}'s health"
            else:
                assert cond["condition"] == "service_completed_successfully", f"{name} -> {dep}"
                assert target.get("restart") == "no", f"{dep} is one-shot"
    for name in ("api", "relay", "worker-fanout", "worker-targets"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_compose_long_running_services_have_healthchecks_or_say_why_not() -> None:
    services = compose()["services"]
    with_checks = {n for n, s in services.items() if s.get("healthcheck", {}).get("test")}
    assert {"postgres", "redis", "api", "worker-fanout", "worker-targets", "flower", "sandbox"} <= with_checks
    # The image's HEALTHCHECK probes the API: every other role must replace or disable it.
    for name in services.keys() - with_checks:
        assert services[name]["healthcheck"] == {"disable": True}, name


def test_compose_probes_hit_real_endpoints(tmp_path: Path) -> None:
    services = compose()["services"]
    api_check = " ".join(services["api"]["healthcheck"]["test"])
    assert "127.0.0.1:8000/readyz" in api_check
    app, _ = make_hub(f"sqlite:///{tmp_path}/idhub.db")
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 200
        assert client.get("/healthz").status_code == 200
    flower_check = " ".join(services["flower"]["healthcheck"]["test"])
    assert "127.0.0.1:5555/healthcheck" in flower_check
    assert flower_handler("/healthcheck") == "Healthcheck"


def test_compose_passes_secrets_only_by_substitution() -> None:
    for name, svc in compose()["services"].items():
        for key, value in svc.get("environment", {}).items():
            if SECRET_NAME_RE.search(key) or "@" in str(value):
                assert "${" in str(value), f"{name}: {key} is a literal secret"


def test_compose_gives_target_tokens_to_the_workers_only() -> None:
    token_envs = {cfg.token_env for cfg in example_targets()} - {None}
    for name, svc in compose()["services"].items():
        env = set(svc.get("environment", {}))
        if name.startswith("worker-"):
            assert token_envs <= env, name
        else:
            assert not token_envs & env, f"{name} does not need target secrets"


def test_sandbox_service_serves_what_the_example_targets_point_at(monkeypatch: pytest.MonkeyPatch) -> None:
    svc = compose()["services"]["sandbox"]
    program, flag, source = svc["entrypoint"]
    assert (program, flag) == ("python", "-c")
    calls: list[tuple[Any, ...]] = []

    def fake_serve(ports: dict[str, int], *, seed: int = 0, host: str = "127.0.0.1") -> int:
        calls.append((ports, host))
        return 0

    monkeypatch.setattr(runner, "serve", fake_serve)
    with pytest.raises(SystemExit) as exited:
        exec(compile(source, "sandbox-entrypoint", "exec"), {})
    assert exited.value.code == 0
    ((ports, host),) = calls
    assert host == "0.0.0.0"  # reachable from the other containers
    assert set(ports) == set(runner.KINDS)
    for cfg in example_targets():
        sim = runner.build_simulator(cfg.connector)
        assert cfg.url == f"http://sandbox:{ports[cfg.connector]}{sim.base_path}", cfg.name
    check = " ".join(svc["healthcheck"]["test"])
    assert all(str(port) in check for port in ports.values())


def test_env_example_tokens_are_the_sandbox_test_credentials() -> None:
    """The try-out works as shipped, and the only credentials in the file are the sandbox's public ones."""
    values = env_example()
    for cfg in example_targets():
        assert cfg.token_env is not None
        expected = runner.connector_settings(cfg.connector, cfg.url).token
        assert values[cfg.token_env] == expected, cfg.token_env
    others = {k: v for k, v in values.items() if SECRET_NAME_RE.search(k) and not k.endswith("_TOKEN")}
    assert others
    assert all("change-me" in v for v in others.values())


def test_targets_example_loads() -> None:
    targets = example_targets()
    assert {cfg.connector for cfg in targets} == set(runner.KINDS)
    assert all(cfg.token_env and cfg.token_env.endswith("_TOKEN") for cfg in targets)


# -- settings named anywhere exist -------------------------------------------------------------------------


def test_every_idhub_variable_is_a_real_setting() -> None:
    known = {f"IDHUB_{name.upper()}" for name in Settings.model_fields} | {
        f"IDHUB_{name.upper()}" for name in WorkerSettings.model_fields
    }
    named = set()
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            named |= set(re.findall(r"\bIDHUB_[A-Z0-9_]+\b", path.read_text()))
    assert {"IDHUB_DATABASE_URL", "IDHUB_BROKER_URL", "IDHUB_TARGETS_FILE"} <= named
    assert named - known == set(), "not a field of Settings or WorkerSettings"


# -- Dockerfile --------------------------------------------------------------------------------------------


def test_dockerfile_runs_as_non_root_with_idhub_as_entrypoint() -> None:
    steps = dockerfile()
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    users = [arg for op, arg in steps[last_from:] if op == "USER"]
    assert users, "the runtime stage sets a USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), "a numeric uid: runAsNonRoot can verify only those"
    assert int(uid) != 0
    (entrypoint,) = [json.loads(arg) for op, arg in steps if op == "ENTRYPOINT"]
    assert entrypoint == ["idhub"]
    (cmd,) = [json.loads(arg) for op, arg in steps if op == "CMD"]
    assert parse_command(cmd, "Dockerfile CMD").command == "serve"


def test_dockerfile_base_healthcheck_install_and_no_secrets() -> None:
    steps = dockerfile()
    args = dict(arg.split("=", 1) for op, arg in steps if op == "ARG" and "=" in arg)
    bases = [args.get(arg.split()[0].strip("${}"), arg.split()[0]) for op, arg in steps if op == "FROM"]
    assert bases
    assert all(base == "python:3.11-slim" for base in bases)
    (health,) = [arg for op, arg in steps if op == "HEALTHCHECK"]
    assert "/healthz" in health
    assert any(op == "RUN" and re.search(r"pip install \.(\s|$)", arg) for op, arg in steps)
    for op, arg in steps:
        if op in ("ENV", "ARG"):
            names = re.findall(r"([A-Za-z_]\w*)=", arg) or [arg.split()[0]]
            assert not any(SECRET_NAME_RE.search(n) for n in names), f"{op} {arg}: secrets are run-time only"


def test_dockerignore_lets_the_copied_sources_in_and_keeps_env_files_out() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert "**" in ignore
    assert "**/.env" in ignore
    root = DEPLOY.parent
    for op, arg in dockerfile():
        if op == "COPY" and not arg.startswith("--from"):
            for src in arg.split()[:-1]:
                assert (root / src).exists(), src
                assert f"!{src}" in ignore or f"!{src}/**" in ignore, f"{src} is excluded from the context"


# -- Kubernetes --------------------------------------------------------------------------------------------


def test_every_manifest_names_its_api_kind_and_name() -> None:
    docs = k8s_docs()
    assert len(docs) >= 14
    for name, doc in docs:
        assert doc.get("apiVersion"), name
        assert doc.get("kind"), name
        assert doc.get("metadata", {}).get("name"), name
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "idhub", f"{name}: {doc['metadata']['name']}"


def test_kustomizations_list_every_manifest_of_their_folder() -> None:
    found = sorted(p.relative_to(K8S).as_posix() for p in K8S.rglob("kustomization.yaml"))
    assert found == ["keda/kustomization.yaml", "kustomization.yaml"]
    base = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert (base["kind"], base["namespace"]) == ("Kustomization", "idhub")
    assert set(base["resources"]) == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    keda = yaml.safe_load((K8S / "keda" / "kustomization.yaml").read_text())
    assert keda["kind"] == "Component"
    assert set(keda["resources"]) == {p.name for p in (K8S / "keda").glob("*.yaml")} - {"kustomization.yaml"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
def test_kustomize_builds_the_base_and_the_keda_component(tmp_path: Path) -> None:
    def build(root: Path) -> list[dict[str, Any]]:
        out = subprocess.run(["kubectl", "kustomize", str(root)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return [d for d in yaml.safe_load_all(out.stdout) if d is not None]

    base = build(K8S)
    assert len(base) == len(base_docs())
    assert {c["image"] for d in base if d["kind"] in ("Deployment", "Job") for c in containers(d)} == {
        "registry.example.com/idhub:0.1.0"
    }
    # The component as an overlay would use it.
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    base_path = os.path.relpath(K8S, overlay)  # kustomize refuses absolute paths
    (overlay / "kustomization.yaml").write_text(f"resources: [{base_path}]\ncomponents: [{base_path}/keda]\n")
    scaled = {d["metadata"]["name"]: d for d in build(overlay) if d["kind"] == "Deployment"}
    assert "replicas" not in scaled["idhub-worker-fanout"]["spec"]
    assert "replicas" not in scaled["idhub-worker-targets"]["spec"]
    assert scaled["idhub-beat"]["spec"]["replicas"] == 1


def test_containers_reference_the_kustomized_image_and_run_real_commands() -> None:
    images = yaml.safe_load((K8S / "kustomization.yaml").read_text())["images"]
    assert [i["name"] for i in images] == [IMAGE]
    ran = set()
    for doc in workloads():
        for c in containers(doc):
            where = f"{doc['metadata']['name']}/{c['name']}"
            assert c["image"] == IMAGE, where
            assert "command" not in c, f"{where}: keep the image's ENTRYPOINT (idhub); give args"
            ran.add(parse_command(c["args"], where).command)
    assert ran == {"db", "serve", "relay", "worker", "beat", "flower"}


def test_deployment_selectors_match_their_pod_labels_and_services_find_them() -> None:
    deployments = of_kind("Deployment")
    for d in deployments:
        selector = d["spec"]["selector"]["matchLabels"]
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), d["metadata"]["name"]
    for svc in of_kind("Service"):
        selected = [
            d
            for d in deployments
            if svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(selected) == 1, svc["metadata"]["name"]
        ports = {p["name"] for c in containers(selected[0]) for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, svc["metadata"]["name"]


def test_beat_is_a_single_replica_recreated() -> None:
    (beat,) = deployment_running("beat")
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"] == {"type": "Recreate"}


def test_relay_runs_several_replicas() -> None:
    (relay,) = deployment_running("relay")
    assert relay["spec"]["replicas"] >= 2


def test_api_and_flower_probes_and_every_container_has_resources() -> None:
    (api,) = deployment_running("serve")
    (container,) = containers(api)
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    (flower,) = deployment_running("flower")
    for probe in ("readinessProbe", "livenessProbe"):
        assert flower_handler(containers(flower)[0][probe]["httpGet"]["path"]) == "Healthcheck"
    for doc in workloads():
        for c in containers(doc):
            assert c["resources"]["requests"], doc["metadata"]["name"]
            assert c["resources"]["limits"]["memory"], doc["metadata"]["name"]


def test_pods_run_restricted() -> None:
    for doc in workloads():
        pod = pod_spec(doc)["securityContext"]
        assert pod["runAsNonRoot"] is True, doc["metadata"]["name"]
        assert pod["runAsUser"] != 0, doc["metadata"]["name"]
        for c in containers(doc):
            ctx = c["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False, doc["metadata"]["name"]
            assert ctx["capabilities"]["drop"] == ["ALL"], doc["metadata"]["name"]


def test_secret_keys_are_exactly_what_the_workloads_read() -> None:
    (secret,) = of_kind("Secret")
    assert secret["metadata"]["name"] == SECRET
    keys = set(secret["stringData"])
    referenced = set().union(*(secret_refs(doc) for doc in workloads()))
    assert keys == referenced
    assert all(PLACEHOLDER in value for value in secret["stringData"].values()), (
        "a template holds placeholders"
    )


def test_config_maps_referenced_exist_with_their_keys() -> None:
    maps = {cm["metadata"]["name"]: cm["data"] for cm in of_kind("ConfigMap")}
    for doc in workloads():
        for c in containers(doc):
            for source in c.get("envFrom", []):
                assert source["configMapRef"]["name"] in maps, doc["metadata"]["name"]
        for volume in pod_spec(doc).get("volumes", []):
            if "configMap" in volume:
                data = maps[volume["configMap"]["name"]]
                assert all(item["key"] in data for item in volume["configMap"].get("items", []))


def test_k8s_targets_load_and_their_tokens_reach_every_worker() -> None:
    targets = k8s_targets()
    token_envs = {cfg.token_env for cfg in targets}
    assert None not in token_envs
    (secret,) = of_kind("Secret")
    assert token_envs <= set(secret["stringData"])
    for doc in workloads():
        refs = secret_refs(doc)
        if containers(doc)[0]["args"][0] == "worker":
            assert token_envs <= refs, doc["metadata"]["name"]
        else:
            assert not token_envs & refs, f"{doc['metadata']['name']} does not need target secrets"


def test_k8s_worker_groups_cover_every_queue() -> None:
    by_name = {
        d["metadata"]["name"]: queues_of(containers(d)[0]["args"], d["metadata"]["name"])
        for d in deployment_running("worker")
    }
    assert by_name == {
        "idhub-worker-fanout": {FANOUT_QUEUE, ADMIN_QUEUE},
        "idhub-worker-targets": {cfg.queue for cfg in k8s_targets()},
    }


def test_keda_scales_workers_on_their_own_queues_and_never_beat() -> None:
    keda = [doc for name, doc in k8s_docs() if name.startswith("keda/")]
    scaled = of_kind("ScaledObject", keda)
    assert scaled
    workers = {d["metadata"]["name"]: d for d in deployment_running("worker")}
    for obj in scaled:
        target = obj["spec"]["scaleTargetRef"]["name"]
        assert target in workers, f"{obj['metadata']['name']} scales {target}, not a worker group"
        consumed = queues_of(containers(workers[target])[0]["args"], target)
        lists = {t["metadata"]["listName"] for t in obj["spec"]["triggers"] if t["type"] == "redis"}
        assert lists == consumed, target
    assert {o["spec"]["scaleTargetRef"]["name"] for o in scaled} == set(workers)


def test_k8s_urls_in_the_secret_template_are_well_formed() -> None:
    (secret,) = of_kind("Secret")
    data = secret["stringData"]
    assert Settings(database_url=data["IDHUB_DATABASE_URL"]).database_url.startswith("postgresql+psycopg://")
    for key in ("IDHUB_BROKER_URL", "IDHUB_REDIS_URL"):
        assert urlsplit(data[key]).scheme == "redis", key
