"""Claims carry a lease kept alive by a heartbeat; stale claims are taken over from any host."""
from __future__ import annotations

import json
import os
import socket
import time

from click.testing import CliRunner

from avcl_core import cache as C
from avcl_core.manifest import Manifest

MATERIAL = {"encoder": "toy", "weights": "none"}


def _store(tmp_path, n=8):
    m = Manifest([{"sample_id": f"s{i}", "dataset": "toy", "split": "train", "label": 0, "class_name": "a",
                   "video": f"s{i}.mp4"} for i in range(n)])
    return C.create_store(str(tmp_path / "s.zarr"), key_material=MATERIAL, manifest=m, streams={"audio": (2,)},
                          rows_per_shard=2)


def _foreign_claim(st, i, *, age, lease=60.0, host="node-17", pid=4242):
    """A claim written by a writer on another host whose last heartbeat was ``age`` seconds ago."""
    path = os.path.join(st.path, C.SHARDS_DIR, f"{i:06d}.claim")
    with open(path, "w") as f:
        json.dump({"host": host, "pid": pid, "time": time.time() - age, "token": "f" * 32, "lease_s": lease}, f)
    t = time.time() - age
    os.utime(path, (t, t))
    return path


def test_an_expired_lease_from_another_host_is_taken_over_and_a_live_one_is_not(tmp_path):
    st = _store(tmp_path)
    _foreign_claim(st, 0, age=61.0)  # its writer died on node-17 a while ago
    _foreign_claim(st, 1, age=5.0)  # its writer on node-17 is working (recent heartbeat)
    assert st.claim(0), "a claim whose lease expired must be taken over"
    assert st.claim_holder(0)["pid"] == os.getpid() and st.claim_holder(0)["host"] == socket.gethostname()
    assert not st.claim(1), "a live claim of another host must be left to it"
    assert st.claim_holder(1)["host"] == "node-17"
    st.release(0)


def test_a_claim_with_this_process_pid_that_it_does_not_hold_is_stale(tmp_path):
    st = _store(tmp_path)
    # left by an earlier process that had this pid (a restarted container): fresh heartbeat, same host and pid
    _foreign_claim(st, 2, age=1.0, host=socket.gethostname(), pid=os.getpid())
    assert st.claim(2) and st.holds(2)
    assert not st.claim(2)  # now this process's own claim: not taken twice
    st.release(2)
    assert st.claim_holder(2) is None


def test_the_heartbeat_keeps_a_held_claim_live_past_its_lease(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "CLAIM_LEASE_S", 0.6)
    st = _store(tmp_path)
    assert st.claim(3)
    path = os.path.join(st.path, C.SHARDS_DIR, "000003.claim")
    _foreign_claim(st, 1, age=0.0, lease=0.6)  # a foreign writer that stopped beating just now
    time.sleep(1.5)
    claims = st.claims()
    assert claims[3][2] == "live" and claims[3][1] < 0.6, claims[3]  # refreshed by this process
    assert claims[1][2] == "stale", claims[1]
    assert json.loads(open(path).read())["lease_s"] == 0.6
    st.release(3)


def test_unclaim_removes_claims_and_says_whose_they_were(tmp_path):
    from avcl_core.cli_cache import main

    st = _store(tmp_path)
    _foreign_claim(st, 0, age=5.0)
    _foreign_claim(st, 2, age=500.0)
    _foreign_claim(st, 3, age=500.0)
    res = CliRunner().invoke(main, ["unclaim", st.path, "--shards", "2"])
    assert res.exit_code == 0, res.output
    assert "removed claim on shard 2: node-17 pid 4242, heartbeat 500 s ago (stale)" in res.output
    assert sorted(st.claims()) == [0, 3]
    res = CliRunner().invoke(main, ["unclaim", st.path])
    assert res.exit_code == 0 and "2 claims removed" in res.output and "shards 0 looked live" in res.output
    assert st.claims() == {} and st.claim(0)
    st.release(0)


def test_a_writer_whose_claim_was_taken_over_neither_writes_nor_removes_the_new_claim(tmp_path):
    from extract import runner

    st = _store(tmp_path)
    assert st.claim(0)
    _foreign_claim(st, 0, age=0.0)  # our lease expired meanwhile; node-17 took the shard over
    assert not st.holds(0)
    buf = runner._ShardBuffer(st, 0)
    res = runner._write_shard(st, buf)
    assert res.lost and st.done_marker(0) is None
    st.release(0)
    assert st.claim_holder(0)["host"] == "node-17"
