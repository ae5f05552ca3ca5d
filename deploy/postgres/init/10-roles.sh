#!/bin/sh
# Runs once, when the postgres container initialises an empty data directory.
# A read-only role for Grafana (dashboards can run any SQL its editor allows) and a
# monitoring role for postgres-exporter; neither can change trading data.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v owner="$POSTGRES_USER" -v db="$POSTGRES_DB" \
    -v reader="${GRAFANA_DB_USER:-grafana_reader}" -v reader_pw="$GRAFANA_DB_PASSWORD" \
    -v exporter="${EXPORTER_DB_USER:-arb_exporter}" -v exporter_pw="$EXPORTER_DB_PASSWORD" <<'SQL'
CREATE ROLE :"reader" LOGIN PASSWORD :'reader_pw';
GRANT CONNECT ON DATABASE :"db" TO :"reader";
GRANT USAGE ON SCHEMA public TO :"reader";
GRANT SELECT ON ALL TABLES IN SCHEMA public TO :"reader";
-- tables created later by migrations (run as the owner) are readable too
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public GRANT SELECT ON TABLES TO :"reader";
CREATE ROLE :"exporter" LOGIN PASSWORD :'exporter_pw';
GRANT pg_monitor TO :"exporter";
SQL
