-- Retention also covers the transfer ledger: a stopped session's transfers, their steps and
-- events go with the rest of it.
CREATE OR REPLACE FUNCTION purge_stopped_sessions(keep INTERVAL DEFAULT INTERVAL '90 days')
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
        DELETE FROM transfer_events WHERE transfer_id IN (SELECT transfer_id FROM transfers WHERE session = s);
        DELETE FROM transfer_steps WHERE transfer_id IN (SELECT transfer_id FROM transfers WHERE session = s);
        DELETE FROM transfers WHERE session = s;
        DELETE FROM system_logs WHERE session = s;
        DELETE FROM session_snapshots WHERE session = s;
        RETURN NEXT s;
    END LOOP;
END;
$$;
