-- the second and third databases of the stack: MLflow's users and permissions (basic-auth) and
-- the sweeps' Optuna studies (--optuna-storage postgresql://.../optuna)
CREATE DATABASE mlflow_auth;
CREATE DATABASE optuna;
