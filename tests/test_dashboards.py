"""The Grafana dashboards: well formed, using only metrics of the contract (docs/metrics.md),
SQL panels valid against the real schemas, and every PromQL panel answered by a real
Prometheus (Debian's package) scraping the embedded stack while traffic flows."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from arb_stack import ALL_SERVICES, running_stack
from conftest import drop_redis_namespace

from shared.embedded import free_port

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
RULES = sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))
DATASOURCES = {"prometheus", "postgres", "clickhouse"}
EXPORTER_PREFIXES = ("redis_", "pg_", "process_")


@dataclass(frozen=True)
class Target:
    dashboard: str
    panel: str
    datasource: str
    query: str

    def __str__(self) -> str:
        return f"{self.dashboard} / {self.panel}: {self.query}"


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def targets(datasource: str | None = None) -> list[Target]:
    out = []
    for path in DASHBOARDS:
        board = load(path)
        for panel in board["panels"]:
            for t in panel.get("targets", []):
                uid = t["datasource"]["uid"]
                if datasource is None or uid == datasource:
                    out.append(Target(board["uid"], panel["title"], uid, t.get("expr") or t.get("rawSql", "")))
    return out


def promql(expr: str, rate_interval: str = "1m") -> str:
    """A panel's expression as Grafana sends it, with its variables at their 'All' values."""
    return expr.replace("$__rate_interval", rate_interval).replace("$exchange", ".*")


def metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\b((?:arb|redis|pg|process)_[a-z0-9_]+)", expr))
    return {re.sub(r"_(bucket|count|sum)$", "", n) if n.endswith(("_bucket", "_count", "_sum"))
            and n.startswith("arb_") else n for n in names}


def contract() -> set[str]:
    text = (ROOT / "docs" / "metrics.md").read_text()
    return set(re.findall(r"^\| `([a-z0-9_]+)`", text, re.M))


# ----------------------------------------------------------------------------- static


def test_dashboards_are_well_formed_grafana_json() -> None:
    assert {p.stem for p in DASHBOARDS} == {"pipeline", "market-data", "trading", "infrastructure"}
    uids = set()
    for path in DASHBOARDS:
        board = load(path)
        assert board["uid"] not in uids and board["title"].startswith("arb / ")
        uids.add(board["uid"])
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for panel in board["panels"]:
            pos = panel["gridPos"]
            assert pos["x"] + pos["w"] <= 24, f"{path.name} / {panel['title']} is wider than the grid"
            if panel["type"] == "row":
                continue
            assert panel["title"] and panel.get("description"), panel
            assert panel["datasource"]["uid"] in DATASOURCES
            assert panel["targets"], f"{path.name} / {panel['title']} has no query"
            for t in panel["targets"]:
                assert t["datasource"]["uid"] in DATASOURCES
                assert t.get("expr") or t.get("rawSql"), panel["title"]


def test_dashboards_cover_what_operators_ask() -> None:
    exprs = " ".join(t.query for t in targets("prometheus"))
    for metric in ("arb_stream_messages_in_total", "arb_stream_messages_out_total", "arb_hop_latency_seconds",
                   "arb_consumer_group_lag", "arb_consumer_group_pending", "arb_collector_resyncs_total",
                   "arb_collector_reconnects_total", "arb_collector_book_stale", "arb_detector_signals_total",
                   "arb_risk_decisions_total", "arb_executor_fills_total", "arb_executor_realised_pnl",
                   "arb_executor_balance", "arb_dlq_length", "arb_detector_premium_ratio", "arb_risk_exposure",
                   "redis_up", "pg_up"):
        assert metric in exprs, f"no panel shows {metric}"


def test_dashboards_and_rules_use_only_metrics_of_the_contract() -> None:
    known = contract()
    used: dict[str, str] = {}
    for t in targets("prometheus"):
        used.update({name: str(t) for name in metric_names(t.query)})
    for path in RULES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                used.update({name: f"rule {rule.get('alert')}" for name in metric_names(rule["expr"])})
    unknown = {n: where for n, where in used.items() if n.startswith("arb_") and n not in known}
    assert not unknown, f"not in docs/metrics.md: {unknown}"


def test_every_metric_defined_in_code_is_in_the_contract() -> None:
    import importlib

    modules = [importlib.import_module(name) for name in (
        "shared.metrics", "services.alerter.metrics", "services.collector.metrics", "services.detector.metrics",
        "services.risk.metrics", "services.executor.metrics", "services.rebalancer.metrics")]
    defined = {"arb_collector_book_age_seconds"}  # computed at scrape time (services.collector.metrics.BOOK_AGE)
    for module in modules:
        for value in vars(module).values():
            name = getattr(value, "_name", None)
            if isinstance(name, str) and name.startswith("arb_"):
                kind = getattr(value, "_type", "")
                defined.add(name + ("_total" if kind == "counter" else ""))
    assert defined - contract() == set()


def test_every_panel_expression_parses_as_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: `apt-get install prometheus`"
    rules = {"groups": [{"name": "panels", "rules": [
        {"record": f"panel:check:{i}", "expr": promql(t.query)} for i, t in enumerate(targets("prometheus"))]}]}
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump(rules))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _pg_sql(sql: str, session: str) -> str:
    sql = re.sub(r"\$__timeFilter\((\w+)\)", r"\1 > now() - interval '1 hour'", sql)
    return sql.replace("$session", session)


def test_postgres_panels_run_against_the_migrated_schema(pg_url: str, namespace: str) -> None:
    panels = targets("postgres")
    assert len(panels) >= 3
    with psycopg.connect(pg_url) as conn:
        conn.execute("INSERT INTO system_logs (session, service, level, message) VALUES (%s, 'risk', 'ERROR', 'x')",
                     (namespace,))
        for t in panels:
            assert "$" not in _pg_sql(t.query, namespace), t
            conn.execute(_pg_sql(t.query, namespace).encode())  # raises on a wrong table or column
        rows = conn.execute(_pg_sql(next(t for t in panels if "system_logs" in t.query).query, namespace).encode())
        assert rows.fetchall()[0][1:4] == ("risk", "ERROR", "x")


def test_clickhouse_panels_run_against_the_tick_schema(tmp_path: Path) -> None:
    from shared.clickhouse import connect, ensure_schema

    panels = targets("clickhouse")
    assert panels
    client = connect(f"chdb://{tmp_path / 'ch'}")
    ensure_schema(client)
    client.command("INSERT INTO spread_history VALUES ('BTC', 'spatial', 'binance', 'BTC/USDT', 'upbit', "
                   "'BTC/KRW', now64(9), 12.5, 7.5, 1380, 1000)")
    for t in panels:
        sql = re.sub(r"\$__timeFilter\((\w+)\)", r"\1 >= now() - INTERVAL 1 HOUR", t.query)
        sql = re.sub(r"\$__timeInterval\((\w+)\)", r"toStartOfInterval(toDateTime(\1), INTERVAL 60 second)", sql)
        assert "$" not in sql, t
        rows = client.query(sql).result_rows
        assert rows and rows[0][1] == "BTC binance -> upbit" and rows[0][2] == 7.5


# ----------------------------------------------------------------------------- a real Prometheus


@dataclass
class Observed:
    prometheus: str
    start: float
    end: float
    namespace: str

    def get(self, path: str, **params: Any) -> dict[str, Any]:
        import urllib.parse
        import urllib.request

        url = f"{self.prometheus}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                data: dict[str, Any] = json.loads(resp.read())
        except urllib.error.HTTPError as err:  # 400 on a bad expression: return the error body
            data = json.loads(err.read())
        return data

    def range_query(self, expr: str) -> dict[str, Any]:
        return self.get("/api/v1/query_range", query=expr, start=self.start, end=self.end, step="1s")


def _wait_http(url: str, timeout: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{url} not ready"
        time.sleep(0.2)


def _prometheus_config(targets: Path, redis_exporter: str, pg_exporter: str, self_address: str) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with its DNS discovery replaced by a file of the stack's
    instances (``_write_targets``; same job, same relabelling, so dashboards and rules see the
    labels they see in compose)."""
    config: dict[str, Any] = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="900ms", evaluation_interval="1s")
    slow = {"scrape_interval": "2s", "scrape_timeout": "1900ms"}  # exporters query their server
    config["rule_files"] = [str(p) for p in RULES]
    config.pop("alerting")
    jobs = []
    for job in config["scrape_configs"]:
        if job["job_name"] == "arb":
            job.pop("dns_sd_configs")
            job["file_sd_configs"] = [{"files": [str(targets)], "refresh_interval": "1s"}]
        elif job["job_name"] == "redis":
            job.update(slow, static_configs=[{"targets": [redis_exporter]}])
        elif job["job_name"] == "postgres":
            job.update(slow, static_configs=[{"targets": [pg_exporter]}])
        elif job["job_name"] == "prometheus":
            job["static_configs"] = [{"targets": [self_address]}]
        else:
            continue  # ClickHouse: the embedded stack runs chDB, which has no metrics endpoint
        jobs.append(job)
    config["scrape_configs"] = jobs
    return config


def _write_targets(path: Path, report: dict[str, Any]) -> None:
    """The instances ``arb status`` reports, as Prometheus file discovery reads them (it watches the file)."""
    instances: dict[str, list[str]] = {}
    for s in report["services"]:
        instances.setdefault(s["service"], []).append(f"127.0.0.1:{s['http_port']}")
    groups = [{"targets": addrs, "labels": {"__meta_dns_name": name}} for name, addrs in sorted(instances.items())]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(groups))
    tmp.replace(path)


def _exporter_dsn(database_url: str) -> str:
    """The test database for postgres-exporter (lib/pq: TLS must be turned off explicitly)."""
    base, _, query = database_url.partition("?")
    options = [o for o in query.split("&") if o and not o.startswith("options=")]
    return base + "?" + "&".join([*options, "sslmode=disable"])


@contextlib.contextmanager
def _process(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


SPEED = 12.0
"""The scenario's 346 recorded seconds in about 29 s of wall time."""
FAULTED = ["binance/cryptofeed_BINANCE.ws.1.0.txt", "binance/cryptofeed_BINANCE.http.0.0.txt",
           "binance/cryptofeed_BINANCE.0.txt"]
"""30 s of recorded Binance NKN/USDT traffic for the collector that meets exchange faults."""


def _scenario_env(scenario: Any) -> dict[str, str]:
    """The demo's configuration: every service in paper mode on the bundled scenario, tuned so that
    each kind of event a panel shows happens within the run."""
    from backtest.runner import SCENARIO_CONFIG

    return {
        "ARB_CONFIG": str(SCENARIO_CONFIG), "ARB_TRADING__MODE": "paper",
        # At 12x the recorded pace a wall-clock cooldown or latency is 12x longer in market time:
        # a short cooldown, and the default paper latency (600 ms of market time, so some arbitrages lose).
        "ARB_DETECTOR__COOLDOWN_MS": "200",
        "ARB_EXECUTOR__ORDER_LATENCY_MS": "50",
        # A strict breaker: the first losing arbitrage trips it, briefly.
        "ARB_RISK__CIRCUIT_BREAKER_LOSSES": "1",
        "ARB_RISK__CIRCUIT_BREAKER_HALT_S": "2",
        # Upbit starts short of BTC and Binance holds more than it needs: a transfer, confirmed in 2 s.
        "ARB_REBALANCER__INTERVAL_S": "1",
        "ARB_REBALANCER__TARGETS": json.dumps([
            {"exchange": "upbit", "asset": "BTC", "target": "0.34", "low": "0.32"},
            {"exchange": "binance", "asset": "BTC", "target": "0.2", "low": "0.1"},
        ]),
        "ARB_REBALANCER__NETWORKS": json.dumps([
            {"exchange": ex, "asset": "BTC", "network": "BTC", "withdraw_fee": "0.0002", "confirm_seconds": 2}
            for ex in ("binance", "upbit")
        ]),
    }


def _replay_collector_env(env: dict[str, str], scenario: Any, fx_url: str) -> dict[str, str]:
    """The collector of the scenario's markets: Binance BTC/USDT and Upbit BTC/KRW, USDT/KRW in
    replay mode at SPEED, with a USD/KRW reference 1% off Upbit's USDT/KRW (the divergence
    gauge and its alert). It owns the embedded chDB."""
    return {
        **env,
        "ARB_COLLECTOR__REPLAY": json.dumps(scenario.captures),
        "ARB_COLLECTOR__REPLAY_SPEED": repr(SPEED),
        "ARB_COLLECTOR__BBO": "false",  # nothing downstream reads bookTicker; it would triple md.BTC
        "ARB_COLLECTOR__FX_REFERENCE_URL": fx_url,
        "ARB_COLLECTOR__FX_REFERENCE_FIELD": "rates.KRW",
        "ARB_COLLECTOR__FX_REFERENCE_INTERVAL_MS": "1000",
        "ARB_COLLECTOR__FX_MAX_DIVERGENCE": "0.005",
    }


def _faulted_collector_env(env: dict[str, str], simulator: str) -> dict[str, str]:
    """A second collector, as collectors split by symbol set run: Binance NKN/USDT from the local
    simulator, whose faults give the resync, reconnect, malformed and stale-book panels their events."""
    return {
        **env,
        "ARB_CLICKHOUSE__ENABLED": "false",  # the replaying collector owns the embedded chDB
        "ARB_EXCHANGES__UPBIT__ENABLED": "false",
        "ARB_EXCHANGES__BINANCE__SYMBOLS": '["NKN/USDT"]',
        "ARB_EXCHANGES__BINANCE__WS_URL": f"ws://{simulator}",
        "ARB_EXCHANGES__BINANCE__REST_URL": f"http://{simulator}",
        "ARB_COLLECTOR__RECONNECT_MAX_MS": "500",  # a simulator starting late is found at once
        "ARB_COLLECTOR__STALE_AFTER_MS": "1000",  # the stalled exchange turns the book stale within the run
    }


def _faults(files: list[Path]) -> list[str]:
    """`arb simulator` fault options aimed at the recording's own frames: a lost diff (a gap,
    resynced from REST), a garbled bookTicker (malformed), a closed connection (a reconnect) and a
    stalled exchange (a stale book), spread over the run."""
    from shared.simulator import simulator

    sim = simulator("binance", files)
    depth = sim.indices(lambda r: b"nknusdt@depth" in r.data[:40])
    ticker = sim.indices(lambda r: b"nknusdt@bookTicker" in r.data[:40])
    at = lambda frames, share: frames[int(len(frames) * share)]  # noqa: E731
    return ["--drop", str(at(depth, 0.15)), "--garble", str(at(ticker, 0.3)),
            "--close-at", str(at(depth, 0.45)), "--stall", f"{at(depth, 0.65)}:1.5"]


@contextlib.contextmanager
def _reference_fx(rate: float) -> Iterator[str]:
    """A USD/KRW quote over HTTP, as a rates API gives it."""
    import http.server
    import threading

    body = json.dumps({"base": "USD", "rates": {"KRW": rate}}).encode()

    class Quote(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quote)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/latest"
    finally:
        server.shutdown()
        server.server_close()


def _wait_collectors(stack: Any, count: int, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        report: dict[str, Any] = stack.status()
        if sum(1 for s in report.get("services", []) if s["service"] == "collector") >= count:
            return report
        assert time.monotonic() < deadline, f"{count} collectors not up in {timeout}s: {report}"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def observed(redis_url: str, database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    """Prometheus first, then the stack (`arb up`) in paper mode, then two collectors: one replaying
    the bundled scenario at SPEED through all of it, one on a faulty simulated exchange."""
    for binary in ("prometheus", "prometheus-redis-exporter", "prometheus-postgres-exporter"):
        assert shutil.which(binary), f"{binary} not found: `apt-get install prometheus " \
                                     "prometheus-redis-exporter prometheus-postgres-exporter`"
    from backtest.scenario import ScenarioParams, ensure, fx_level
    from shared.db import with_schema

    namespace = f"t{uuid.uuid4().hex[:12]}"
    tmp = tmp_path_factory.mktemp("observed")
    scenario = ensure(ScenarioParams(), tmp_path_factory.mktemp("scenarios"))
    faulted = [ROOT / "tests" / "fixtures" / f for f in FAULTED]
    sim = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARB_")}
    env.update({"REDIS_URL": redis_url, "DATABASE_URL": with_schema(database_url, namespace),
                "CLICKHOUSE_URL": f"chdb://{tmp / 'clickhouse'}", "ARB_SESSION": namespace,
                "ARB_REDIS__STREAM_PREFIX": f"{namespace}:", "ARB_HTTP__BASE_PORT": "0",
                "ARB_VAR_DIR": str(tmp / "var"), "PYTHONUNBUFFERED": "1",
                **_scenario_env(scenario)})
    targets = tmp / "targets.json"
    targets.write_text("[]")
    redis_exporter, pg_exporter, prom = (f"127.0.0.1:{free_port()}" for _ in range(3))
    config = tmp / "prometheus.yml"
    config.write_text(yaml.safe_dump(_prometheus_config(targets, redis_exporter, pg_exporter, prom)))
    redis_addr = redis_url.split("://", 1)[1].rsplit("/", 1)[0]
    try:
        with _process(["prometheus-redis-exporter", f"-redis.addr=redis://{redis_addr}",
                       f"-web.listen-address={redis_exporter}"], tmp / "redis-exporter.log"), \
             _process(["prometheus-postgres-exporter", f"--web.listen-address={pg_exporter}"],
                      tmp / "postgres-exporter.log",
                      env={**os.environ, "DATA_SOURCE_NAME": _exporter_dsn(database_url)}), \
             _process(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                       f"--web.listen-address={prom}"], tmp / "prometheus.log"), \
             _reference_fx(round(float(fx_level(scenario.model)) * 0.99, 2)) as fx_url, \
             running_stack(env, tmp, tuple(s for s in ALL_SERVICES if s != "collector")) as stack:
            _wait_http(f"http://{prom}/-/ready", 30)
            _write_targets(targets, stack.status())
            start = time.time()
            with _process([sys.executable, "-m", "services.collector"], tmp / "collector-replay.log",
                          env=_replay_collector_env(env, scenario, fx_url)), \
                 _process([sys.executable, "-m", "services.collector"], tmp / "collector-faulted.log",
                          env=_faulted_collector_env(env, sim)), \
                 _process([sys.executable, "-m", "shared.cli", "simulator", "binance=" + ",".join(map(str, faulted)),
                           "--speed", "1", "--port", sim.rsplit(":", 1)[1], *_faults(faulted)],
                          tmp / "simulator.log"):
                _write_targets(targets, _wait_collectors(stack, 2, 30))
                # The whole recording (it starts a second after the collector), then the last
                # arbitrages and a transfer's confirmation.
                time.sleep(max(0.0, start + 1 + scenario.duration_s / SPEED - time.time()) + 4)
                time.sleep(2)  # the last scrapes and rule evaluations
                yield Observed(f"http://{prom}", start, time.time(), namespace)
    finally:
        drop_redis_namespace(redis_url, namespace)
        with contextlib.suppress(Exception), psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE')


@pytest.mark.slow
def test_prometheus_scrapes_every_service_and_exporter(observed: Observed) -> None:
    active = observed.get("/api/v1/targets")["data"]["activeTargets"]
    health = {(t["labels"]["job"], t["labels"].get("service", "")): t["health"] for t in active}
    for service in ALL_SERVICES:
        assert health.get(("arb", service)) == "up", health
    assert health.get(("redis", "")) == "up" and health.get(("postgres", "")) == "up", health


@pytest.mark.slow
def test_alert_rules_evaluate_without_errors_on_live_data(observed: Observed) -> None:
    groups = observed.get("/api/v1/rules")["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) >= 13
    broken = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert not broken, broken
    never = [r["name"] for r in rules if r.get("lastEvaluation", "").startswith("0001")]
    assert not never, f"not evaluated yet: {never}"


@pytest.mark.slow
def test_prometheus_accepts_every_panel_expression(observed: Observed) -> None:
    errors = {}
    for t in targets("prometheus"):
        answer = observed.range_query(promql(t.query, "10s"))
        if answer.get("status") != "success":
            errors[str(t)] = answer.get("error")
    assert not errors, json.dumps(errors, indent=2)


def _has_data(answer: dict[str, Any]) -> bool:
    return any(not math.isnan(float(v)) for series in answer["data"]["result"] for _, v in series["values"])


@pytest.mark.slow
def test_every_panel_expression_returns_data(observed: Observed) -> None:
    empty = [str(t) for t in targets("prometheus") if not _has_data(observed.range_query(promql(t.query, "10s")))]
    report = f"{len(empty)} of {len(targets('prometheus'))} panel expressions return no data:\n" + "\n".join(empty)
    assert not empty, report


@pytest.mark.slow
def test_the_replay_fills_the_clickhouse_tables_the_sql_panels_read(observed: Observed) -> None:
    """The market-data SQL panels read ClickHouse: books from the collector, route edges from the
    detector through the collector (`spreads`), both written while the scenario traded."""
    answer = observed.get("/api/v1/query", query="sum by (table) (arb_collector_clickhouse_rows_total)",
                          time=observed.end)
    rows = {r["metric"]["table"]: float(r["value"][1]) for r in answer["data"]["result"]}
    assert rows.get("orderbook_snapshots", 0) > 1000 and rows.get("spread_history", 0) > 10, rows
