-- Runs once, when the postgres volume is first created: mlflow-dock's job store gets its own
-- database beside MLflow's (same server, same role).
CREATE DATABASE mlflow_dock;
