-- Executor: what it needs beyond the core ledger to reconcile orders after a crash.

-- The last moment a sent order can still be accepted by its exchange (Binance enforces it
-- through recvWindow). An order not found by client order id after this never traded.
ALTER TABLE orders ADD COLUMN not_after TIMESTAMPTZ;

-- Why the order ended as it did (rejection text, IOC remainder cancelled, ...).
ALTER TABLE orders ADD COLUMN reason TEXT NOT NULL DEFAULT '';

CREATE INDEX order_events_order ON order_events (client_order_id, id);
