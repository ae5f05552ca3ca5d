-- Live transfers: what the executor needs to carry a step out exactly once and to find it
-- again after a crash or a redelivery. One set of columns per step, next to the plan.

-- Where the executor is with the step:
--   ''          not started;
--   sending     recorded (client id, deadline) and about to be sent: it may have reached
--               the exchange, so it is only ever looked up again, never re-sent;
--   unknown     sent, but the exchange has not said what became of it yet;
--   sent        the exchange accepted the withdrawal (exchange_ref holds its id);
--   withdrawn   the source reports the withdrawal done (txid known), deposit not credited yet;
--   done        conversion filled / deposit credited at the destination;
--   failed      refused or failed at the exchange (detail says why).
ALTER TABLE transfer_steps
    ADD COLUMN exec_state   TEXT    NOT NULL DEFAULT ''
        CHECK (exec_state IN ('', 'sending', 'unknown', 'sent', 'withdrawn', 'done', 'failed')),
    ADD COLUMN client_id    TEXT    NOT NULL DEFAULT '',
    ADD COLUMN exchange_ref TEXT    NOT NULL DEFAULT '',
    ADD COLUMN txid         TEXT    NOT NULL DEFAULT '',
    ADD COLUMN requested    NUMERIC CHECK (requested > 0),
    ADD COLUMN claimed_ns   BIGINT,
    ADD COLUMN not_after_ns BIGINT,
    ADD COLUMN detail       TEXT    NOT NULL DEFAULT '';

-- A client id is used for one step only, ever.
CREATE UNIQUE INDEX transfer_steps_client_id ON transfer_steps (client_id) WHERE client_id <> '';
-- An exchange's withdrawal belongs to one step only (Upbit withdrawals are matched, not keyed).
CREATE UNIQUE INDEX transfer_steps_exchange_ref ON transfer_steps (from_exchange, exchange_ref)
    WHERE exchange_ref <> '' AND kind = 'withdrawal';
-- The executor's watcher: steps of live transfers still in progress.
CREATE INDEX transfer_steps_in_progress ON transfer_steps (transfer_id)
    WHERE exec_state IN ('sending', 'unknown', 'sent', 'withdrawn');
