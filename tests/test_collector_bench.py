"""`arb bench collector --all`: one table, a row per exchange, cryptofeed alongside where it can
keep that recording's book (and the reason where it cannot). Figures are not asserted here."""

from __future__ import annotations

import contextlib
import io
import json

from services.collector.bench import PLANS, main


def test_the_all_exchanges_bench_prints_one_row_per_exchange() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["--all", "--repeat", "1", "--min-frames", "0", "--disconnects", "0", "--json"]) == 0
    doc = json.loads(out.getvalue())
    rows = {row["exchange"]: row for row in doc["rows"]}
    assert list(rows) == list(PLANS) and len(rows) == 8
    assert all(row["ours_frames_per_s"] > 0 and row["frames"] > 0 for row in rows.values())
    assert rows["bithumb"]["cryptofeed_frames_per_s"] is None and "no sync point" in rows["bithumb"]["note"]
    for name, detail in zip(rows, doc["details"], strict=True):
        peer = detail["peer_cryptofeed"]
        # Either cryptofeed kept the same books from the same frames, or the row says why not.
        assert peer["available"] or rows[name]["note"] or "not installed" in peer["reason"]
        if peer["available"]:
            assert peer["book_callbacks"] > 0 and rows[name]["ratio"] > 0
