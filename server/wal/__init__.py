"""The write-ahead log in Postgres: schema, group-commit writers, checkpoints, recovery."""
