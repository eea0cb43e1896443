# The MLflow tracking server of the stack: the MLflow pyproject.toml pins, with PostgreSQL and S3
# drivers; mlflow-entrypoint.sh turns the environment into the basic-auth config at start.
FROM python:3.11-slim
RUN pip install --no-cache-dir "mlflow[auth]==3.17.2" psycopg2-binary boto3
COPY mlflow-entrypoint.sh /mlflow-entrypoint.sh
USER nobody
ENTRYPOINT ["/bin/sh", "/mlflow-entrypoint.sh"]
