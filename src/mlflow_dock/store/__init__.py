"""The job store: every table of the service on one database, one module per concern.

`database.Database` is the one shared object (engine, sessions, SQLite's write lock, dialect
facts); `schema` holds the one `MetaData` of every table and `migrate` keeps the database at
its newest Alembic revision. The parts (`deliveries`, `queue`, `dispatch`, `tags`, `locks`,
`meta`, `loglines`, `telemetry`, `reads`, `layercache`) each work on that `Database`; callers type
what they use with a small Protocol of their own, and only the composition root (`app.py`)
holds the `facade.JobStore` that composes them.
"""
