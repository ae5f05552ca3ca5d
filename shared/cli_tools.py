"""Small `arb` sub-commands: `arb db migrate`, `arb config`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from shared.config import ConfigError, load_config, to_dict


def cmd_db(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="arb db")
    sub = p.add_subparsers(dest="action", required=True)
    m = sub.add_parser("migrate", help="apply pending migrations (idempotent)")
    m.add_argument("--config")
    m.add_argument("--url", help="database URL (default: DATABASE_URL, the running stack's, or the config's)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from shared.db import migrate
    from shared.launcher import Stack

    url = args.url or os.environ.get("DATABASE_URL")
    if not url:
        stack = Stack.read(Path(cfg.var_dir).resolve())
        url = stack.database_url if stack else cfg.postgres.url
    applied = migrate(url)
    print(json.dumps({"applied": applied}))
    return 0


def cmd_config(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="arb config", description="Validate and print the effective configuration.")
    p.add_argument("--config")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from shared.logs import Redactor

    print(Redactor()(json.dumps(to_dict(cfg), indent=2)))
    return 0
