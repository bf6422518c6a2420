"""Bounds of what the database stores, checked both where a request is parsed (`annotation.schemas`)
and where the services take values from in-process callers (`annotation.services`)."""

MAX_DB_INT = 2**31 - 1  # INTEGER columns on PostgreSQL (and what ids are checked against everywhere)
MAX_TIME_SPENT_MS = 7 * 86400 * 1000  # a week: a ranking's time_spent_ms beyond it is a client's mistake
