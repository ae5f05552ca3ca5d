"""The container HEALTHCHECK: this service's own /health on 127.0.0.1; exit 0 when it is ok.

``python -m shared.ops.probe [SERVICE]`` (default ``$ARB_SERVICE``). Docker runs it every
15 s in every container, so it imports only the standard library and the config: a
seventh of the CPU time of `arb health`, which also loads the Redis and PostgreSQL clients.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request

from shared.config import SERVICES, Config, ConfigError, load_config, service_port


def probe(cfg: Config, service: str) -> tuple[bool, str]:
    """(healthy, one-line detail) from the service's /health."""
    port = service_port(cfg, service)
    if port == 0:
        return False, "http.base_port is 0: no fixed port to probe"
    url = f"http://127.0.0.1:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=cfg.ops.check_timeout_s) as resp:
            doc = json.loads(resp.read())
    except urllib.error.HTTPError as err:  # 503: the service answers, and is not ok
        doc = json.loads(err.read() or b"{}")
    except (OSError, ValueError) as exc:
        return False, f"{url} unreachable ({type(exc).__name__})"
    status = doc.get("status", "unknown")
    detail = f"/health {status}" + (f" ({doc['reason']})" if doc.get("reason") else "")
    return status == "ok", detail


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    service = args[0] if args else os.environ.get("ARB_SERVICE", "")
    if service not in SERVICES:
        print(f"usage: python -m shared.ops.probe {{{','.join(SERVICES)}}} (or set ARB_SERVICE)", file=sys.stderr)
        return 2
    try:
        cfg = load_config()
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    ok, detail = probe(cfg, service)
    print(f"{'OK' if ok else 'ERROR':<9}{'service ' + service:<30} {detail}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
