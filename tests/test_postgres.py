"""PostgreSQL behind MLflow and Optuna: a real server (the ``postgres`` fixture of conftest.py)."""
from conftest import is_loopback, listening


def test_postgres_fixture_serves_fresh_databases_on_the_loopback_only(postgres):
    url = postgres.create_database()
    assert url.startswith(f"postgresql://ptmdd:{postgres.password}@127.0.0.1:{postgres.port}/t_")
    conn = postgres.connect(url.rsplit("/", 1)[1])
    with conn.cursor() as cur:
        cur.execute("select 1")
        assert cur.fetchone() == (1,)
    conn.close()
    servers = listening(postgres.session)
    assert servers and all(is_loopback(a) for a in servers), servers
