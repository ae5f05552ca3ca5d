"""Bus messages: tagged JSON, exact Decimals, one decoder for every stream."""

from __future__ import annotations

import time
from decimal import Decimal

import msgspec
import pytest

from shared.models import (
    Alert,
    Balance,
    BookSnapshot,
    Decision,
    Execution,
    ExecutionLeg,
    Fill,
    FxRate,
    OrderIntent,
    OrderLeg,
    Residual,
    Signal,
    SignalLeg,
    Trade,
    Transfer,
    TransferStep,
    decode,
    decoder_for,
    encode,
    split_symbol,
)

NOW = 1_723_161_255_208_000_000


def samples() -> list[msgspec.Struct]:
    leg = SignalLeg(exchange="binance", symbol="BTC/USDT", side="buy", price=Decimal("61837.64"),
                    quantity=Decimal("0.01234"))
    return [
        BookSnapshot(exchange="binance", symbol="BTC/USDT", seq=1, bids=[(1.5, 2.0)], asks=[(1.6, 1.0)],
                     ts_exchange_ns=NOW, ts_recv_ns=NOW + 1, ts_pub_ns=NOW + 2),
        Trade(exchange="upbit", symbol="BTC/KRW", trade_id="7", price=1.0, size=2.0, side="sell",
              ts_exchange_ns=NOW, ts_recv_ns=NOW),
        FxRate(pair="USDT/KRW", rate=1382.5, source="upbit", ts_source_ns=NOW),
        Signal(signal_id="s1", strategy="spatial", asset="BTC", legs=[leg], gross_edge_bps=30.0,
               net_edge_bps=10.0, expected_profit=1.2, profit_currency="USDT", notional=760.0, ts_ns=NOW),
        Decision(decision_id="d1", signal_id="s1", strategy="spatial", approved=False, reason="max_notional",
                 ts_ns=NOW),
        OrderIntent(arb_id="a1", signal_id="s1", strategy="spatial", notional=760.0, ts_ns=NOW,
                    legs=[OrderLeg(client_order_id="a1x0", exchange="binance", symbol="BTC/USDT", side="buy",
                                   price=Decimal("61837.64"), quantity=Decimal("0.01234"))]),
        Fill(fill_id="f1", client_order_id="a1x0", arb_id="a1", exchange="binance", symbol="BTC/USDT", side="buy",
             price=Decimal("61837.64"), quantity=Decimal("0.01234"), fee=Decimal("0.76307647"),
             fee_asset="USDT", ts_ns=NOW),
        Execution(arb_id="a1", signal_id="s1", strategy="spatial", status="hedged", realised_pnl=Decimal("-0.1"),
                  pnl_currency="USDT", ts_ns=NOW,
                  legs=[ExecutionLeg(client_order_id="a1x0", exchange="binance", symbol="BTC/USDT", side="buy",
                                     status="FILLED", quantity=Decimal(1), filled_quantity=Decimal(1))],
                  residuals=[Residual(exchange="upbit", asset="BTC", quantity=Decimal("-0.001"))]),
        Balance(exchange="upbit", asset="KRW", free=Decimal("1000000.5"), ts_ns=NOW),
        Transfer(transfer_id="t1", asset="USDT", state="planned", expected_cost=1.0, expected_seconds=60,
                 ts_ns=NOW, steps=[TransferStep(kind="withdrawal", from_exchange="upbit", to_exchange="binance",
                                                from_asset="USDT", to_asset="USDT", amount=Decimal(100))]),
        Alert(alert_id="x", severity="critical", source="risk", kind="halt", message="halted", ts_ns=NOW),
    ]


@pytest.mark.parametrize("msg", samples(), ids=lambda m: type(m).__name__)
def test_every_message_round_trips_through_one_decoder(msg: msgspec.Struct) -> None:
    assert decode(encode(msg)) == msg  # type: ignore[arg-type]


def test_messages_are_tagged_json_readable_in_xrange() -> None:
    raw = msgspec.json.decode(encode(samples()[3]))  # type: ignore[arg-type]
    assert raw["type"] == "signal"
    assert raw["legs"][0]["price"] == "61837.64"  # exact decimal, as a string


def test_decimals_stay_exact() -> None:
    fill = decode(encode(samples()[6]))  # type: ignore[arg-type]
    assert isinstance(fill, Fill)
    assert fill.price * fill.quantity == Decimal("763.0764776")


def test_typed_decoder_rejects_other_types() -> None:
    only_books = decoder_for(BookSnapshot)
    with pytest.raises(msgspec.ValidationError):
        only_books.decode(encode(samples()[1]))  # type: ignore[arg-type]


def test_bad_payloads_raise_decode_errors() -> None:
    for bad in (b'{"type": "book", "exchange": 1}', b"{", b'{"type": "unknown"}', b'{"type":"fill"}'):
        with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
            decode(bad)


def test_unified_symbols_split_into_base_and_quote() -> None:
    assert split_symbol("BTC/KRW") == ("BTC", "KRW")
    with pytest.raises(ValueError):
        split_symbol("BTCKRW")
    book = samples()[0]
    assert isinstance(book, BookSnapshot) and (book.base, book.quote) == ("BTC", "USDT")
    assert time.time_ns() > NOW
