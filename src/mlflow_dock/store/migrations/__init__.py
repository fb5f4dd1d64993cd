"""Alembic's script directory for the job store (run by `mlflow_dock.store.migrate.upgrade`).

`versions/` holds one file per revision. A new revision is written by hand: give it the next
number as `revision`, the current head as `down_revision`, and write its `upgrade()` and
`downgrade()` with `alembic.op`; tests/store/test_migrate.py then checks that a database
upgraded through every revision matches `mlflow_dock.store.schema` (alembic's
`compare_metadata`, which also prints the operations still missing).
"""
