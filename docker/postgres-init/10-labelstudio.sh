#!/bin/sh
# Label Studio's own role and database on the shared Postgres server (docker-compose.yml).
#
# The postgres image runs the scripts in /docker-entrypoint-initdb.d once, when it initialises an
# empty data volume, as the POSTGRES_USER superuser. For a volume initialised before this script
# existed, run it by hand once:
#   docker compose exec postgres sh /docker-entrypoint-initdb.d/10-labelstudio.sh
#
# It may be executed or sourced by the image's entrypoint, so it changes no shell options; psql's
# own variables (:"name" for identifiers, :'value' for literals) quote the names and the password.
: "${LABEL_STUDIO_DB_NAME:?LABEL_STUDIO_DB_NAME is not set}"
: "${LABEL_STUDIO_DB_USER:?LABEL_STUDIO_DB_USER is not set}"
: "${LABEL_STUDIO_DB_PASSWORD:?LABEL_STUDIO_DB_PASSWORD is not set}"

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "${POSTGRES_DB:-$POSTGRES_USER}" \
    -v ls_db="$LABEL_STUDIO_DB_NAME" -v ls_user="$LABEL_STUDIO_DB_USER" -v ls_password="$LABEL_STUDIO_DB_PASSWORD" <<'SQL'
SELECT NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'ls_user') AS create_role \gset
\if :create_role
CREATE ROLE :"ls_user" LOGIN PASSWORD :'ls_password';
\endif
SELECT NOT EXISTS (SELECT FROM pg_database WHERE datname = :'ls_db') AS create_db \gset
\if :create_db
CREATE DATABASE :"ls_db" OWNER :"ls_user";
\endif
SQL
