"""`arb transfers list | show | plan | approve | cancel`.

Exit codes: 0 done; 1 refused (unknown transfer, a transition the state machine forbids,
a destination off the whitelist, bad planning input); 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import psycopg
import redis.exceptions

from services.rebalancer.networks import TransferNetworkTable
from services.rebalancer.planner import Node, PlanningInputError, PlanningResult, RebalancePlanner
from services.rebalancer.service import MarketReader, guard_and_record, latest_balances, market_assets, total_effects
from services.rebalancer.store import TransferNotFound, TransferRecord, TransferStore
from services.rebalancer.transfers import ALL_STATES, IllegalTransition, NotWhitelisted, check_whitelist
from shared.config import Config, ConfigError, load_config
from shared.ledger import load_balances
from shared.logs import Redactor
from shared.runtime import Bus
from shared.streams import KeySpace


def cmd_transfers(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="arb transfers", description="Rebalancing transfers: inspect, plan, approve.")
    p.add_argument("--config")
    sub = p.add_subparsers(dest="action", required=True)
    ls = sub.add_parser("list", help="transfers of this session, newest first")
    ls.add_argument("--state", action="append", choices=ALL_STATES, help="only these states (repeatable)")
    ls.add_argument("--limit", type=int, default=50)
    ls.add_argument("--json", action="store_true")
    show = sub.add_parser("show", help="one transfer with its steps and history")
    show.add_argument("transfer_id")
    show.add_argument("--json", action="store_true")
    plan = sub.add_parser("plan", help="plan now from current balances (dry run unless --submit)")
    plan.add_argument("--to", dest="exchange", help="manual request: destination exchange")
    plan.add_argument("--asset", help="manual request: asset to deliver")
    plan.add_argument("--amount", help="manual request: amount to deliver")
    plan.add_argument("--submit", action="store_true", help="record and publish the plans")
    plan.add_argument("--json", action="store_true")
    approve = sub.add_parser("approve", help="approve a transfer awaiting approval")
    approve.add_argument("transfer_id")
    approve.add_argument("--by", default=os.environ.get("USER", "operator"), help="who approves (recorded)")
    cancel = sub.add_parser("cancel", help="cancel a transfer that has not been sent")
    cancel.add_argument("transfer_id")
    cancel.add_argument("--reason", default="cancelled by operator")
    cancel.add_argument("--by", default=os.environ.get("USER", "operator"))
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.action == "plan" and any((args.exchange, args.asset, args.amount)) and not all(
        (args.exchange, args.asset, args.amount)
    ):
        print("arb transfers plan: --to, --asset and --amount go together", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(cfg, args))
    except (TransferNotFound, IllegalTransition, NotWhitelisted, PlanningInputError) as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    except psycopg.errors.UndefinedTable:
        print("the database has no transfers table yet: run `arb db migrate`", file=sys.stderr)
        return 1
    except psycopg.OperationalError as exc:
        print(f"database unreachable: {Redactor()(str(exc).strip().splitlines()[0])}", file=sys.stderr)
        return 1
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        print(f"redis unreachable: {Redactor()(str(exc))}", file=sys.stderr)
        return 1


def _urls(cfg: Config) -> tuple[str, str]:
    """The running stack's servers unless REDIS_URL / DATABASE_URL say otherwise."""
    from shared.launcher import Stack

    redis_url, database_url = cfg.redis.url, cfg.postgres.url
    stack = Stack.read(Path(cfg.var_dir).resolve())
    if stack is not None:
        redis_url = os.environ.get("REDIS_URL") or stack.redis_url
        database_url = os.environ.get("DATABASE_URL") or stack.database_url
    return redis_url, database_url


async def _run(cfg: Config, args: argparse.Namespace) -> int:
    redis_url, database_url = _urls(cfg)
    bus = Bus.from_url(redis_url, prefix=cfg.redis.stream_prefix, keys=KeySpace(cfg.env, cfg.session))
    store = TransferStore(cfg.session, cfg.trading.mode, cfg.trading.reference_currency)
    try:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            if args.action == "list":
                records = await store.list_transfers(conn, args.state, args.limit)
                _print_list(records, args.json)
                return 0
            if args.action == "show":
                record = await _get(store, conn, args.transfer_id)
                _print_show(record, await store.events(conn, record.transfer_id), args.json)
                return 0
            if args.action == "plan":
                return await _plan(cfg, args, bus, store, conn)
            now_ns = time.time_ns()
            if args.action == "approve":
                record = await _get(store, conn, args.transfer_id)
                if record.mode == "live":  # the whitelist may have changed since the plan was made
                    check_whitelist([s.step for s in record.steps], cfg.rebalancer)
                record = await store.transition(conn, args.transfer_id, "approved",
                                                reason=f"approved by {args.by}", actor=args.by, now_ns=now_ns)
            else:
                record = await store.transition(conn, args.transfer_id, "cancelled", reason=args.reason,
                                                actor=args.by, now_ns=now_ns)
            await store.publish_pending(conn, bus)
            print(f"{record.transfer_id} {record.state}")
            return 0
    finally:
        await bus.close()


async def _get(store: TransferStore, conn: psycopg.AsyncConnection, transfer_id: str) -> TransferRecord:
    record = await store.get(conn, transfer_id)
    if record is None:
        raise TransferNotFound(f"no transfer {transfer_id} in session {store.session} ({store.mode})")
    return record


async def _plan(cfg: Config, args: argparse.Namespace, bus: Bus, store: TransferStore,
                conn: psycopg.AsyncConnection) -> int:
    now_ns = time.time_ns()
    settings = cfg.rebalancer
    networks = TransferNetworkTable.from_settings(settings)
    planner = RebalancePlanner(settings, networks, require_address=cfg.trading.mode == "live")
    markets, marks = await MarketReader(cfg, bus, market_assets(cfg)).read(now_ns)
    if cfg.trading.mode == "live":
        balances = {node: b.free for node, b in (await latest_balances(bus, "live")).items()}
    else:
        rows = await load_balances(conn, cfg.session, "paper")
        balances = {Node(ex, asset): free for (ex, asset), (free, _) in rows.items()}
    in_flight = total_effects(await store.open_transfers(conn))
    if args.amount is not None:
        try:
            amount = Decimal(args.amount)
        except InvalidOperation:
            raise PlanningInputError(f"--amount {args.amount!r} is not a number") from None
        result = planner.plan_request(Node(args.exchange, args.asset), amount, balances, in_flight, markets, marks,
                                      now_ns)
    else:
        result = planner.plan(balances, in_flight, markets, marks, now_ns)
    states: dict[str, str] = {}
    if args.submit:
        for plan in result.plans:
            record, state, _ = await guard_and_record(store, conn, plan, settings, cfg.trading.mode, now_ns,
                                                      actor=os.environ.get("USER", "operator"))
            states[plan.transfer_id] = state if record is not None else "exists"
        await store.publish_pending(conn, bus)
    _print_plans(result, states, cfg.trading.reference_currency, args.json)
    return 0 if result.plans or not result.shortfalls else 1


# --------------------------------------------------------------------------- output


def _record_doc(r: TransferRecord) -> dict[str, Any]:
    return {
        "transfer_id": r.transfer_id, "state": r.state, "mode": r.mode, "asset": r.asset,
        "from": f"{r.from_exchange}:{r.from_asset}", "from_amount": str(r.from_amount),
        "to": f"{r.to_exchange}:{r.asset}", "amount": str(r.amount),
        "expected_cost": str(r.expected_cost), "cost_currency": r.cost_currency,
        "expected_seconds": r.expected_seconds, "reason": r.reason, "approved_by": r.approved_by,
        "created_ns": r.created_ns, "updated_ns": r.updated_ns,
        "steps": [
            {"kind": s.step.kind, "from": f"{s.step.from_exchange}:{s.step.from_asset}",
             "to": f"{s.step.to_exchange}:{s.step.to_asset}", "network": s.step.network,
             "amount": str(s.step.amount), "fee": str(s.step.fee), "amount_out": str(s.step.amount_out),
             "address": s.step.address, "state": s.state,
             "debited": None if s.debited is None else str(s.debited),
             "credited": None if s.credited is None else str(s.credited)}
            for s in r.steps
        ],
    }


def _route_text(r: TransferRecord) -> str:
    hops = [f"{r.from_exchange}:{r.from_asset}"]
    for s in r.steps:
        via = f"-{s.step.network}->" if s.step.kind == "withdrawal" else "=>"
        hops.append(f"{via} {s.step.to_exchange}:{s.step.to_asset}")
    return " ".join(hops)


def _print_list(records: list[TransferRecord], as_json: bool) -> None:
    if as_json:
        print(json.dumps([_record_doc(r) for r in records], indent=2))
        return
    if not records:
        print("no transfers")
        return
    print(f"{'TRANSFER':<24} {'STATE':<18} {'AMOUNT':>18} {'COST':>12} {'SECONDS':>8}  ROUTE")
    for r in records:
        print(f"{r.transfer_id:<24} {r.state:<18} {str(r.amount) + ' ' + r.asset:>18} "
              f"{r.expected_cost:>12.2f} {r.expected_seconds:>8.0f}  {_route_text(r)}")


def _print_show(r: TransferRecord, events: list[tuple[str, str, str, int]], as_json: bool) -> None:
    doc = _record_doc(r)
    doc["history"] = [{"state": s, "reason": why, "actor": who, "ts_ns": ts} for s, why, who, ts in events]
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    print(f"{r.transfer_id}  {r.state}  ({r.mode})  {r.amount} {r.asset} to {r.to_exchange}")
    print(f"  expected cost {r.expected_cost:.4f} {r.cost_currency}, {r.expected_seconds:.0f} s; {r.reason}")
    for s in r.steps:
        print(f"  step {s.index}: {s.step.kind:<10} {s.step.from_exchange}:{s.step.from_asset} -> "
              f"{s.step.to_exchange}:{s.step.to_asset} {s.step.amount} (fee {s.step.fee}, {s.step.network}) {s.state}")
    for state, why, who, ts in events:
        print(f"  {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(ts / 1e9))}  {state:<18} {who}: {why}")


def _print_plans(result: PlanningResult, states: dict[str, str], currency: str, as_json: bool) -> None:
    if as_json:
        print(json.dumps({
            "plans": [{
                "transfer_id": p.transfer_id, "state": states.get(p.transfer_id, "dry-run"),
                "destination": str(p.destination), "amount": str(p.amount), "source": str(p.route.source),
                "source_amount": str(p.route.need), "expected_cost": str(p.expected_cost),
                "expected_seconds": p.expected_seconds, "reason": p.reason,
                "steps": [{"kind": s.kind, "from": f"{s.from_exchange}:{s.from_asset}",
                           "to": f"{s.to_exchange}:{s.to_asset}", "network": s.network, "amount": str(s.amount),
                           "fee": str(s.fee), "amount_out": str(s.amount_out)} for s in p.steps()],
            } for p in result.plans],
            "shortfalls": [{"node": str(s.node), "amount": str(s.amount), "reason": s.reason}
                           for s in result.shortfalls],
        }, indent=2))
        return
    if not result.plans and not result.shortfalls:
        print("nothing to rebalance")
    for p in result.plans:
        print(f"{p.transfer_id} [{states.get(p.transfer_id, 'dry-run')}] {p.amount} {p.asset} to "
              f"{p.destination.exchange} from {p.route.source}: cost {p.expected_cost:.4f} {currency}, "
              f"{p.expected_seconds:.0f} s")
        for s in p.steps():
            print(f"    {s.kind:<10} {s.from_exchange}:{s.from_asset} -> {s.to_exchange}:{s.to_asset} "
                  f"{s.amount} (fee {s.fee}, {s.network}) -> {s.amount_out}")
    for short in result.shortfalls:
        print(f"cannot restore {short.node} (short {short.amount}): {short.reason}")
