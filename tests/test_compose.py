"""docker-compose.yml and deploy/: valid against the Compose Specification, and the rules
operators rely on (healthchecks, scalable services, pinned images, secrets out of git).

There is no compose CLI on this machine, so the file is interpolated the way `docker
compose config` does it (from the variables an operator copies out of .env.example) and
validated against the official compose-spec JSON schema that check-jsonschema ships.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.config import SERVICES, load_config, service_port

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
ARB_SERVICES = set(SERVICES)
"""Our services: each runs as replicas of one image and may be scaled."""

_VARIABLE = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>[A-Za-z_]\w*)")


class MissingVariable(Exception):
    pass


def interpolate(node: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution: ${V}, ${V:-default}, ${V-default}, ${V:?err}, ${V?err}, $$."""
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if not isinstance(node, str):
        return node

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("name") or m.group("bare")
        op, arg, value = m.group("op"), m.group("arg") or "", env.get(name)
        if op == ":-":
            return value or arg
        if op == "-":
            return arg if value is None else value
        if op in (":?", "?") and (value is None or (op == ":?" and not value)):
            raise MissingVariable(f"{name}: {arg}")
        return value or ""

    return _VARIABLE.sub(sub, node)


def env_example(path: Path, fill: str | None = "x-filled-in") -> dict[str, str]:
    """The variables of an example env file, with empty values filled in (as an operator would)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            name, _, value = line.partition("=")
            out[name] = value or (fill if fill is not None else "")
    return out


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


@pytest.fixture(scope="module")
def compose(raw: dict[str, Any]) -> dict[str, Any]:
    resolved: dict[str, Any] = interpolate(raw, env_example(ROOT / ".env.example"))
    return resolved


def _one_shot(name: str, svc: dict[str, Any], services: dict[str, Any]) -> bool:
    """A job others wait for to finish (migrations): no restart, nothing to health-check."""
    awaited = any((other.get("depends_on") or {}).get(name, {}).get("condition") == "service_completed_successfully"
                  for other in services.values() if isinstance(other.get("depends_on"), dict))
    return svc.get("restart") == "no" and awaited


def test_compose_file_is_valid_against_the_compose_specification(compose: dict[str, Any], tmp_path: Path) -> None:
    resolved = tmp_path / "docker-compose.resolved.yml"
    resolved.write_text(yaml.safe_dump(compose, sort_keys=False))
    checker = Path(sys.executable).parent / "check-jsonschema"
    out = subprocess.run([str(checker), "--builtin-schema", "vendor.compose-spec", str(resolved)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr

    broken = dict(compose, services={**compose["services"], "risk": {**compose["services"]["risk"], "restart": 7}})
    resolved.write_text(yaml.safe_dump(broken, sort_keys=False))
    out = subprocess.run([str(checker), "--builtin-schema", "vendor.compose-spec", str(resolved)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, "the schema check must reject a bad file"


def test_every_required_variable_is_listed_in_env_example(raw: dict[str, Any]) -> None:
    interpolate(raw, env_example(ROOT / ".env.example"))  # all there: no error
    with pytest.raises(MissingVariable, match="POSTGRES_PASSWORD"):
        interpolate(raw, env_example(ROOT / ".env.example", fill=None))  # copied but not filled in


def test_every_long_running_service_has_a_healthcheck_and_a_restart_policy(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, svc in services.items():
        if _one_shot(name, svc, services):
            continue
        check = svc.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"
        assert svc.get("restart") in ("always", "unless-stopped", "on-failure"), f"{name} restart policy"
    assert _one_shot("migrate", services["migrate"], services)


def test_arb_services_run_their_own_health_endpoint_as_healthcheck(compose: dict[str, Any]) -> None:
    for name in ARB_SERVICES:
        svc = compose["services"][name]
        assert svc["environment"]["ARB_SERVICE"] == name
        assert svc["healthcheck"]["test"] == ["CMD", "python", "-m", "shared.ops.probe"]  # uses ARB_SERVICE


def test_scalable_services_have_no_fixed_name_or_host_port(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) >= ARB_SERVICES
    for name in ARB_SERVICES:
        svc = compose["services"][name]
        assert "container_name" not in svc, name
        assert "ports" not in svc, name
        assert "hostname" not in svc, name
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond this host"


def test_images_are_pinned(compose: dict[str, Any]) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for name, svc in compose["services"].items():
        image = svc.get("image", "")
        repo, _, tag = image.rpartition(":")
        assert repo and tag, f"{name}: image {image!r} has no tag"
        if "build" in svc:
            assert image == f"arb:{version}", f"{name}: the app image is tagged with the package version"
        else:
            assert re.fullmatch(r"v?\d+\.\d+(\.\d+)*(-[\w.]+)?", tag), f"{name}: {image} is not pinned to a version"
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert base and re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base.group(1))


def test_everything_the_file_refers_to_exists(compose: dict[str, Any]) -> None:
    services = compose["services"]
    declared_volumes = set(compose.get("volumes") or {})
    for name, svc in services.items():
        for dep in svc.get("depends_on") or {}:
            assert dep in services, f"{name} depends on unknown {dep}"
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared_volumes, f"{name} uses undeclared volume {source}"
        if "build" in svc:
            assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).exists()
        for env_file in svc.get("env_file", []):
            path = ROOT / (env_file["path"] if isinstance(env_file, dict) else env_file)
            assert Path(f"{path}.example").exists(), f"{name}: no example for {path}"
            assert env_file.get("required") is False, f"{name}: {path} must be optional (a fresh clone has none)"


def test_secrets_stay_out_of_git(compose: dict[str, Any]) -> None:
    env_files = {".env"} | {e["path"] for s in compose["services"].values() for e in s.get("env_file", [])}
    for path in env_files:
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert ignored.returncode == 0, f"{path} is not git-ignored"
        assert subprocess.run(["git", "check-ignore", "-q", f"{path}.example"], cwd=ROOT).returncode == 1
    secret = re.compile(r"(PASSWORD|TOKEN|SECRET|API_KEY|PASSPHRASE)$")
    for example in (ROOT / ".env.example", ROOT / "deploy" / "env" / "arb.env.example"):
        for name, value in env_example(example, fill=None).items():
            if secret.search(name):
                assert value == "", f"{example.name} holds a value for {name}"
    dockerignore = (ROOT / ".dockerignore").read_text().split()
    assert "*.env" in dockerignore and "deploy/env" in dockerignore


def test_dockerfile_is_multi_stage_non_root_with_a_healthcheck() -> None:
    text = DOCKERFILE.read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*shared\.ops\.probe", text, re.M)
    for source in re.findall(r"^COPY (?!--from)(\S+)", text, re.M):
        assert (ROOT / source).exists(), source


def test_prometheus_finds_every_replica_of_every_service_by_dns(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "arb"]
    cfg = load_config(environ={"ARB_HTTP__BASE_PORT": "9100"})
    found = {}
    for sd in job["dns_sd_configs"]:
        assert sd["type"] == "A"  # Docker's DNS answers a service name with every replica's address
        [name] = sd["names"]
        found[name] = sd["port"]
    assert found == {name: service_port(cfg, name) for name in ARB_SERVICES}
    for name, port in found.items():
        assert compose["services"][name]["expose"] == [str(port)]
    assert {"source_labels": ["__meta_dns_name"], "target_label": "service"} in job["relabel_configs"]
    targets = {t for j in config["scrape_configs"] for sc in j.get("static_configs", []) for t in sc["targets"]}
    for exporter, port in (("redis-exporter", 9121), ("postgres-exporter", 9187)):
        assert f"{exporter}:{port}" in targets and exporter in compose["services"]


def test_grafana_provisioning_matches_the_compose_mounts(compose: dict[str, Any]) -> None:
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/dashboards.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{path}:ro" in mounts
    sources = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/datasources.yml").read_text())
    types = {d["uid"]: d["type"] for d in sources["datasources"]}
    assert types == {"prometheus": "prometheus", "postgres": "grafana-postgresql-datasource",
                     "clickhouse": "grafana-clickhouse-datasource"}
    env = compose["services"]["grafana"]["environment"]
    text = (ROOT / "deploy/grafana/provisioning/datasources/datasources.yml").read_text()
    for variable in re.findall(r"\$\{(\w+)\}", text):
        assert variable in env, f"datasources.yml needs {variable} in grafana's environment"
    assert "grafana-clickhouse-datasource" in env["GF_INSTALL_PLUGINS"]


def test_server_configs_parse() -> None:
    for xml_file in (ROOT / "deploy" / "clickhouse").rglob("*.xml"):
        assert ET.parse(xml_file).getroot().tag == "clickhouse"
    out = subprocess.run(["amtool", "check-config", str(ROOT / "deploy/alertmanager/alertmanager.yml")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_postgres_init_creates_a_read_only_grafana_role_and_a_monitoring_role(
        database_url: str, namespace: str) -> None:
    import psycopg
    from psycopg import sql

    db = f"{namespace}_init"
    reader, exporter = f"{namespace}_grafana", f"{namespace}_exporter"
    admin = psycopg.connect(database_url, autocommit=True)
    owner = admin.execute("SELECT current_user").fetchone()[0]  # type: ignore[index]
    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    info = psycopg.conninfo.conninfo_to_dict(database_url)
    try:
        env = {"PATH": "/usr/bin:/bin", "POSTGRES_USER": owner, "POSTGRES_DB": db,
               "GRAFANA_DB_USER": reader, "GRAFANA_DB_PASSWORD": "pw-reader",
               "EXPORTER_DB_USER": exporter, "EXPORTER_DB_PASSWORD": "pw-exporter",
               "PGHOST": str(info.get("host", "127.0.0.1")), "PGPORT": str(info.get("port", 5432))}
        out = subprocess.run(["sh", str(ROOT / "deploy/postgres/init/10-roles.sh")], env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        with psycopg.connect(psycopg.conninfo.make_conninfo(database_url, dbname=db), autocommit=True) as conn:
            conn.execute("CREATE TABLE trades (x int)")  # a migration, after the init
            conn.execute("INSERT INTO trades VALUES (1)")
            conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(reader)))
            assert conn.execute("SELECT x FROM trades").fetchone() == (1,)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("DELETE FROM trades")
            conn.execute("RESET ROLE")
            member = conn.execute("SELECT pg_has_role(%s, 'pg_monitor', 'member')", (exporter,)).fetchone()
            assert member == (True,)
    finally:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db)))
        for role in (reader, exporter):
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
        admin.close()
