"""The checkpoint store, on a local directory and on S3 (a real moto server, see conftest's
``s3`` fixture): the tests that matter run on both (``where``), the S3 lease lock and the S3
failures on S3 alone. Contention is between real processes."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from helpers import free_port
from ptmdd_ray.store import CheckpointStore, IntegrityError, StoreError, check_key, load_checked


def _tensors():
    return {"w": torch.arange(6.0).view(2, 3), "n": torch.tensor(3, dtype=torch.int64)}


class LocalDir:
    """The local counterpart of conftest's ``S3Store``: the location and raw access to its files."""

    def __init__(self, root: Path):
        self.root, self.uri, self.env = root, str(root), {**os.environ, "PYTHONWARNINGS": "ignore"}

    def put(self, relative: str, data: bytes) -> None:
        (self.root / relative).parent.mkdir(parents=True, exist_ok=True)
        (self.root / relative).write_bytes(data)

    def get(self, relative: str) -> bytes:
        return (self.root / relative).read_bytes()

    def names(self, under: str = "") -> list[str]:
        top = self.root / under
        return sorted(str(p.relative_to(self.root)) for p in top.rglob("*") if p.is_file()) if top.exists() else []


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """A fresh store location: a local directory, or a prefix of its own on the moto server."""
    return LocalDir(tmp_path / "s") if request.param == "local" else request.getfixturevalue("s3")


def test_round_trip_with_metadata(where):
    store = CheckpointStore(where.uri)
    meta = store.save("ConvNet-s0-abc-e0002", _tensors(), {"arch": "ConvNet", "epoch": 2})
    assert store.has("ConvNet-s0-abc-e0002") and not store.has("other")
    ck = store.load("ConvNet-s0-abc-e0002")
    assert torch.equal(ck.tensors["w"], _tensors()["w"]) and ck.tensors["n"].item() == 3
    assert ck.meta["arch"] == "ConvNet" and ck.meta["sha256"] == meta["sha256"] and len(meta["sha256"]) == 64
    assert store.keys() == ["ConvNet-s0-abc-e0002"]
    assert store.stats() == {"checkpoints": 1, "trainings": 0, "hits": 0, "bytes": meta["bytes"]}
    # no temporary files are left behind by the atomic writes
    assert where.names("ptm") == ["ptm/ConvNet-s0-abc-e0002.json", "ptm/ConvNet-s0-abc-e0002.safetensors"]
    assert CheckpointStore(where.uri).load("ConvNet-s0-abc-e0002").meta["sha256"] == meta["sha256"]


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "replace"])
def test_tampered_checkpoint_is_refused(where, tmp_path, damage):
    store = CheckpointStore(where.uri)
    store.save("k1", _tensors(), {})
    data = bytearray(where.get("ptm/k1.safetensors"))
    if damage == "flip_byte":
        data[-1] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:  # a valid safetensors file with other weights
        other = CheckpointStore(tmp_path / "other")
        other.save("k1", {"w": torch.zeros(2, 3)}, {})
        data = (tmp_path / "other" / "ptm" / "k1.safetensors").read_bytes()
    where.put("ptm/k1.safetensors", bytes(data))  # behind the store's back
    with pytest.raises(IntegrityError, match="sha256"):
        store.load("k1")


def test_missing_tensor_file_is_an_integrity_error(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save("k1", _tensors(), {})
    (tmp_path / "ptm" / "k1.safetensors").unlink()
    with pytest.raises(IntegrityError):
        store.load("k1")


def test_pickle_payload_is_never_executed(tmp_path):
    """A checkpoint file replaced by a pickle (with a matching sha in a forged sidecar) is refused
    by the safetensors parser: nothing is unpickled."""
    import hashlib
    import pickle

    store = CheckpointStore(tmp_path)
    store.save("k1", _tensors(), {})
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    payload = pickle.dumps(Evil())
    (tmp_path / "ptm" / "k1.safetensors").write_bytes(payload)
    meta_path = tmp_path / "ptm" / "k1.json"
    meta = json.loads(meta_path.read_text())
    meta["sha256"] = hashlib.sha256(payload).hexdigest()
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(Exception):
        store.load("k1")
    assert not marker.exists()


@pytest.mark.parametrize("key", ["../x", "a/b", "/abs", "..", "", "a b"])
def test_keys_cannot_escape_the_root(tmp_path, key):
    with pytest.raises(ValueError):
        check_key(key)
    with pytest.raises(ValueError):
        CheckpointStore(tmp_path).save(key, _tensors(), {})


def test_read_only_store_gives_a_store_error(tmp_path):
    import os

    if os.geteuid() == 0:
        # root ignores permission bits; a file in place of the directory fails for everyone
        (tmp_path / "ro").write_text("not a directory")
        store = CheckpointStore(tmp_path / "ro")
    else:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o500)
        store = CheckpointStore(tmp_path / "ro")
    with pytest.raises(StoreError):
        store.save("k1", _tensors(), {})


def test_uri_form_uses_the_same_code_path(tmp_path):
    store = CheckpointStore(f"file://{tmp_path}/u")
    store.save("k1", _tensors(), {"a": 1})
    assert CheckpointStore(tmp_path / "u").load("k1").meta["a"] == 1


def test_life_time_counters_persist_across_instances(where):
    store = CheckpointStore(where.uri)
    store.count(trainings=1)
    store.count(hits=2)
    again = CheckpointStore(where.uri)
    assert again.counters() == {"trainings": 1, "hits": 2}
    assert again.stats()["trainings"] == 1 and again.stats()["checkpoints"] == 0
    assert where.names("locks") == [] or all(n.endswith(".lock") for n in where.names("locks"))  # no lease left


def test_records_round_trip_and_a_damaged_record_reads_as_missing(where):
    store = CheckpointStore(where.uri)
    assert store.record("baseline-x") is None
    store.put_record("baseline-x", {"ident": "a", "baseline": {"ConvNet": 0.5}})
    assert CheckpointStore(where.uri).record("baseline-x") == {"ident": "a", "baseline": {"ConvNet": 0.5}}
    where.put("records/baseline-x.json", b'{"ident": "a", "base')  # truncated behind the store's back
    assert store.record("baseline-x") is None  # recomputed by its caller, never half-read
    store.put_record("baseline-x", {"ident": "b"})
    assert store.record("baseline-x") == {"ident": "b"}


def test_gc_removes_orphans_and_corrupt_checkpoints(where):
    store = CheckpointStore(where.uri)
    store.save("good", _tensors(), {})
    store.save("bad", _tensors(), {})
    where.put("ptm/bad.safetensors", b"garbage")
    where.put("ptm/half.safetensors", b"x")  # a tensor file whose JSON never landed
    assert store.gc() == {"temporary": 0, "orphaned": 1, "corrupt": 1}
    assert where.names("ptm") == ["ptm/good.json", "ptm/good.safetensors"]
    assert store.load("good").tensors["w"].shape == (2, 3)


def test_gc_removes_temporaries_orphans_and_corrupt_checkpoints(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save("good", _tensors(), {})
    store.save("bad", _tensors(), {})
    ptm = tmp_path / "ptm"
    (ptm / "bad.safetensors").write_bytes(b"garbage")
    (ptm / "half.safetensors").write_bytes(b"x")           # tensor file whose JSON never landed
    (ptm / "good.json.tmp-0123").write_bytes(b"{")          # an interrupted write
    assert store.gc() == {"temporary": 1, "orphaned": 1, "corrupt": 1}
    assert sorted(p.name for p in ptm.iterdir()) == ["good.json", "good.safetensors"]
    assert store.load("good").tensors["w"].shape == (2, 3)


def test_a_symlink_planted_in_the_store_is_not_followed_outside(tmp_path):
    store = CheckpointStore(tmp_path / "store")
    store.save("k1", _tensors(), {})
    secret = tmp_path / "secret.json"
    secret.write_text('{"sha256": "x"}')
    link = tmp_path / "store" / "ptm" / "k2.json"
    link.symlink_to(secret)
    with pytest.raises(IntegrityError, match="outside the store root"):
        store.load("k2")
    store.load("k1")  # real files still load


def test_counters_are_not_lost_under_concurrent_writers(tmp_path):
    import threading

    store = CheckpointStore(tmp_path / "store")
    threads = [threading.Thread(target=lambda: [CheckpointStore(tmp_path / "store").count(hits=1)
                                                for _ in range(20)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.counters()["hits"] == 80


def test_a_lock_held_elsewhere_is_reported_without_waiting(where):
    store = CheckpointStore(where.uri)
    with store.lock("x") as held:
        assert held is True
        with store.lock("x", wait=False) as free:
            assert free is False  # held by the outer block (another open file: flock excludes it)
        with store.lock("y", wait=False) as other:
            assert other is True  # locks are per name
    with store.lock("x", wait=False) as free:
        assert free is True


# -- contention between real processes ----------------------------------------------------------

WORKER = textwrap.dedent("""
    import logging, sys, time
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    from ptmdd_ray.store import CheckpointStore
    uri, mode, ttl, arg = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    store = CheckpointStore(uri, lease_ttl=ttl)
    if mode == "hold":  # take the lock, say when, hold it arg seconds
        with store.lock("run") as held:
            print("held", time.time(), flush=True)
            time.sleep(arg)
            print("releasing", time.time(), flush=True)
    elif mode == "mutex":  # arg rounds of a short critical section, each logged as an interval
        for _ in range(int(arg)):
            with store.lock("run"):
                start = time.time()
                time.sleep(0.1)
                print("interval", start, time.time(), flush=True)
    elif mode == "count":  # arg increments of the hits counter
        for _ in range(int(arg)):
            store.count(hits=1)
    print("done", flush=True)
""")


def _worker(where, mode: str, ttl: float = 30.0, arg: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, where.uri, mode, str(ttl), str(arg)], env=where.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_line(proc: subprocess.Popen, word: str, timeout: float = 60) -> float:
    """The time stamped on the worker's first line starting with ``word``."""
    end = time.time() + timeout
    while time.time() < end:
        line = proc.stdout.readline()
        if line.startswith(word):
            return float(line.split()[1])
        if not line and proc.poll() is not None:
            raise AssertionError(f"worker exited {proc.returncode}: {proc.stderr.read()}")
    raise TimeoutError(word)


def _finish(*procs: subprocess.Popen, timeout: float = 120) -> list[str]:
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err
        outs.append(out)
    return outs


def test_counters_are_exact_under_two_writer_processes_on_s3(s3):
    a, b = _worker(s3, "count", arg=12), _worker(s3, "count", arg=12)
    _finish(a, b)
    assert CheckpointStore(s3.uri).counters()["hits"] == 24


def test_two_processes_never_hold_an_s3_lock_at_once(s3):
    a, b = _worker(s3, "mutex", arg=6), _worker(s3, "mutex", arg=6)
    intervals = sorted((float(x), float(y)) for out in _finish(a, b) for line in out.splitlines()
                       if line.startswith("interval") for x, y in [line.split()[1:]])
    assert len(intervals) == 12
    for (_, end), (start, _) in zip(intervals, intervals[1:]):
        assert start >= end, intervals  # each critical section starts after the previous one ended
    assert s3.names("locks") == []  # every lease released


def test_a_killed_holders_s3_lease_is_taken_over_after_its_ttl_and_not_before(s3, caplog):
    ttl = 3.0
    holder = _worker(s3, "hold", ttl=ttl, arg=600)
    held_at = _wait_line(holder, "held")
    holder.send_signal(signal.SIGKILL)  # no release, no renewal: only the ttl frees it
    holder.wait()
    store = CheckpointStore(s3.uri, lease_ttl=ttl)
    with store.lock("run", wait=False) as free:
        assert free is False
    with store.lock("run") as held:
        taken_at = time.time()
        assert held is True
    assert taken_at - held_at >= ttl  # not before the ttl ...
    assert taken_at - held_at < ttl + 5  # ... and soon after it (1 s clock resolution + polling)
    assert "took over the expired lease" in caplog.text
    assert s3.names("locks") == []


def test_an_s3_lease_held_longer_than_its_ttl_is_renewed(s3):
    ttl, hold = 2.0, 8.0
    holder = _worker(s3, "hold", ttl=ttl, arg=hold)
    held_at = _wait_line(holder, "held")
    store = CheckpointStore(s3.uri, lease_ttl=ttl)
    tries = 0
    while time.time() < held_at + hold - 1:  # the holder is inside its block, 4 ttl long
        with store.lock("run", wait=False) as free:
            assert free is False, f"the holder lost its lease {time.time() - held_at:.1f} s after taking it"
        tries += 1
        time.sleep(0.5)
    assert tries >= 8
    _finish(holder)
    with store.lock("run", wait=False) as free:
        assert free is True  # released on exit


def test_a_stalled_holder_that_lost_its_s3_lease_does_not_delete_the_successors(s3):
    ttl = 2.0
    holder = _worker(s3, "hold", ttl=ttl, arg=1.0)
    _wait_line(holder, "held")
    os.kill(holder.pid, signal.SIGSTOP)  # a holder that stalls past its ttl (swap, a debugger)
    try:
        store = CheckpointStore(s3.uri, lease_ttl=30)
        with store.lock("run") as held:
            assert held is True
            os.kill(holder.pid, signal.SIGCONT)
            out, err = holder.communicate(timeout=60)
            assert holder.returncode == 0, err
            assert "was lost" in err, err
            mine = json.loads(s3.get("locks/run.lease"))
            assert mine["pid"] == os.getpid()  # the old holder's release left our lease alone
    finally:
        os.kill(holder.pid, signal.SIGCONT) if holder.poll() is None else None
    assert s3.names("locks") == []


def test_an_s3_lease_whose_create_landed_unseen_is_ours_and_a_foreign_one_expires(s3):
    """A create whose reply was lost (the client retries, the server says the lease exists) is
    recognised by the uuid in the body; an unreadable lease object is judged by our own ttl."""
    from ptmdd_ray.s3 import S3Lease

    store = CheckpointStore(s3.uri, lease_ttl=1.0)
    lease = S3Lease(store.s3, "run", ttl=1.0)
    s3.put("locks/run.lease", json.dumps({"host": "h", "pid": 1, "id": lease.id, "ttl": 1.0}).encode())
    assert lease.acquire(wait=False) is True
    lease.release()
    assert s3.names("locks") == []
    s3.put("locks/run.lease", b"not a lease")
    with store.lock("run", wait=False) as free:
        assert free is False  # fresh: someone may hold it
    with store.lock("run") as held:  # expires after ttl + 1 s on the server's clock
        assert held is True
    assert s3.names("locks") == []


# -- S3 failures: one line, in seconds, nothing written --------------------------------------------

def _s3_failure(s3, case: str) -> tuple[str, str, dict]:
    """(uri, the one line expected, environment) for one bad S3 setting."""
    env = dict(s3.env)
    if case == "missing-bucket":
        return "s3://no-such-bucket-x/p", "store: s3://no-such-bucket-x/p: bucket 'no-such-bucket-x' does not exist", env
    if case == "unreachable":
        port = free_port()  # nothing listens there
        return (f"{s3.uri}?endpoint_override=127.0.0.1:{port}&scheme=http",
                f"store: {s3.uri}: cannot reach the S3 endpoint http://127.0.0.1:{port} (connection refused)", env)
    env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    return s3.uri, f"store: {s3.uri}: access denied (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)", env


S3_FAILURES = ["missing-bucket", "unreachable", "wrong-credentials"]


@pytest.mark.parametrize("case", S3_FAILURES)
def test_s3_failures_are_one_line_store_errors_within_seconds(s3, monkeypatch, case):
    """moto checks credentials here (conftest's server has IAM authentication on), so a wrong
    secret is refused as it would be by AWS."""
    uri, expected, env = _s3_failure(s3, case)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", env["AWS_SECRET_ACCESS_KEY"])
    store = CheckpointStore(uri)  # no network yet
    for check in (store.check, store.check_writable):
        start = time.time()
        with pytest.raises(StoreError) as err:
            check()
        assert time.time() - start < 10
        assert str(err.value) == expected
    with pytest.raises(StoreError, match="store: s3://"):
        with store.lock("x"):
            pass
    assert s3.names() == []  # nothing written, not even a probe


@pytest.mark.parametrize("case,action", list(zip(S3_FAILURES, ["ls", "stats", "gc"])))
def test_store_commands_on_a_bad_s3_store_exit_1_with_one_line(s3, case, action):
    uri, expected, env = _s3_failure(s3, case)
    proc = subprocess.run([sys.executable, "-m", "ptmdd_ray.cli", "store", action, "--store", uri], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines() == [f"ptmdd: error: {expected}"]
    assert s3.names() == []


def test_a_bad_s3_uri_is_a_one_line_store_error(s3):
    for uri, expected in [(s3.uri + "?endpoint=x", "unknown URI option 'endpoint'"),
                          ("s3://No_Such/p", "invalid bucket name 'No_Such'")]:
        with pytest.raises(StoreError, match=expected) as err:
            CheckpointStore(uri)
        assert "\n" not in str(err.value)


def test_locking_an_s3_store_without_boto3_says_what_to_install(s3):
    code = ("import sys; sys.modules['boto3'] = None\n"
            "from ptmdd_ray.store import CheckpointStore, StoreError\n"
            "store = CheckpointStore(sys.argv[1])\n"
            "store.save('k1', {}, {})\n"  # pyarrow alone reads and writes
            "for use in (store.check_writable, lambda: store.lock('x').__enter__()):\n"
            "    try:\n        use()\n    except StoreError as e:\n        print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code, s3.uri], env=s3.env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all("pip install 'ptmdd_ray[cluster]'" in line for line in lines), proc.stdout
    assert s3.names() == ["ptm/k1.json", "ptm/k1.safetensors"]  # the probe left nothing


# -- the CLI and the PTM repository on S3 ----------------------------------------------------------

@pytest.mark.slow
def test_store_commands_on_an_s3_store(s3):
    store = CheckpointStore(s3.uri)
    store.save("good", _tensors(), {"test_accuracy": 0.5})
    store.save("bad", _tensors(), {})
    store.count(trainings=2, hits=3)
    s3.put("ptm/bad.safetensors", b"garbage")

    def ptmdd(*args):
        proc = subprocess.run([sys.executable, "-m", "ptmdd_ray.cli", "store", *args, "--store", s3.uri, "--json"],
                              env=s3.env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        return json.loads(proc.stdout)

    assert [m["key"] for m in ptmdd("ls")] == ["bad", "good"]
    assert ptmdd("stats")["trainings"] == 2 and ptmdd("gc") == {"temporary": 0, "orphaned": 0, "corrupt": 1}
    assert s3.names("ptm") == ["ptm/good.json", "ptm/good.safetensors"]


def test_an_s3_checkpoint_overwritten_behind_the_store_is_quarantined_and_retrained(s3):
    from ptmdd_ray.config import build_config
    from ptmdd_ray.data import load_data
    from ptmdd_ray.pool import PTMRepository, pool_specs, save_epochs

    cfg = build_config({"dataset": {"name": "digits", "im_size": 8, "train_per_class": 20}, "model": "ConvNetW32",
                        "pool": {"archs": ["ConvNetW32"], "seeds": 1, "epoch": 1},
                        "pretrain": {"epochs": 2, "batch": 64, "save_epochs": [2]}, "store": s3.uri})
    data = load_data(cfg.dataset)
    spec, epochs = pool_specs(cfg)[0], save_epochs(cfg)
    repo = PTMRepository(CheckpointStore(cfg.store), progress=False)
    first = repo.get(spec, 1, epochs, lambda: data)
    key = spec.key(1)
    raw = bytearray(s3.get(f"ptm/{key}.safetensors"))
    raw[-3] ^= 0x01
    s3.put(f"ptm/{key}.safetensors", bytes(raw))
    assert load_checked(CheckpointStore(cfg.store), key) is None  # refused and quarantined
    assert any(n.startswith("quarantine/") and n.endswith(".safetensors") for n in s3.names("quarantine"))
    again = PTMRepository(CheckpointStore(cfg.store), progress=False)
    second = again.get(spec, 1, epochs, lambda: data)
    assert (again.trainings, again.hits) == (1, 0)
    assert all(torch.equal(first.tensors[k], second.tensors[k]) for k in first.tensors)  # same seed, same PTM
    assert CheckpointStore(cfg.store).counters()["trainings"] == 2
