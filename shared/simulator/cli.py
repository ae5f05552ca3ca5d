"""`arb simulator`: serve recorded exchange traffic on 127.0.0.1 until Ctrl-C.

    arb simulator binance=capture.gz okx=ws.txt,instruments.txt [--speed 1] [--port 0]
                  [--drop K] [--close-at K] [--corrupt-checksum K] [--garble K] [--stall K:SECONDS]

Each ``exchange=file[,file...]`` gets its own port; the command prints one JSON line per
exchange with its ``ws_url`` and ``rest_url``, ready for the collector's
``ARB_EXCHANGES__<NAME>__WS_URL`` / ``__REST_URL``. Faults apply to every exchange served
and are frame indices in each recording (received frames only, 0-based).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from shared.capture import CaptureError
from shared.simulator import Faults, Simulator, simulator
from shared.simulator.venues import SIM_VENUES


def _stall(text: str) -> tuple[int, float]:
    index, _, seconds = text.partition(":")
    return int(index), float(seconds or "5")


def cmd_simulator(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="arb simulator", description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("serve", nargs="+", metavar="EXCHANGE=FILE[,FILE]",
                        help=f"exchange ({', '.join(SIM_VENUES)}) and its capture files")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="first port (0: any free ports)")
    parser.add_argument("--speed", type=float, default=None, help="recorded pace multiplier (default: as fast as read)")
    parser.add_argument("--drop", type=int, action="append", default=[])
    parser.add_argument("--close-at", type=int, action="append", default=[])
    parser.add_argument("--corrupt-checksum", type=int, action="append", default=[])
    parser.add_argument("--garble", type=int, action="append", default=[], help="send frame K cut in half")
    parser.add_argument("--stall", type=_stall, action="append", default=[], metavar="K:SECONDS")
    args = parser.parse_args(argv)
    faults = Faults(drop=set(args.drop), close_at=set(args.close_at), corrupt_checksum=set(args.corrupt_checksum),
                    garble=set(args.garble), stall=dict(args.stall))
    plan: list[tuple[str, list[str]]] = []
    for spec in args.serve:
        exchange, sep, files = spec.partition("=")
        if not sep or exchange not in SIM_VENUES or not files:
            print(f"arb simulator: expected EXCHANGE=FILE[,FILE] with EXCHANGE in {', '.join(SIM_VENUES)}: {spec!r}",
                  file=sys.stderr)
            return 2
        plan.append((exchange, files.split(",")))
    try:
        return asyncio.run(_serve(plan, args, faults))
    except (OSError, CaptureError) as exc:
        print(f"arb simulator: {exc}", file=sys.stderr)
        return 2


async def _serve(plan: list[tuple[str, list[str]]], args: argparse.Namespace, faults: Faults) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    sims: list[Simulator] = []
    for i, (exchange, files) in enumerate(plan):
        port = args.port + i if args.port else 0
        sim = simulator(exchange, files, faults=faults, speed=args.speed, host=args.host, port=port)
        await sim.start()
        sims.append(sim)
        print(json.dumps({"exchange": exchange, "ws_url": sim.ws_url, "rest_url": sim.rest_url,
                          "frames": len(sim.timeline)}), flush=True)
    await stop.wait()
    for sim in sims:
        await sim.stop()
    return 0
