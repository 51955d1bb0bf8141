"""The tests' fixtures: ``s3`` (a store location on a real S3 server, moto, checking credentials),
``postgres`` (a real PostgreSQL server for the session) and ``digits`` (the real digits at 8 px, 30
training images per class). Plain helpers (ports, processes, the
tiny study) are in helpers.py."""
import pwd
import re
import subprocess
import uuid

import pytest
from helpers import S3Store, as_postgres_user, postgres_bin, start_moto, start_postgres, stop_postgres, \
    stop_session, wait_postgres


@pytest.fixture(scope="session")
def digits():
    """The real digits (scikit-learn's, embedded) at 8 px, 30 training images per class: the
    methods' tests distil and train on it in seconds."""
    from ptmdd_ray.config import build_config
    from ptmdd_ray.data import load_data

    return load_data(build_config({"dataset": {"name": "digits", "im_size": 8, "train_per_class": 30}}).dataset)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One moto server for the session (each test takes a prefix of its own in its bucket)."""
    proc, server = None, None
    try:
        proc, server = start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
        yield server
    finally:
        if proc is not None:
            proc.terminate()  # reaped here, so that stop_session does not wait on a zombie
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            stop_session(proc.pid, grace=2)



@pytest.fixture
def s3(s3_server, monkeypatch, request):
    """A store location of this test's own on the session's moto server, with the standard AWS_*
    variables set for this process (restored afterwards) and in ``.env`` for subprocesses."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    prefix = re.sub(r"[^A-Za-z0-9_-]", "_", request.node.name)[-60:] + "-" + uuid.uuid4().hex[:8]
    return S3Store(s3_server, prefix)

@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL for the test session (:func:`helpers.start_postgres`): yields a
    :class:`Postgres` (``.url(db)``, ``.create_database() -> url``); at teardown ``pg_ctl stop -m
    fast``, then whatever is left of its session is stopped and the directory removed. Skips when no
    PostgreSQL server is installed (``.ci/setup`` installs Debian's)."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server installed (bash .ci/setup installs Debian's postgresql)")
    pytest.importorskip("psycopg2")
    prefix = as_postgres_user()
    if prefix:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as")
    pg, server, root = start_postgres(bindir, prefix)
    try:
        wait_postgres(pg, server, root)
        yield pg
    finally:
        stop_postgres(bindir, prefix, server, root)


@pytest.fixture()
def postgres_db(postgres) -> str:
    """The URL of a fresh, empty database on the session's :func:`postgres` server."""
    return postgres.create_database()
