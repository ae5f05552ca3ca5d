-- Rebalancing transfers: plans, their steps, and every state change (also the outbox that
-- publishes them on the `transfers` stream). Money is NUMERIC; times used by logic are ns.

CREATE TABLE transfers (
    transfer_id      TEXT PRIMARY KEY,
    session          TEXT             NOT NULL,
    mode             TEXT             NOT NULL CHECK (mode IN ('paper', 'live', 'backtest')),
    state            TEXT             NOT NULL CHECK (state IN ('planned', 'awaiting_approval', 'approved',
                                                                'sent', 'completed', 'cancelled', 'failed')),
    asset            TEXT             NOT NULL,
    to_exchange      TEXT             NOT NULL,
    amount           NUMERIC          NOT NULL CHECK (amount > 0),
    from_exchange    TEXT             NOT NULL,
    from_asset       TEXT             NOT NULL,
    from_amount      NUMERIC          NOT NULL CHECK (from_amount > 0),
    expected_cost    NUMERIC          NOT NULL,
    cost_currency    TEXT             NOT NULL,
    expected_seconds DOUBLE PRECISION NOT NULL CHECK (expected_seconds >= 0),
    reason           TEXT             NOT NULL DEFAULT '',
    approved_by      TEXT             NOT NULL DEFAULT '',
    created_ns       BIGINT           NOT NULL,
    updated_ns       BIGINT           NOT NULL,
    created_at       TIMESTAMPTZ      NOT NULL DEFAULT now()
);
CREATE INDEX transfers_session_state ON transfers (session, mode, state);
CREATE INDEX transfers_session_time ON transfers (session, created_ns DESC);

CREATE TABLE transfer_steps (
    transfer_id      TEXT             NOT NULL REFERENCES transfers (transfer_id),
    step_index       INTEGER          NOT NULL CHECK (step_index >= 0),
    kind             TEXT             NOT NULL CHECK (kind IN ('withdrawal', 'conversion')),
    from_exchange    TEXT             NOT NULL,
    to_exchange      TEXT             NOT NULL,
    from_asset       TEXT             NOT NULL,
    to_asset         TEXT             NOT NULL,
    network          TEXT             NOT NULL DEFAULT '',
    network_label    TEXT             NOT NULL DEFAULT '',
    address          TEXT             NOT NULL DEFAULT '',
    memo             TEXT             NOT NULL DEFAULT '',
    amount           NUMERIC          NOT NULL CHECK (amount > 0),
    fee              NUMERIC          NOT NULL CHECK (fee >= 0),
    amount_out       NUMERIC          NOT NULL CHECK (amount_out >= 0),
    expected_seconds DOUBLE PRECISION NOT NULL CHECK (expected_seconds >= 0),
    state            TEXT             NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sent', 'done', 'failed')),
    -- What actually moved (paper): debited at the source, credited at the destination, fee charged.
    debited          NUMERIC CHECK (debited >= 0),
    credited         NUMERIC CHECK (credited >= 0),
    fee_charged      NUMERIC CHECK (fee_charged >= 0),
    sent_ns          BIGINT,
    due_ns           BIGINT,
    done_ns          BIGINT,
    PRIMARY KEY (transfer_id, step_index)
);

CREATE TABLE transfer_events (
    id           BIGSERIAL PRIMARY KEY,
    transfer_id  TEXT        NOT NULL REFERENCES transfers (transfer_id),
    state        TEXT        NOT NULL,
    reason       TEXT        NOT NULL DEFAULT '',
    actor        TEXT        NOT NULL DEFAULT '',
    ts_ns        BIGINT      NOT NULL,
    payload      JSONB       NOT NULL,
    published_at TIMESTAMPTZ
);
CREATE INDEX transfer_events_transfer ON transfer_events (transfer_id, id);
CREATE INDEX transfer_events_unpublished ON transfer_events (id) WHERE published_at IS NULL;
