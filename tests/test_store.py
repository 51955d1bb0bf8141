import json

import pytest
import torch

from ptmdd_ray.store import CheckpointStore, IntegrityError, StoreError, check_key


def _tensors():
    return {"w": torch.arange(6.0).view(2, 3), "n": torch.tensor(3, dtype=torch.int64)}


def test_round_trip_with_metadata(tmp_path):
    store = CheckpointStore(tmp_path / "s")
    meta = store.save("ConvNet-s0-abc-e0002", _tensors(), {"arch": "ConvNet", "epoch": 2})
    assert store.has("ConvNet-s0-abc-e0002") and not store.has("other")
    ck = store.load("ConvNet-s0-abc-e0002")
    assert torch.equal(ck.tensors["w"], _tensors()["w"]) and ck.tensors["n"].item() == 3
    assert ck.meta["arch"] == "ConvNet" and ck.meta["sha256"] == meta["sha256"] and len(meta["sha256"]) == 64
    assert store.keys() == ["ConvNet-s0-abc-e0002"]
    assert store.stats() == {"checkpoints": 1, "trainings": 0, "hits": 0, "bytes": meta["bytes"]}
    # no temporary files are left behind by the atomic writes
    assert sorted(p.name for p in (tmp_path / "s" / "ptm").iterdir()) == [
        "ConvNet-s0-abc-e0002.json", "ConvNet-s0-abc-e0002.safetensors"]


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "replace"])
def test_tampered_checkpoint_is_refused(tmp_path, damage):
    store = CheckpointStore(tmp_path)
    store.save("k1", _tensors(), {})
    path = tmp_path / "ptm" / "k1.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "flip_byte":
        data[-1] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:  # a valid safetensors file with other weights
        other = CheckpointStore(tmp_path / "other")
        other.save("k1", {"w": torch.zeros(2, 3)}, {})
        data = (tmp_path / "other" / "ptm" / "k1.safetensors").read_bytes()
    path.write_bytes(bytes(data))
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


def test_life_time_counters_persist_across_instances(tmp_path):
    store = CheckpointStore(tmp_path)
    store.count(trainings=1)
    store.count(hits=2)
    again = CheckpointStore(tmp_path)
    assert again.counters() == {"trainings": 1, "hits": 2}
    assert again.stats()["trainings"] == 1 and again.stats()["checkpoints"] == 0


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


def test_a_lock_held_elsewhere_is_reported_without_waiting(tmp_path):
    store = CheckpointStore(tmp_path / "s")
    with store.lock("x") as held:
        assert held is True
        with store.lock("x", wait=False) as free:
            assert free is False  # held by the outer block (another open file: flock excludes it)
        with store.lock("y", wait=False) as other:
            assert other is True  # locks are per name
    with store.lock("x", wait=False) as free:
        assert free is True
