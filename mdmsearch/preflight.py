"""Checks made before anything is created: storage URLs, writable directories, datasets.

Every failure is one :class:`~mdmsearch.errors.ConfigError` line that names the flag or
key the value came from; nothing is written on disk by a failing check.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

from .errors import ConfigError, MDMError
from .logs import quieter

JOURNAL_PREFIX = "journal:"
JOURNAL_SUFFIXES = (".log", ".jsonl", ".journal")
STORAGE_FORMS = ("journal:PATH, a PATH ending in .log, or an SQLAlchemy URL such as sqlite:///optuna.db "
                 "or postgresql://user:pass@host/db")  # (postgresql:// uses psycopg when psycopg2 is absent)
# driver module -> the pip package that provides it
_DRIVER_PACKAGES = {"psycopg2": "psycopg2-binary", "psycopg": "'psycopg[binary]'", "MySQLdb": "mysqlclient",
                    "pymysql": "pymysql", "asyncpg": "asyncpg", "oracledb": "oracledb", "pyodbc": "pyodbc"}


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_dir(path: str | Path, what: str) -> Path:
    """``path`` is, or can be created as, a directory we can write in; nothing is left behind."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path}: exists and is not a directory")
    base = _existing_ancestor(path)
    if not base.is_dir():
        raise ConfigError(f"{what} {path}: cannot create it, {base} is a file")
    try:  # access() is not enough (root, read-only mounts, /proc): really create and remove a probe
        probe = tempfile.mkdtemp(prefix=".mdmsearch-probe-", dir=base)
        os.rmdir(probe)
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot write in {base}: {exc.strerror or exc}") from None
    return path


def journal_path(url: str) -> Optional[Path]:
    """The journal file of a ``journal:PATH`` URL, else None."""
    return Path(url[len(JOURNAL_PREFIX):]) if url.startswith(JOURNAL_PREFIX) else None


def normalize_storage(url: Optional[str], default_journal: Optional[Path], what: str = "--storage") -> str:
    """The storage URL in the form :func:`mdmsearch.search.study.make_storage` takes
    (``journal:PATH`` or an SQLAlchemy URL), checked: a journal's file can be created, an RDB
    URL parses and its driver is installed, a SQLite file's directory exists."""
    if url is None:
        if default_journal is None:
            raise ConfigError(f"{what}: no storage given")
        return f"{JOURNAL_PREFIX}{default_journal}"
    url = url.strip()
    if url.startswith(JOURNAL_PREFIX):
        return _check_journal(url[len(JOURNAL_PREFIX):], what, url)
    if "://" in url:
        return _check_rdb(url, what)
    if url.endswith(JOURNAL_SUFFIXES) or Path(url).is_file():
        return _check_journal(url, what, url)  # a bare journal path, as optuna-dashboard takes it
    raise ConfigError(f"{what} {url}: not a storage URL; give {STORAGE_FORMS}")


def _check_journal(path_text: str, what: str, given: str) -> str:
    if not path_text:
        raise ConfigError(f"{what} '{given}' has no file path; give journal:PATH")
    path = Path(path_text).expanduser()
    if path.is_dir():
        raise ConfigError(f"{what} {given}: {path} is a directory; give the journal file, e.g. {path / 'journal.log'}")
    check_writable_dir(path.parent, f"{what} {given}: directory")
    return f"{JOURNAL_PREFIX}{path}"


def _check_rdb(url: str, what: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        raise ConfigError(f"{what} {url}: unknown database dialect {url.split(':', 1)[0]!r}") from None
    except (ArgumentError, ValueError) as exc:
        raise ConfigError(f"{what} {url}: malformed database URL ({_first_line(exc)}); "
                          f"give {STORAGE_FORMS}") from None
    if parsed.drivername == "postgresql" and _importable("psycopg") and not _importable("psycopg2"):
        # a bare postgresql:// means psycopg2 to SQLAlchemy; the `postgres` extra installs psycopg (3)
        parsed = parsed.set(drivername="postgresql+psycopg")
        url, dialect = parsed.render_as_string(hide_password=False), parsed.get_dialect()
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        module = exc.name or str(exc)
        raise ConfigError(f"{what} {_redact(url)}: the database driver {module!r} is not installed "
                          f"(pip install {_DRIVER_PACKAGES.get(module, module)})") from None
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database
        if db and db != ":memory:" and not db.startswith("file:"):
            path = Path(db)
            if path.is_dir():
                raise ConfigError(f"{what} {url}: {path} is a directory")
            if not path.parent.is_dir():
                raise ConfigError(f"{what} {url}: directory {path.parent} does not exist")
            check_writable_dir(path.parent, f"{what} {url}: directory")
    else:
        check_connection(url, what)
    return url


CONNECT_TIMEOUT_S = 10  # a database server that does not answer is named within this (plus DNS)
# DB-API drivers whose connect() takes a timeout in seconds under this keyword
_TIMEOUT_KEYWORD = {"psycopg": "connect_timeout", "psycopg2": "connect_timeout", "pymysql": "connect_timeout",
                    "mysqldb": "connect_timeout", "asyncpg": "timeout"}
# what a refusal says -> the line the user reads (the first match wins; {db}, {user}, {where} filled in)
_REFUSALS = (
    (("password authentication failed", "access denied", "authentication failed"),
     "the server refused user {user!r} (wrong user or password)"),
    (("does not exist", "unknown database"), "database {db!r} does not exist on {where} (create it first, "
                                             "e.g. createdb {db})"),
    (("connection refused",), "cannot connect to {where}: connection refused (is the server running there?)"),
    (("timeout expired", "timed out", "timeout"), "no answer from {where} within {timeout} s"),
    (("could not translate host name", "name or service not known", "nodename nor servname",
      "temporary failure in name resolution"), "unknown host in {where}"),
    (("invalid response", "server closed the connection", "unexpected response", "lost connection"),
     "{where} did not answer as a database server"),
)


def connect_args(url: str) -> dict:
    """Keyword arguments for the URL's DB-API ``connect()`` that bound how long a connection may take."""
    from sqlalchemy.engine import make_url

    keyword = _TIMEOUT_KEYWORD.get(make_url(url).get_driver_name())
    return {keyword: CONNECT_TIMEOUT_S} if keyword else {}


def check_connection(url: str, what: str = "--storage") -> None:
    """Connect to a database server once, before anything is created: a refusal or silence is
    one :class:`ConfigError` line naming the server (never the password) and why."""
    import sqlalchemy as sa

    parsed = sa.engine.make_url(url)
    engine = sa.create_engine(url, connect_args=connect_args(url), poolclass=sa.pool.NullPool)
    try:
        with engine.connect():
            pass
    except sa.exc.SQLAlchemyError as exc:
        orig = getattr(exc, "orig", None) or exc  # the driver's own error, without SQLAlchemy's wrapping
        message = str(orig).lower()
        where = f"{parsed.host or 'localhost'}:{parsed.port or 'default port'}"
        fields = {"db": parsed.database, "user": parsed.username, "where": where, "timeout": CONNECT_TIMEOUT_S}
        reason = next((text.format(**fields) for keys, text in _REFUSALS if any(k in message for k in keys)),
                      _first_line(orig))
        raise ConfigError(f"{what} {_redact(url)}: {reason}") from None
    finally:
        engine.dispose()


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _redact(url: str) -> str:
    """A parsed URL without its password (only called on URLs that parse)."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def check_search(spec, flags: dict[str, bool]):
    """Everything a search needs, checked before a study exists; returns the spec with its
    storage URL normalized.  ``flags[key]`` says whether the value came from a flag."""
    def name(key: str, flag: str) -> str:
        return flag if flags.get(key) else key

    url = normalize_storage(spec.storage, spec.study_dir / "journal.log", name("storage", "--storage"))
    check_writable_dir(spec.studies_dir, name("studies_dir", "--studies-dir"))
    if spec.leaderboard_dir:
        check_writable_dir(spec.leaderboard_dir, "leaderboard_dir")
    check_quality(spec.budget.quality, spec.data, "budget.quality")
    check_dataset(spec)
    return spec if spec.storage is None else spec.model_copy(update={"storage": url})


def check_quality(quality, data, what: str) -> None:
    """The sample-quality features can be computed here (before any training: a missing Inception
    file must not cost a whole run); ``quality`` a QualityConfig or None, ``data`` a DataConfig."""
    if quality is None:
        return
    from .data import load_cached
    from .quality.features import check_features

    try:
        with quieter("mdmsearch.data"):  # (a missing dataset is check_dataset's line, below)
            channels = load_cached(data).shape[0] if quality.features == "auto" else None
    except (MDMError, OSError, ValueError, RuntimeError):
        return
    try:
        check_features(quality.features, channels)
    except MDMError as exc:
        raise ConfigError(f"{what}.features {quality.features}: {_first_line(exc)}") from None


def check_dataset(spec) -> None:
    """Load the spec's dataset once (the local executor keeps it cached): missing or unreadable
    files are the same failure for every trial, so a setup error, before any study exists."""
    from .data import load_cached

    try:
        load_cached(spec.data)
    except MDMError:  # DatasetUnavailableError, CorruptDatasetError: already one line
        raise
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"data.name {spec.data.name}: cannot load the dataset: {_first_line(exc)}") from None
