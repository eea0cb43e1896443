#!/bin/sh
# The roles and databases of the tracking stack, created once, on the first start of an empty data
# directory (the postgres image runs /docker-entrypoint-initdb.d/*.sh as its superuser):
#   role mlflow  owns mlflow (the runs) and mlflow_auth (basic-auth's users and permissions)
#   role optuna  owns optuna (the sweeps' studies: --optuna-storage postgresql://optuna@<host>:5432/optuna)
# Each role's password comes from the environment; psql quotes it (:'var'), so any character works.
set -eu
: "${MLFLOW_DB_PASSWORD:?}" "${OPTUNA_DB_PASSWORD:?}"
psql -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname postgres \
  -v mlflow_password="$MLFLOW_DB_PASSWORD" -v optuna_password="$OPTUNA_DB_PASSWORD" <<'SQL'
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE ROLE optuna LOGIN PASSWORD :'optuna_password';
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
CREATE DATABASE optuna OWNER optuna;
SQL
