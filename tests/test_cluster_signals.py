"""`main.py cluster` as a real process, stopped in the middle of training by SIGKILL, SIGTERM or Ctrl-C (SIGINT):
no node process outlives it, and every super node's ledger still verifies, the heads at most the in-flight block
apart."""
from __future__ import annotations

import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIRST_ROUND_S = 120.0   # starting the cluster: about 25 s here
GONE_S = 20.0           # every node must be gone this long after the signal
EXIT_CODES = {signal.SIGKILL: -signal.SIGKILL, signal.SIGTERM: 128 + signal.SIGTERM, signal.SIGINT: 130}

pytestmark = pytest.mark.slow


def processes_under(root: Path) -> dict[int, str]:
    """Every live process (not this one) whose command line names ``root``: pid -> command line."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:   # gone meanwhile
            continue
        if str(root) in cmdline:
            found[int(entry)] = cmdline.strip()
    return found


def kill_leftovers(root: Path) -> dict[int, str]:
    left = processes_under(root)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def head(db: Path, height: int | None = None) -> tuple[int, str]:
    """(height, hash) of the newest block, or of block ``height``, read with the ledger opened read-only."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        query = "SELECT height, hash FROM blocks " + ("WHERE height = ?" if height is not None else
                                                      "ORDER BY height DESC LIMIT 1")
        row = conn.execute(query, () if height is None else (height,)).fetchone()
    finally:
        conn.close()
    assert row is not None, f"{db} holds no block"
    return int(row[0]), str(row[1])


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_cluster_stopped_by_a_signal_mid_training_leaves_no_node_and_valid_ledgers(tmp_path, sig):
    root = tmp_path / f"fl-{uuid.uuid4().hex[:12]}"   # unique: the processes are found by it
    settings = tmp_path / "settings.json"
    settings.write_text('{"heartbeat_s": 0.5}')
    cluster = subprocess.Popen(
        [sys.executable, "main.py", "cluster", "--config", str(settings), "--sn", "2", "--en", "2",
         "--en-per-process", "2", "--insecure", "--rounds", "1000", "--model", "2nn", "--threads", "1",
         "--local-epochs", "1", "--data-root", str(root)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: queue.Queue[str | None] = queue.Queue()
    seen: list[str] = []

    def read() -> None:
        assert cluster.stdout is not None
        for line in cluster.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + FIRST_ROUND_S
        while not any(line.startswith("round 1 ") for line in seen):
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            assert line is not None, "the cluster trained no round:\n" + "\n".join(seen)
            seen.append(line)
        cluster.send_signal(sig)
        deadline = time.monotonic() + GONE_S
        try:
            code: int | None = cluster.wait(timeout=GONE_S)
        except subprocess.TimeoutExpired:
            code = None
        while processes_under(root) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        if cluster.poll() is None:
            cluster.kill()
            cluster.wait()
        left = kill_leftovers(root)
        reader.join(timeout=5)
    while not lines.empty() and (line := lines.get_nowait()) is not None:
        seen.append(line)

    assert not left, f"{len(left)} process(es) outlived the cluster by {GONE_S:.0f} s (killed now): " + \
        "; ".join(f"{pid}: {cmd}" for pid, cmd in left.items())
    assert code == EXIT_CODES[sig], "\n".join(seen)
    dbs = sorted((root / "cluster").glob("sn*/ledger.db"))
    assert [db.parent.name for db in dbs] == ["sn0", "sn1"]
    verifies = [subprocess.Popen([sys.executable, "main.py", "verify", "--db", f"sqlite:///{db}"], cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for db in dbs]
    for db, proc in zip(dbs, verifies, strict=True):
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.startswith("OK: "), f"{db}: {out}"
    heads = [head(db) for db in dbs]
    low, high = min(h[0] for h in heads), max(h[0] for h in heads)
    assert low >= 2, heads   # genesis, the second super node's admission, round 1
    assert high - low <= 1, f"the heads differ by more than the in-flight block: {heads}"
    assert len({head(db, low) for db in dbs}) == 1, f"the chains fork below the in-flight block: {heads}"


def test_every_stop_step_runs_when_one_fails_and_the_failure_is_one_log_line(caplog):
    from node.process.launch import _stop_steps
    ran = []

    def fail() -> None:
        ran.append("ledger")
        raise OSError("disk I/O error\nsecond line")

    ok = _stop_steps([("stopping the node", lambda: ran.append("node")), ("closing the ledger", fail),
                      ("removing node.json", lambda: ran.append("ready"))])

    assert (ok, ran) == (False, ["node", "ledger", "ready"])
    assert [r.getMessage() for r in caplog.records] == \
        ["closing the ledger failed: OSError: disk I/O error second line"]
