#!/bin/sh
# Runs once, when the postgres container initialises its data directory (docker-entrypoint-initdb.d):
# makes the "existing database" of docs/existing-database.md (database shop, its owner, the application
# role and a table with rows), then the guide's pgveil roles (pgveil-roles.psql, the guide's SQL).
set -eu
secrets=${PGVEIL_SECRETS_DIR:-/run/secrets}
run() { psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname shop "$@"; }

run -v app_password="$(cat "$secrets"/shop_app_password)" <<'SQL'
CREATE ROLE shop_owner NOLOGIN;
CREATE ROLE shop_app LOGIN PASSWORD :'app_password';
CREATE ROLE support NOLOGIN;
ALTER DATABASE shop OWNER TO shop_owner;
SET ROLE shop_owner;
CREATE TABLE public.customers (id bigserial PRIMARY KEY, name text, email text);
GRANT SELECT, INSERT, UPDATE, DELETE ON public.customers TO shop_app, support;
GRANT USAGE ON SEQUENCE public.customers_id_seq TO shop_app;
INSERT INTO public.customers (name, email) VALUES ('Ann', 'ann@example.com'), ('Bob', 'bob@example.org');
SQL

run -v keystore_password="$(cat "$secrets"/pgveil_keystore_password)" \
    -v service_password="$(cat "$secrets"/pgveil_service_password)" \
    -f "$(dirname "$0")/pgveil-roles.psql"
