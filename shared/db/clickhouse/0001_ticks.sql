-- Market data history. One statement per block, separated by lines with a single ';'.
CREATE TABLE IF NOT EXISTS orderbook_snapshots
(
    exchange     LowCardinality(String),
    symbol       LowCardinality(String),
    seq          UInt64,
    status       LowCardinality(String),
    ts_exchange  DateTime64(9, 'UTC'),
    ts_recv      DateTime64(9, 'UTC'),
    ts_pub       DateTime64(9, 'UTC'),
    bid_prices   Array(Float64),
    bid_sizes    Array(Float64),
    ask_prices   Array(Float64),
    ask_sizes    Array(Float64)
)
ENGINE = MergeTree
PARTITION BY toYYYYMMDD(ts_recv)
ORDER BY (exchange, symbol, ts_recv)
TTL toDateTime(ts_recv) + INTERVAL 90 DAY
;
CREATE TABLE IF NOT EXISTS tick_trades
(
    exchange     LowCardinality(String),
    symbol       LowCardinality(String),
    trade_id     String,
    price        Float64,
    size         Float64,
    side         LowCardinality(String),
    ts_exchange  DateTime64(9, 'UTC'),
    ts_recv      DateTime64(9, 'UTC')
)
ENGINE = MergeTree
PARTITION BY toYYYYMMDD(ts_recv)
ORDER BY (exchange, symbol, ts_recv)
TTL toDateTime(ts_recv) + INTERVAL 180 DAY
;
CREATE TABLE IF NOT EXISTS spread_history
(
    asset          LowCardinality(String),
    strategy       LowCardinality(String),
    buy_exchange   LowCardinality(String),
    buy_symbol     LowCardinality(String),
    sell_exchange  LowCardinality(String),
    sell_symbol    LowCardinality(String),
    ts             DateTime64(9, 'UTC'),
    gross_edge_bps Float64,
    net_edge_bps   Float64,
    fx_rate        Float64,
    notional       Float64
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (asset, buy_exchange, sell_exchange, ts)
TTL toDateTime(ts) + INTERVAL 365 DAY
