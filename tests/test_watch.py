"""stpm-watch: files dropped while the watcher is killed -9 twice and restarted each get exactly
one result and end in the right folder. Every wait is bounded; the watcher is stopped."""

from __future__ import annotations

import collections
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("watchdog")

from stpm import visualize  # noqa: E402
from stpm.record import Record  # noqa: E402
from stpm.watch import unique_move  # noqa: E402

from .servers import stopped, until  # noqa: E402

WATCH = "from stpm.cli import watch_main; raise SystemExit(watch_main())"


def drop(inbox: Path, sources: list[bytes], count: int, dropped: list) -> None:
    """count files into inbox, of four kinds in turn: renamed in, written slowly (pauses
    shorter than the watcher's settle time), unreadable, and a name used again (once the
    earlier file of that name has left the inbox)."""
    for index in range(count):
        kind = index % 4
        data = sources[index]
        name = f"part-{index:03d}.png"
        if kind == 2:
            data = b"\x89PNG\r\n\x1a\n" + os.urandom(64) if index % 8 == 2 else b"not an image"
        if kind == 3:
            name = "again.png"
            until = time.monotonic() + 30
            while (inbox / name).exists() and time.monotonic() < until:
                time.sleep(0.05)
        if kind == 0:
            (inbox / f".{name}.tmp").write_bytes(data)
            os.rename(inbox / f".{name}.tmp", inbox / name)
        elif kind == 1:
            with open(inbox / name, "wb") as handle:
                for part in (data[: len(data) // 2], data[len(data) // 2 :]):
                    handle.write(part)
                    handle.flush()
                    time.sleep(0.2)
        else:
            (inbox / name).write_bytes(data)
        dropped.append((name, len(data), hashlib.sha256(data).hexdigest(), kind == 2))
        time.sleep(0.01)


def start(inbox: Path, record: Path, model: Path, log) -> subprocess.Popen:
    command = [
        sys.executable, "-c", WATCH, str(inbox), "--model", str(model), "--record",
        str(record), "--settle", "0.6",
    ]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)


def test_every_file_once_across_two_kills(onnx_file, category, tmp_path):
    inbox, record, log = tmp_path / "inbox", tmp_path / "record", (tmp_path / "log").open("w")
    inbox.mkdir()
    base = [cv2.imread(str(path)) for path in sorted(category.rglob("*.png"))[:24]]
    sources = [  # 300 different files (a file is its name, size and hash)
        visualize.encode_png(np.roll(base[index % len(base)], index // len(base), axis=1))
        for index in range(300)
    ]
    dropped: list = []
    dropper = threading.Thread(target=drop, args=(inbox, sources, 300, dropped))
    watcher = start(inbox, record, onnx_file, log)
    try:
        dropper.start()
        for pause in (3.0, 4.0):  # killed -9 twice, mid-stream, and started again
            time.sleep(pause)
            watcher.send_signal(signal.SIGKILL)
            watcher.wait(10)
            watcher = start(inbox, record, onnx_file, log)
        dropper.join(120)
        until(lambda: not any(p.is_file() for p in inbox.iterdir()), seconds=120, every=0.2)
        watcher.send_signal(signal.SIGTERM)
        assert watcher.wait(30) == 0
    finally:
        stopped(watcher)
    assert len(dropped) == 300
    assert not [p for p in inbox.iterdir() if p.is_file()], "files left in the inbox"
    parts = Record(record).parts(limit=10_000)
    keys = collections.Counter((p["name"], p["size"], p["sha256"]) for p in parts)
    for name, size, digest, _ in dropped:  # exactly one result each
        assert keys[(name, size, digest)] == 1, name
    assert len(parts) == len(set(keys)) == 300
    placed = {}
    for verdict in ("good", "anomalous", "error"):
        for path in (inbox / verdict).iterdir():
            if not path.name.endswith(".reason.txt"):
                placed[hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_size] = verdict
    by_key = {(p["sha256"], p["size"]): p["verdict"] for p in parts}
    assert sum(1 for v in (inbox / "good", inbox / "anomalous", inbox / "error")
               for p in v.iterdir() if not p.name.endswith(".reason.txt")) == 300  # fmt: skip
    for key, verdict in by_key.items():
        assert placed[key] == verdict
    unreadable = {(d, s) for _, s, d, junk in dropped if junk}
    assert {by_key[key] for key in unreadable} == {"error"}
    assert all(by_key[(d, s)] != "error" for _, s, d, junk in dropped if not junk)
    assert len(list((inbox / "error").glob("*.reason.txt"))) == sum(d[3] for d in dropped)


def test_a_name_taken_gets_a_suffix_never_overwritten(tmp_path):
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "a.png").write_bytes(b"first")
    (tmp_path / "a.png").write_bytes(b"second")
    target = unique_move(tmp_path / "a.png", tmp_path / "good")
    assert target.name == "a-1.png" and target.read_bytes() == b"second"
    assert (tmp_path / "good" / "a.png").read_bytes() == b"first"
    os.link(tmp_path / "good" / "a-1.png", tmp_path / "b.png")  # a move a crash cut short
    os.link(tmp_path / "b.png", tmp_path / "good" / "b.png")
    assert unique_move(tmp_path / "b.png", tmp_path / "good").name == "b.png"
    assert not (tmp_path / "b.png").exists()
