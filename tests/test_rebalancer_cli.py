"""`arb transfers list | show | plan | approve | cancel` as an operator runs them: real
processes against the test's Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import psycopg
import redis

from services.rebalancer.networks import TransferNetworkTable
from services.rebalancer.planner import Node, RebalancePlanner
from services.rebalancer.service import guard_and_record
from services.rebalancer.store import TransferStore
from shared.config import load_config
from shared.models import Transfer
from tests.conftest import ROOT
from tests.rebalancer_scenarios import (
    KIMCHI_ADDRESSES,
    KIMCHI_NETWORKS,
    KIMCHI_TARGETS,
    START,
    D,
    market_view,
    prepare,
    write_config,
)


def arb(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shared.cli", "transfers", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def stream_states(redis_url: str, namespace: str) -> list[tuple[str, str]]:
    client = redis.Redis.from_url(redis_url)
    entries = client.xrange(f"{namespace}:transfers")
    client.close()
    return [(t.transfer_id, t.state) for t in (msgspec.json.decode(f[b"d"], type=Transfer) for _, f in entries)]


def test_plan_dry_run_then_submit_approve_and_cancel(pg_url: str, service_env: dict[str, str], redis_url: str,
                                                     namespace: str, tmp_path: Path) -> None:
    prepare(pg_url, redis_url, namespace)
    env = {**service_env, "ARB_CONFIG": str(write_config(
        tmp_path / "arb.toml", paper_auto_approve=False, auto_approve=False,
        approval_caps={"BTC": 1, "KRW": 10_000_000, "USDT": 100_000}))}

    dry = arb(env, "plan", "--json")
    assert dry.returncode == 0, dry.stderr
    plans = json.loads(dry.stdout)["plans"]
    assert {(p["destination"], p["state"]) for p in plans} == {("upbit:BTC", "dry-run"), ("binance:USDT", "dry-run")}
    listed = arb(env, "list", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == []

    submitted = arb(env, "plan", "--submit", "--json")
    assert submitted.returncode == 0, submitted.stderr
    plans = {p["destination"]: p for p in json.loads(submitted.stdout)["plans"]}
    assert {p["state"] for p in plans.values()} == {"awaiting_approval"}
    usdt, btc = plans["binance:USDT"]["transfer_id"], plans["upbit:BTC"]["transfer_id"]
    assert [s["network"] for s in plans["binance:USDT"]["steps"]] == ["USDT/KRW", "TRON"]

    again = arb(env, "plan", "--json")  # both deficits are in flight now
    assert again.returncode == 0 and json.loads(again.stdout) == {"plans": [], "shortfalls": []}

    approved = arb(env, "approve", usdt, "--by", "alice")
    assert approved.returncode == 0, approved.stderr
    assert approved.stdout.strip() == f"{usdt} approved"
    twice = arb(env, "approve", usdt)
    assert twice.returncode == 1 and f"refused: transfer {usdt} is approved: cannot become approved" in twice.stderr
    cancelled = arb(env, "cancel", btc, "--reason", "moving it by hand")
    assert cancelled.returncode == 0 and cancelled.stdout.strip() == f"{btc} cancelled"
    missing = arb(env, "approve", "tr-doesnotexist")
    assert missing.returncode == 1 and "no transfer tr-doesnotexist" in missing.stderr

    listed = {t["transfer_id"]: t for t in json.loads(arb(env, "list", "--json").stdout)}
    assert listed[usdt]["state"] == "approved" and listed[usdt]["approved_by"] == "alice"
    assert listed[btc]["state"] == "cancelled" and listed[btc]["reason"] == "moving it by hand"
    shown = arb(env, "show", usdt)
    assert shown.returncode == 0 and "approved" in shown.stdout and "alice" in shown.stdout
    table = arb(env, "list")
    assert usdt in table.stdout and "upbit:KRW => upbit:USDT -TRON-> binance:USDT" in table.stdout

    published = stream_states(redis_url, namespace)
    assert (usdt, "approved") in published and (btc, "cancelled") in published
    assert [s for t, s in published if t == usdt] == ["planned", "awaiting_approval", "approved"]


def test_manual_request_and_bad_input(pg_url: str, service_env: dict[str, str], redis_url: str, namespace: str,
                                      tmp_path: Path) -> None:
    prepare(pg_url, redis_url, namespace)
    env = {**service_env, "ARB_CONFIG": str(write_config(tmp_path / "arb.toml"))}
    manual = arb(env, "plan", "--to", "upbit", "--asset", "BTC", "--amount", "0.1")
    assert manual.returncode == 0, manual.stderr
    assert "0.1 BTC to upbit from binance:BTC" in manual.stdout and "[dry-run]" in manual.stdout
    bad_amount = arb(env, "plan", "--to", "upbit", "--asset", "BTC", "--amount", "lots")
    assert bad_amount.returncode == 1 and "refused: --amount 'lots' is not a number" in bad_amount.stderr
    partial = arb(env, "plan", "--to", "upbit")
    assert partial.returncode == 2 and "go together" in partial.stderr
    broken = {**env, "ARB_CONFIG": str(write_config(tmp_path / "bad.toml", networks=[
        {"exchange": "upbit", "asset": "USDT", "network": "TRON", "withdraw_fee": "-1", "confirm_seconds": 60}]))}
    refused = arb(broken, "list")
    assert refused.returncode == 2
    assert "config error: rebalancer.networks[0].withdraw_fee -1 must not be negative" in refused.stderr


def test_missing_balance_refuses_to_plan(pg_url: str, service_env: dict[str, str], redis_url: str, namespace: str,
                                         tmp_path: Path) -> None:
    prepare(pg_url, redis_url, namespace)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DELETE FROM balances WHERE session = %s AND asset = 'KRW'", (namespace,))
    env = {**service_env, "ARB_CONFIG": str(write_config(tmp_path / "arb.toml"))}
    out = arb(env, "plan", "--submit")
    assert out.returncode == 1 and "refused: missing balance for upbit:KRW: nothing planned" in out.stderr
    assert json.loads(arb(env, "list", "--json").stdout) == []


def test_live_approval_rechecks_the_whitelist(pg_url: str, service_env: dict[str, str], namespace: str,
                                              tmp_path: Path) -> None:
    keys = {"BINANCE_API_KEY": "k1", "BINANCE_API_SECRET": "s1", "UPBIT_API_KEY": "k2", "UPBIT_API_SECRET": "s2"}
    live_env = {**service_env, **keys, "ARB_ENV": "staging", "ARB_TRADING__MODE": "live"}
    overrides = {"exchanges": {"okx": {"enabled": False}, "bybit": {"enabled": False}},
                 "rebalancer": {"targets": KIMCHI_TARGETS, "networks": KIMCHI_NETWORKS,
                                "addresses": KIMCHI_ADDRESSES}}
    cfg = load_config(environ=live_env, overrides=overrides)
    ms, marks = market_view(cfg)
    balances = {Node(ex, a): D(v) for ex, assets in START.items() for a, v in assets.items()}
    planner = RebalancePlanner(cfg.rebalancer, TransferNetworkTable.from_settings(cfg.rebalancer),
                               require_address=True)
    plan = next(p for p in planner.plan(balances, {}, ms, marks, time.time_ns()).plans
                if p.destination == Node("upbit", "BTC"))
    async def record() -> None:
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
            await guard_and_record(TransferStore(namespace, "live", "USDT"), conn, plan, cfg.rebalancer, "live",
                                   time.time_ns())

    asyncio.run(record())
    # Since the plan was made, Upbit's BTC deposit address in the whitelist was changed.
    moved = [dict(a, address="bc1qnewupbitaddress") if (a["exchange"], a["asset"]) == ("upbit", "BTC") else a
             for a in KIMCHI_ADDRESSES]
    env = {**live_env, "ARB_CONFIG": str(write_config(tmp_path / "live.toml", addresses=moved))}
    refused = arb(env, "approve", plan.transfer_id)
    assert refused.returncode == 1
    assert "refused: step 0: BTC to upbit on BTC: address is not the whitelisted one" in refused.stderr
    listed = json.loads(arb(env, "list", "--json").stdout)
    assert [(t["transfer_id"], t["state"]) for t in listed] == [(plan.transfer_id, "awaiting_approval")]
