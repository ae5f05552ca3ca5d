-- Core ledger and audit schema. Money is NUMERIC, never float.

CREATE TABLE session_snapshots (
    id           BIGSERIAL PRIMARY KEY,
    session      TEXT        NOT NULL,
    env          TEXT        NOT NULL,
    mode         TEXT        NOT NULL CHECK (mode IN ('paper', 'live', 'backtest')),
    status       TEXT        NOT NULL CHECK (status IN ('running', 'stopped')),
    started_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    stopped_at   TIMESTAMPTZ,
    snapshot     JSONB       NOT NULL DEFAULT '{}'::jsonb,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX session_snapshots_session_time ON session_snapshots (session, created_at DESC);
CREATE INDEX session_snapshots_stopped ON session_snapshots (status, stopped_at) WHERE status = 'stopped';

CREATE TABLE signals (
    signal_id       TEXT PRIMARY KEY,
    session         TEXT             NOT NULL,
    strategy        TEXT             NOT NULL,
    asset           TEXT             NOT NULL,
    gross_edge_bps  DOUBLE PRECISION NOT NULL,
    net_edge_bps    DOUBLE PRECISION NOT NULL,
    expected_profit NUMERIC          NOT NULL,
    profit_currency TEXT             NOT NULL,
    notional        NUMERIC          NOT NULL,
    ts              TIMESTAMPTZ      NOT NULL,
    payload         JSONB            NOT NULL
);
CREATE INDEX signals_session_time ON signals (session, ts DESC);
CREATE INDEX signals_asset_time ON signals (asset, ts DESC);
CREATE INDEX signals_payload ON signals USING GIN (payload jsonb_path_ops);

CREATE TABLE decisions (
    decision_id TEXT PRIMARY KEY,
    session     TEXT        NOT NULL,
    signal_id   TEXT        NOT NULL,
    strategy    TEXT        NOT NULL,
    approved    BOOLEAN     NOT NULL,
    reason      TEXT        NOT NULL,
    detail      TEXT        NOT NULL DEFAULT '',
    notional    NUMERIC     NOT NULL DEFAULT 0,
    ts          TIMESTAMPTZ NOT NULL,
    payload     JSONB       NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX decisions_session_time ON decisions (session, ts DESC);
CREATE INDEX decisions_signal ON decisions (signal_id);
CREATE INDEX decisions_reason ON decisions (session, reason, ts DESC);

CREATE TABLE orders (
    client_order_id   TEXT PRIMARY KEY,
    session           TEXT        NOT NULL,
    arb_id            TEXT        NOT NULL,
    signal_id         TEXT        NOT NULL DEFAULT '',
    exchange          TEXT        NOT NULL,
    symbol            TEXT        NOT NULL,
    side              TEXT        NOT NULL CHECK (side IN ('buy', 'sell')),
    order_type        TEXT        NOT NULL,
    time_in_force     TEXT        NOT NULL,
    role              TEXT        NOT NULL DEFAULT 'entry',
    price             NUMERIC,
    quantity          NUMERIC     NOT NULL CHECK (quantity > 0),
    filled_quantity   NUMERIC     NOT NULL DEFAULT 0,
    average_price     NUMERIC,
    fee               NUMERIC     NOT NULL DEFAULT 0,
    fee_asset         TEXT        NOT NULL DEFAULT '',
    status            TEXT        NOT NULL,
    exchange_order_id TEXT        NOT NULL DEFAULT '',
    mode              TEXT        NOT NULL,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX orders_session_time ON orders (session, created_at DESC);
CREATE INDEX orders_arb ON orders (arb_id);
CREATE INDEX orders_symbol_time ON orders (exchange, symbol, created_at DESC);

-- Every state transition of every order, in order.
CREATE TABLE order_events (
    id              BIGSERIAL PRIMARY KEY,
    client_order_id TEXT        NOT NULL REFERENCES orders (client_order_id),
    status          TEXT        NOT NULL,
    filled_quantity NUMERIC     NOT NULL DEFAULT 0,
    reason          TEXT        NOT NULL DEFAULT '',
    ts              TIMESTAMPTZ NOT NULL,
    UNIQUE (client_order_id, status, filled_quantity)
);

CREATE TABLE fills (
    exchange        TEXT        NOT NULL,
    fill_id         TEXT        NOT NULL,
    session         TEXT        NOT NULL,
    client_order_id TEXT        NOT NULL REFERENCES orders (client_order_id),
    arb_id          TEXT        NOT NULL,
    symbol          TEXT        NOT NULL,
    side            TEXT        NOT NULL CHECK (side IN ('buy', 'sell')),
    price           NUMERIC     NOT NULL CHECK (price > 0),
    quantity        NUMERIC     NOT NULL CHECK (quantity > 0),
    fee             NUMERIC     NOT NULL CHECK (fee >= 0),
    fee_asset       TEXT        NOT NULL,
    liquidity       TEXT        NOT NULL DEFAULT 'taker',
    mode            TEXT        NOT NULL,
    ts              TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (exchange, fill_id)
);
CREATE INDEX fills_session_time ON fills (session, ts DESC);
CREATE INDEX fills_order ON fills (client_order_id);
CREATE INDEX fills_arb ON fills (arb_id);

-- Finished arbitrages with their realised PnL (reference currency, fees included).
CREATE TABLE trades (
    arb_id           TEXT PRIMARY KEY,
    session          TEXT        NOT NULL,
    signal_id        TEXT        NOT NULL,
    strategy         TEXT        NOT NULL,
    status           TEXT        NOT NULL,
    asset            TEXT        NOT NULL DEFAULT '',
    legs             JSONB       NOT NULL,
    notional         NUMERIC     NOT NULL DEFAULT 0,
    fees             NUMERIC     NOT NULL DEFAULT 0,
    realised_pnl     NUMERIC     NOT NULL,
    pnl_currency     TEXT        NOT NULL,
    pnl_by_currency  JSONB       NOT NULL DEFAULT '{}'::jsonb,
    fx_rates         JSONB       NOT NULL DEFAULT '{}'::jsonb,
    expected_profit  NUMERIC     NOT NULL DEFAULT 0,
    residuals        JSONB       NOT NULL DEFAULT '[]'::jsonb,
    mode             TEXT        NOT NULL,
    opened_at        TIMESTAMPTZ NOT NULL,
    closed_at        TIMESTAMPTZ NOT NULL
);
CREATE INDEX trades_session_time ON trades (session, closed_at DESC);
CREATE INDEX trades_asset_time ON trades (asset, closed_at DESC);
CREATE INDEX trades_legs ON trades USING GIN (legs jsonb_path_ops);

CREATE TABLE balances (
    session    TEXT        NOT NULL,
    mode       TEXT        NOT NULL,
    exchange   TEXT        NOT NULL,
    asset      TEXT        NOT NULL,
    free       NUMERIC     NOT NULL,
    locked     NUMERIC     NOT NULL DEFAULT 0,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (session, mode, exchange, asset)
);

CREATE TABLE portfolio_snapshots (
    id          BIGSERIAL PRIMARY KEY,
    session     TEXT        NOT NULL,
    ts          TIMESTAMPTZ NOT NULL,
    currency    TEXT        NOT NULL,
    total_value NUMERIC     NOT NULL,
    balances    JSONB       NOT NULL,
    UNIQUE (session, ts)
);
CREATE INDEX portfolio_snapshots_session_time ON portfolio_snapshots (session, ts DESC);

CREATE TABLE daily_performance (
    session       TEXT    NOT NULL,
    day           DATE    NOT NULL,
    currency      TEXT    NOT NULL,
    realised_pnl  NUMERIC NOT NULL DEFAULT 0,
    fees          NUMERIC NOT NULL DEFAULT 0,
    volume        NUMERIC NOT NULL DEFAULT 0,
    trades        INTEGER NOT NULL DEFAULT 0,
    wins          INTEGER NOT NULL DEFAULT 0,
    losses        INTEGER NOT NULL DEFAULT 0,
    peak_equity   NUMERIC,
    max_drawdown  NUMERIC,
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (session, day)
);

CREATE TABLE risk_guard_snapshots (
    id       BIGSERIAL PRIMARY KEY,
    session  TEXT        NOT NULL,
    ts       TIMESTAMPTZ NOT NULL DEFAULT now(),
    reason   TEXT        NOT NULL DEFAULT 'periodic',
    state    JSONB       NOT NULL
);
CREATE INDEX risk_guard_snapshots_session_time ON risk_guard_snapshots (session, ts DESC);

CREATE TABLE system_logs (
    id       BIGSERIAL PRIMARY KEY,
    session  TEXT        NOT NULL,
    service  TEXT        NOT NULL,
    level    TEXT        NOT NULL,
    ts       TIMESTAMPTZ NOT NULL DEFAULT now(),
    message  TEXT        NOT NULL,
    context  JSONB       NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX system_logs_session_time ON system_logs (session, ts DESC);
CREATE INDEX system_logs_level_time ON system_logs (level, ts DESC);
CREATE INDEX system_logs_context ON system_logs USING GIN (context jsonb_path_ops);

-- Retention: drop everything of sessions stopped more than `keep` ago. Running sessions
-- and sessions without a stop record are never touched. Returns the sessions purged.
CREATE FUNCTION purge_stopped_sessions(keep INTERVAL DEFAULT INTERVAL '90 days')
RETURNS SETOF TEXT
LANGUAGE plpgsql AS $$
DECLARE
    s TEXT;
BEGIN
    FOR s IN
        SELECT latest.session FROM (
            SELECT DISTINCT ON (session) session, status, stopped_at
            FROM session_snapshots
            ORDER BY session, created_at DESC, id DESC
        ) AS latest
        WHERE latest.status = 'stopped' AND latest.stopped_at < now() - keep
    LOOP
        DELETE FROM fills WHERE session = s;
        DELETE FROM order_events WHERE client_order_id IN (SELECT client_order_id FROM orders WHERE session = s);
        DELETE FROM orders WHERE session = s;
        DELETE FROM trades WHERE session = s;
        DELETE FROM decisions WHERE session = s;
        DELETE FROM signals WHERE session = s;
        DELETE FROM balances WHERE session = s;
        DELETE FROM portfolio_snapshots WHERE session = s;
        DELETE FROM daily_performance WHERE session = s;
        DELETE FROM risk_guard_snapshots WHERE session = s;
        DELETE FROM system_logs WHERE session = s;
        DELETE FROM session_snapshots WHERE session = s;
        RETURN NEXT s;
    END LOOP;
END;
$$;
