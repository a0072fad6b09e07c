"""The billing database: one SQLAlchemy engine (SQLite file by default, PostgreSQL when the URL says so) and
the Alembic migrations shipped in this package.

SQLite runs in WAL mode (readers never wait for the writer) with a busy timeout (several processes may share
the file) and `synchronous=FULL` (a committed settle survives a power cut, not only a crash). Every write
transaction starts with BEGIN IMMEDIATE: it takes the write lock up front, so two transactions never both
read and then deadlock on the upgrade (SQLite would fail one at once instead of waiting).

PostgreSQL runs at READ COMMITTED: the conditional UPDATEs in this package re-check their WHERE clause on
the row's newest version after waiting for its lock, which is what makes them atomic.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, make_url

log = logging.getLogger(__name__)

READONLY = "deepserve_readonly"  # execution option: a SQLite read transaction (BEGIN DEFERRED)
T = TypeVar("T")


class Database:
    """The engine plus the threads that use it. The server never does blocking database I/O on its event
    loop: `await db.run(fn, ...)` calls `fn(engine, ...)` on one of a few dedicated threads.

    Why threads and not SQLAlchemy's asyncio engine: SQLite has no async driver in our dependencies (aiosqlite
    would be one more, and it is itself a thread per connection), and each billing step is one short
    transaction, so a small pool of threads costs one hop per step and keeps one code path for both databases.
    """

    def __init__(self, url: str, *, num_threads: int = 4):
        self.url = url
        self.engine = create_db_engine(url, pool_size=num_threads)
        self._executor = ThreadPoolExecutor(num_threads, thread_name_prefix="billing-db")

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, self.engine, *args, **kwargs))

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.engine.dispose()


def create_db_engine(url: str, *, pool_size: int = 8) -> Engine:
    """An engine for `url`; a SQLite file's folder is created. psycopg 3 drives PostgreSQL
    (`postgresql+psycopg://`; a bare `postgresql://` URL is taken to mean it too)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            parsed, pool_size=pool_size, max_overflow=pool_size, connect_args={"timeout": 30}
        )
        _sqlite_setup(engine)
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return sa.create_engine(parsed, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


def _sqlite_setup(engine: Engine) -> None:
    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves (below)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        readonly = connection.get_execution_options().get(READONLY, False)
        connection.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def describe(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return make_url(url).render_as_string(hide_password=True)


# ---- migrations ------------------------------------------------------------------------------------
def _alembic_config(connection: Connection):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", "deepserve.billing:migrations")
    config.attributes["connection"] = connection
    return config


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[Connection]:
    """One migrator at a time: replicas (or test servers) starting together must not race to create tables.
    PostgreSQL: an advisory lock; SQLite: an flock on a file beside the database."""
    if is_sqlite(engine):
        database = engine.url.database or ""
        lock_file = None
        if database and database != ":memory:":
            lock_file = open(f"{Path(database).expanduser()}.migrate.lock", "w")  # noqa: SIM115
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            with engine.connect() as connection:
                yield connection
        finally:
            if lock_file is not None:
                fcntl.flock(lock_file, fcntl.LOCK_UN)
                lock_file.close()
        return
    with engine.connect() as connection:
        connection.exec_driver_sql("SELECT pg_advisory_lock(7262431)")  # any fixed number: ours
        connection.commit()
        try:
            yield connection
        finally:
            connection.rollback()
            connection.exec_driver_sql("SELECT pg_advisory_unlock(7262431)")
            connection.commit()


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Bring the schema to `revision` (default: the newest); returns the revision it is at afterwards."""
    alembic_log = logging.getLogger("alembic")
    if alembic_log.level == logging.NOTSET:  # its INFO lines ("Context impl ...") say nothing to an operator
        alembic_log.setLevel(logging.WARNING)
    from alembic import command

    with _migration_lock(engine) as connection:
        command.upgrade(_alembic_config(connection), revision)
        connection.commit()
    return current_revision(engine)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", "deepserve.billing:migrations")
    return ScriptDirectory.from_config(config).get_current_head()
