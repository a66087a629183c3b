"""stpm-serve under load, against the same images scored in-process, on loopback.

Usage:
    python scripts/load_test.py --model MODEL.onnx --int8 MODEL-int8.onnx \
        --images /path/to/magnetic_tile/test [--seconds 10] [--memory-requests 10000]

The load comes from Debian's `wrk` (C, one thread, closed loop: each connection sends its next
image when the last answer is in), with a Lua script that rotates through the images as
request bodies and counts the statuses; its own CPU time is reported, since it shares the
machine with the server. Every run is bounded in time (--seconds) and, where it matters, in
requests, and stops by itself; the server is a real `stpm-serve` process on 127.0.0.1.

Measured, in one run:
  - in-process: STPM.load(model).predict on the images' bytes, one at a time (median, p99) and
    in batches of 16 and 4 (images/s): the yardsticks;
  - for the FP32 ONNX Runtime model and the INT8 model on OpenVINO, with micro-batching off
    (--max-batch 1) and on (--max-batch 4, taking what is queued at once, or waiting up to
    --max-wait-ms 2 for a batch to fill), at 1, 4 and 16 clients:
    requests/s, p50/p95/p99 as wrk saw them, the accepted requests' p99 in the server's log,
    statuses, server and wrk CPU;
  - the split of the 2 threads: 1 worker x 2 threads against 2 workers x 1 thread;
  - memory: resident size after warm-up and after --memory-requests more requests;
  - overload: 64 clients against --queue 8: statuses (only 200 and 503 expected) and the
    accepted requests' p99.
Results, with `lscpu`'s model and flags: serve.md and serve.json in --results.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import benchkit
import httpx
import numpy as np

SERVE = "from stpm.cli import serve_main; raise SystemExit(serve_main())"
CLIENTS = (1, 4, 16)
BATCHING = ((1, 0), (4, 0), (4, 2))  # max batch, max wait (ms): off, on without waiting, on
LUA = r"""
local requests, index, limit = {}, 0, 0
statuses, answered = {}, 0
function init(args)
  limit = tonumber(args[2]) or 0
  for line in io.lines(args[1]) do
    local file = assert(io.open(line, "rb"))
    local body = file:read("*all")
    file:close()
    local name = line:match("([^/]+)$")
    local headers = {["Content-Type"] = "application/octet-stream"}
    table.insert(requests, wrk.format("POST", "/v1/predict?name=" .. name, headers, body))
  end
end
function request()
  index = index % #requests + 1
  return requests[index]
end
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  answered = answered + 1
  -- the thread stops sending at the limit; wrk itself still waits out its -d
  if limit > 0 and answered >= limit then wrk.thread:stop() end
end
local threads = {}
function setup(thread) table.insert(threads, thread) end
function done(summary, latency, requests)
  local counts = {}
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses")) do
      counts[tostring(status)] = (counts[tostring(status)] or 0) + count
    end
  end
  local parts = {}
  for status, count in pairs(counts) do table.insert(parts, '"' .. status .. '": ' .. count) end
  local errors = summary.errors
  io.write(string.format(
    'RESULT {"requests": %d, "seconds": %.4f, "p50": %.1f, "p95": %.1f, "p99": %.1f, ' ..
    '"socket_errors": %d, "timeouts": %d, "statuses": {%s}}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50), latency:percentile(95),
    latency:percentile(99), errors.connect + errors.read + errors.write, errors.timeout,
    table.concat(parts, ", ")))
end
"""


class Server:
    """A stpm-serve process on a free loopback port, its log in a file; stopped on exit."""

    def __init__(self, model: Path | None, log: Path, *flags: str) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url, self.log = f"http://127.0.0.1:{self.port}", log
        model = [] if model is None else [str(model)]  # None: --models among the flags
        command = [sys.executable, "-c", SERVE, *model, "--port", str(self.port), *flags]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log.open("w"))
        until = time.monotonic() + 120
        while time.monotonic() < until:
            if self.process.poll() is not None:
                raise SystemExit(f"stpm-serve stopped: {log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise SystemExit("stpm-serve was not ready within 120 s")

    def log_lines(self) -> list[dict]:
        lines = []
        for line in self.log.read_text().splitlines():
            if line.startswith("{"):
                lines.append(json.loads(line))
        return lines

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_cells(
    model: Path, work: Path, flags: list[str], files, script, seconds, yardstick=None
) -> list[dict]:
    """One server with these flags, loaded by 1, 4 and 16 clients in turn; before the 1 and 4
    client runs, the yardstick they are compared with (one at a time; batched)."""
    cells, settings = [], dict(zip(flags[::2], flags[1::2], strict=True))
    with Server(model, work / "server.log", *flags) as server:
        for clients in CLIENTS:
            measured = {}
            if yardstick is not None and clients == 1:
                measured = {"interleaved": interleaved(server, yardstick, files, script)}
            if yardstick is not None and clients == 4:
                measured = {"in_process": yardstick.batched()}
            cell = {**load(server, clients, seconds, files, script), **measured}
            cell.update(
                clients=clients,
                workers=int(settings.get("--workers", 1)),
                threads=int(settings.get("--threads", 2)),
                max_batch=int(settings.get("--max-batch", 1)),
                max_wait_ms=float(settings.get("--max-wait-ms", 0)),
            )
            cells.append(cell)
            print(" ".join(flags), clients, _short(cell), flush=True)
    return cells


def interleaved(server: Server, yardstick: InProcess, files, script, rounds: int = 5) -> dict:
    """One client's median against the library's, in alternating short rounds (the images one
    at a time in-process, then 2 s of wrk), so that the machine's drift touches both alike:
    the medians of the rounds' medians, and where the server's time went."""
    found = {"in_process_ms": [], "service_ms": [], "server_total_ms": [], "server_model_ms": []}
    for _ in range(rounds):
        found["in_process_ms"].append(yardstick.one_at_a_time()["median_ms"])
        cell = load(server, 1, 2, files, script)
        found["service_ms"].append(cell["p50"])
        found["server_total_ms"].append(cell["server_medians"]["total"])
        found["server_model_ms"].append(cell["server_medians"]["model"])
    return {key: statistics.median(values) for key, values in found.items()} | {"rounds": found}


def load(server: Server, clients: int, seconds: float, files: Path, script: Path, limit=0):
    """wrk against the server: its summary, the server's own view of the accepted requests
    (from its log) and both processes' CPU."""
    skip = len(server.log_lines())
    command = [
        "wrk",
        "-t1",
        f"-c{clients}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
    ]
    command += [server.url, "--", str(files), str(limit)]
    cpu_before, wrk_before = server.cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    output = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120).stdout
    wall = time.perf_counter() - started
    wrk_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((row for row in output.splitlines() if row.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"wrk printed no result:\n{output}")
    result = json.loads(line[7:])
    for key in ("p50", "p95", "p99"):
        result[key] = result[key] / 1000  # microseconds -> ms
    result["rps"] = result["requests"] / result["seconds"]
    time.sleep(0.3)  # the log's last lines
    rows = [row for row in server.log_lines()[skip:] if row.get("status") == 200 and "queue" in row]
    accepted = [row["ms"] for row in rows]
    result["server_medians"] = {  # where an accepted request's time went, by the server's log
        key: statistics.median(row[key] for row in rows) if rows else None
        for key in ("queue", "decode", "model", "total")
    }
    result["accepted"] = len(accepted)
    result["server_p50"] = float(np.percentile(accepted, 50)) if accepted else None
    result["server_p99"] = float(np.percentile(accepted, 99)) if accepted else None
    result["server_cpu"] = (server.cpu_seconds() - cpu_before) / wall
    wrk_cpu = wrk_after.ru_utime + wrk_after.ru_stime - wrk_before.ru_utime - wrk_before.ru_stime
    result["wrk_cpu"] = wrk_cpu / wall
    return result


class InProcess:
    """The same images' bytes scored by the library in this process (the yardstick), measured
    right before each load run it is compared with: this machine's speed drifts by 20-30% from
    minute to minute (a neighbour on the same physical cores), so only neighbours compare."""

    def __init__(self, model: Path, runtime: str, paths: list[Path]) -> None:
        from stpm import STPM

        self.detector = STPM.load(model, runtime=runtime)
        self.encoded = [path.read_bytes() for path in paths]
        self.detector.runtime_.warm([1, 4, 16])
        list(self.detector.predict_iter(self.encoded[:4], batch_size=1))

    def one_at_a_time(self) -> dict:
        single = []
        for item in self.encoded:
            started = time.perf_counter()
            list(self.detector.predict_iter([item], batch_size=1))
            single.append((time.perf_counter() - started) * 1000)
        return {"median_ms": statistics.median(single), "p99_ms": float(np.percentile(single, 99))}

    def batched(self) -> dict:
        found = {}
        for batch in (16, 4):
            started = time.perf_counter()
            list(self.detector.predict_iter(self.encoded, batch_size=batch))
            found[f"batched_{batch}_per_s"] = len(self.encoded) / (time.perf_counter() - started)
        return found


def run(args: argparse.Namespace, work: Path) -> dict:
    paths = benchkit.spread_subset(
        sorted(args.images.rglob("*.jpg")) + sorted(args.images.rglob("*.png")), args.count
    )
    files, script = work / "images.txt", work / "post.lua"
    files.write_text("\n".join(str(path) for path in paths) + "\n")
    script.write_text(LUA)
    models = {
        "onnxruntime fp32": (args.model, "onnxruntime"),
        "openvino int8": (args.int8, "openvino"),
    }
    results = {"cpu": benchkit.cpu_info(), "images": len(paths), "cells": []}
    for label, (model, runtime) in models.items():
        yardstick = InProcess(model, runtime, paths)
        for batch, wait in BATCHING:
            flags = ["--runtime", runtime, "--max-batch", str(batch), "--max-wait-ms", str(wait)]
            cells = serve_cells(model, work, flags, files, script, args.seconds, yardstick)
            results["cells"] += [{**cell, "runtime": label} for cell in cells]
        del yardstick
    model, runtime = models["onnxruntime fp32"]
    flags = ["--runtime", runtime, "--workers", "2", "--threads", "1", "--max-batch", "1"]
    split = serve_cells(model, work, flags, files, script, args.seconds)
    results["split"] = [{**c, "runtime": "onnxruntime fp32"} for c in split]
    with Server(model, work / "server.log", "--runtime", runtime) as server:
        warmup = load(server, 4, 10, files, script)  # wrk runs its whole time: a rate first
        warm = server.rss_mb()
        seconds = 1.2 * args.memory_requests / warmup["rps"]  # then enough time for the count
        cell = load(server, 4, seconds, files, script, limit=args.memory_requests)
        results["memory"] = {
            "requests": cell["requests"],
            "seconds": cell["seconds"],
            "warm_rss_mb": warm,
            "end_rss_mb": server.rss_mb(),
        }
        print("memory", results["memory"], flush=True)
    with Server(model, work / "server.log", "--runtime", runtime, "--queue", "8") as server:
        cell = load(server, 64, args.seconds, files, script)
        results["overload"] = {**cell, "clients": 64, "queue": 8}
        print("overload", _short(cell), flush=True)
    return results


SWAP_SECTION = "## Swaps under load"  # what --part swap writes into serve.md, from here to the end


def run_swaps(args: argparse.Namespace, work: Path) -> dict:
    """4 clients (wrk) post for --swap-seconds to a server of one model (--models, the FP32
    export on ONNX Runtime) while an admin swaps the model 3 times (PUT /v1/models/tile, a
    copy of the same file: the full load, warm-up and probe, and the scores stay comparable).
    Each accepted request's latency (from the server's log) counts as 'during a swap' if it
    overlapped one, otherwise as steady state. Then the memory one model costs: the resident
    size of a server of 1 and of 3 copies, for each runtime."""
    paths = benchkit.spread_subset(
        sorted(args.images.rglob("*.jpg")) + sorted(args.images.rglob("*.png")), args.count
    )
    files, script = work / "images.txt", work / "post.lua"
    files.write_text("\n".join(str(path) for path in paths) + "\n")
    script.write_text(LUA)
    folder, token = work / "models", work / "admin-token"
    (folder / "tile").mkdir(parents=True)
    shutil.copy(args.model, folder / "tile" / "model.onnx")
    spare = Path(shutil.copy(args.model, work / "spare.onnx"))
    token.write_text("an-admin-token-for-the-load-test\n")
    flags = [
        "--models",
        str(folder),
        "--model-file",
        "model.onnx",
        "--admin-token-file",
        str(token),
    ]
    windows = []
    with Server(None, work / "server.log", *flags) as server:
        load(server, 4, 3, files, script)  # the first seconds out of the way

        def swaps() -> None:
            headers = {"Authorization": "Bearer an-admin-token-for-the-load-test"}
            for _ in range(3):
                time.sleep(args.swap_seconds / 4)
                started = time.time()
                answer = httpx.put(
                    server.url + "/v1/models/tile", json={"path": str(spare)}, headers=headers,
                    timeout=120,
                )  # fmt: skip
                windows.append((started, time.time(), answer.status_code))

        skip = len(server.log_lines())
        swapper = threading.Thread(target=swaps)
        swapper.start()
        cell = load(server, 4, args.swap_seconds, files, script)
        swapper.join(180)
        rows = [r for r in server.log_lines()[skip:] if r.get("path") == "/v1/predict"]
    during, steady = [], []
    for row in rows:
        end, start = row["time"], row["time"] - row["ms"] / 1000
        overlaps = any(start < w_end and end > w_start for w_start, w_end, _ in windows)
        (during if overlaps else steady).append(row)
    result = {
        "seconds": args.swap_seconds,
        "clients": 4,
        "swaps": [{"seconds": end - start, "status": status} for start, end, status in windows],
        "statuses": cell["statuses"],
        "socket_errors": cell["socket_errors"] + cell["timeouts"],
        "rps": cell["rps"],
        "steady": _latencies([row for row in steady if row["status"] == 200]),
        "during_swap": _latencies([row for row in during if row["status"] == 200]),
        "failed": sum(row["status"] not in (200, 499) for row in rows),
        "left_at_the_end": sum(row["status"] == 499 for row in rows),  # wrk stops mid-request
    }
    print("swaps", json.dumps(result), flush=True)
    return {
        "cpu": benchkit.cpu_info(),
        "swap": result,
        "memory_per_model": model_memory(args, work),
    }


def _latencies(rows: list[dict]) -> dict:
    values = [row["ms"] for row in rows]
    if not values:
        return {"count": 0}
    found = {f"p{q}": float(np.percentile(values, q)) for q in (50, 95, 99)}
    return {"count": len(values), **found, "max": max(values)}


def model_memory(args: argparse.Namespace, work: Path) -> list[dict]:
    """Resident size of a warm server of 1 and of 3 copies of a model, per runtime: the
    difference over 2 is what one more model costs."""
    found = []
    for label, source, runtime in (
        ("onnxruntime fp32", args.model, "onnxruntime"),
        ("openvino int8", args.int8, "openvino"),
    ):
        sizes = {}
        for count in (1, 3):
            folder = work / f"memory-{runtime}-{count}"
            for index in range(count):
                (folder / f"m{index}").mkdir(parents=True)
                shutil.copy(source, folder / f"m{index}" / "model.onnx")
            flags = ["--models", str(folder), "--model-file", "model.onnx", "--runtime", runtime]
            with Server(None, work / "server.log", *flags) as server:
                sizes[count] = server.rss_mb()
            shutil.rmtree(folder)
        found.append(
            {
                "runtime": label,
                "file_mb": source.stat().st_size / 2**20,
                "one_model_rss_mb": sizes[1],
                "three_models_rss_mb": sizes[3],
                "per_extra_model_mb": (sizes[3] - sizes[1]) / 2,
            }
        )
        print("memory", found[-1], flush=True)
    return found


def write_swaps(results: dict, out: Path, command: str) -> None:
    """The swap run's section of serve.md (replacing an earlier one) and serve.json's keys."""
    saved = out / "serve.json"
    kept = json.loads(saved.read_text()) if saved.exists() else {}
    kept.update(swap=results["swap"], memory_per_model=results["memory_per_model"])
    kept["swap_run"] = {"cpu": results["cpu"], "command": command}
    saved.write_text(json.dumps(kept, indent=1, allow_nan=False) + "\n")
    swap, cpu = results["swap"], results["cpu"]
    rows = []
    for label in ("steady", "during_swap"):
        cell = swap[label]
        numbers = [f"{cell[k]:.1f}" if k in cell else "-" for k in ("p50", "p95", "p99", "max")]
        rows.append([label.replace("_", " "), cell["count"], *numbers])
    memory = [
        [
            m["runtime"],
            f"{m['file_mb']:.1f}",
            f"{m['one_model_rss_mb']:.0f}",
            f"{m['three_models_rss_mb']:.0f}",
            f"{m['per_extra_model_mb']:.0f}",
        ]
        for m in results["memory_per_model"]
    ]
    durations = ", ".join(f"{s['seconds']:.2f} s ({s['status']})" for s in swap["swaps"])
    lines = [
        SWAP_SECTION,
        "",
        f"Measured in a run of its own (`{command}`), CPU: {benchkit.cpu_line(cpu)}.",
        f"Flags: {' '.join(cpu['flags'])}",
        "",
        f"4 clients (wrk) for {swap['seconds']:g} s against one model (FP32 ONNX Runtime, "
        f"`--models`), swapped 3 times by PUT /v1/models/tile: {durations} (load, warm-up, "
        f"probe). {swap['rps']:.1f} req/s overall; statuses {swap['statuses']}, "
        f"socket errors {swap['socket_errors']}; failed in the server's log: {swap['failed']} "
        f"(and {swap['left_at_the_end']} left unanswered when wrk stopped, logged as 499). "
        "Latency (ms) of the accepted requests from the server's log, by whether the request "
        "overlapped a swap:",
        "",
        *benchkit.markdown_table(["", "requests", "p50", "p95", "p99", "max"], rows),
        "",
        "### Memory per model",
        "",
        "Resident size (MB) of a warm stpm-serve holding 1 and 3 copies of the default model:",
        "",
        *benchkit.markdown_table(
            ["runtime", "file MB", "1 model", "3 models", "each more model"], memory
        ),
        "",
    ]
    report = out / "serve.md"
    text = report.read_text() if report.exists() else ""
    text = text.split(SWAP_SECTION)[0].rstrip() + "\n\n" if text else ""
    report.write_text(text + "\n".join(lines))


def run_record(args: argparse.Namespace, work: Path) -> dict:
    """The record at the service's top rate: 4 clients against the defaults (FP32 ONNX
    Runtime), with --record and without, in alternating rounds; the row's own time from the
    server's log (timings_ms.record: built and committed, before the answer)."""
    paths = benchkit.spread_subset(
        sorted(args.images.rglob("*.jpg")) + sorted(args.images.rglob("*.png")), args.count
    )
    files, script = work / "images.txt", work / "post.lua"
    files.write_text("\n".join(str(path) for path in paths) + "\n")
    script.write_text(LUA)
    rounds: dict[str, list] = {"without": [], "with": []}
    record_ms: list[float] = []
    for round_number in range(2):
        for label in ("without", "with"):
            flags = ["--record", str(work / f"record-{round_number}")] if label == "with" else []
            with Server(args.model, work / "server.log", *flags) as server:
                load(server, 4, 3, files, script)  # warm
                skip = len(server.log_lines())
                cell = load(server, 4, args.seconds, files, script)
                rows = [r for r in server.log_lines()[skip:] if r.get("status") == 200]
                record_ms += [r["record"] for r in rows if "record" in r]
                rounds[label].append({"rps": cell["rps"], "p50": cell["p50"], "p99": cell["p99"]})
                print("record", label, _short(cell), flush=True)
    return {
        "cpu": benchkit.cpu_info(),
        "rounds": rounds,
        "record_ms": {
            "count": len(record_ms),
            "median": statistics.median(record_ms),
            "p99": float(np.percentile(record_ms, 99)),
        },
    }


def write_record(results: dict, out: Path, command: str) -> None:
    """The service-rate section of record.md (replacing an earlier one)."""
    heading = "## At the service's top rate"
    found = results["record_ms"]
    rows = [
        [label, f"{r['rps']:.1f}", f"{r['p50']:.1f}", f"{r['p99']:.1f}"]
        for label, runs in results["rounds"].items()
        for r in runs
    ]
    lines = [
        heading,
        "",
        f"Measured in a run of its own (`{command}`), CPU: {benchkit.cpu_line(results['cpu'])}.",
        "",
        "4 clients (wrk) against stpm-serve's defaults (FP32 ONNX Runtime), without and with "
        "`--record`, in alternating rounds (requests/s, p50 and p99 in ms as wrk saw them):",
        "",
        *benchkit.markdown_table(["record", "req/s", "p50", "p99"], rows),
        "",
        f"The row's own time in the server (built and committed, before the answer), over "
        f"{found['count']} parts: median {found['median']:.3f} ms, p99 {found['p99']:.3f} ms "
        f"(target under 1 ms median: {'met' if found['median'] < 1 else '**missed**'}). The "
        "overlay is drawn and written afterwards on the record's own thread; it shares the two "
        "cores with the model.",
        "",
    ]
    report = out / "record.md"
    text = report.read_text() if report.exists() else ""
    text = text.split(heading)[0].rstrip() + "\n\n" if text else ""
    report.write_text(text + "\n".join(lines))


def _short(cell: dict) -> str:
    return (
        f"{cell['rps']:.1f} req/s p50 {cell['p50']:.1f} p95 {cell['p95']:.1f} p99 {cell['p99']:.1f} "
        f"statuses {cell['statuses']} server CPU {cell['server_cpu']:.2f} wrk CPU {cell['wrk_cpu']:.3f}"
    )


def targets(results: dict) -> list[tuple[str, str, bool]]:
    """Each target of the issue: what it asks, what was measured, met or not; the latency and
    throughput ones for each runtime and batching setting (1 worker x 2 threads), each against
    the in-process figure measured beside it."""
    cell = {
        (c["runtime"], c["max_batch"], c["max_wait_ms"], c["clients"]): c for c in results["cells"]
    }
    found = []
    for (label, batch, wait, clients), one in cell.items():
        if clients != 1:
            continue
        four, pair = cell[(label, batch, wait, 4)], one["interleaved"]
        setting = f"{label}, max batch {batch}, wait {wait:g} ms"
        found.append(
            (
                f"{setting}: 1 client median <= in-process median + 2 ms",
                f"{pair['service_ms']:.2f} vs {pair['in_process_ms']:.2f} + 2 ms (interleaved "
                f"rounds; in the server: model {pair['server_model_ms']:.2f}, all its stages "
                f"{pair['server_total_ms']:.2f})",
                pair["service_ms"] <= pair["in_process_ms"] + 2,
            )
        )
        best = max(four["in_process"]["batched_16_per_s"], four["in_process"]["batched_4_per_s"])
        found.append(
            (
                f"{setting}: 4 clients >= 0.8 x in-process batched (the better of 16 and 4)",
                f"{four['rps']:.1f} vs 0.8 x {best:.1f} req/s",
                four["rps"] >= 0.8 * best,
            )
        )
        found.append(
            (
                f"{setting}: 4 clients p99 <= 3 x median",
                f"{four['p99']:.1f} vs 3 x {four['p50']:.1f} ms",
                four["p99"] <= 3 * four["p50"],
            )
        )
    memory = results["memory"]
    growth = memory["end_rss_mb"] / memory["warm_rss_mb"] - 1
    found.append(
        (
            f"{memory['requests']} requests: RSS grows < 5% after warm-up",
            f"{memory['warm_rss_mb']:.0f} -> {memory['end_rss_mb']:.0f} MB ({growth:+.1%})",
            growth < 0.05,
        )
    )
    overload = results["overload"]
    statuses = set(overload["statuses"])
    found.append(
        (
            "64 clients, queue 8: only 200 and 503, accepted p99 bounded",
            f"statuses {overload['statuses']}, socket errors {overload['socket_errors']}, "
            f"accepted p99 {overload['server_p99']:.0f} ms (server) / deadline 2000 ms",
            statuses <= {"200", "503"}
            and overload["socket_errors"] == 0
            and overload["server_p99"] < 2000,
        )
    )
    return found


def write(results: dict, out: Path, command: str) -> None:
    """serve.md's table and targets and serve.json, keeping the swap run's part of each."""
    saved, report = out / "serve.json", out / "serve.md"
    if saved.exists():
        kept = json.loads(saved.read_text())
        results.update({k: kept[k] for k in ("swap", "memory_per_model", "swap_run") if k in kept})
    swaps = report.read_text().partition(SWAP_SECTION)[1:] if report.exists() else ("", "")
    saved.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    rows = []
    for c in results["cells"] + results["split"]:
        rows.append(
            [
                c["runtime"],
                c["workers"],
                c["threads"],
                c["max_batch"],
                f"{c['max_wait_ms']:g}",
                c["clients"],
                f"{c['rps']:.1f}",
                f"{c['p50']:.1f}",
                f"{c['p95']:.1f}",
                f"{c['p99']:.1f}",
                f"{c['server_p99']:.1f}" if c["server_p99"] is not None else "-",
                ", ".join(f"{k}: {v}" for k, v in sorted(c["statuses"].items())),
                c["socket_errors"] + c["timeouts"],
                f"{c['server_cpu']:.2f}",
                f"{c['wrk_cpu']:.3f}",
            ]
        )
    checks = [
        f"- {'met' if ok else '**missed**'}: {what}: {seen}" for what, seen, ok in targets(results)
    ]
    notes = [
        f"CPU: {benchkit.cpu_line(results['cpu'])}.",
        f"Flags: {' '.join(results['cpu']['flags'])}",
        "",
        f"{results['images']} Magnetic Tile test images (JPEG) posted as raw bodies over loopback by "
        "wrk (one thread, closed loop; its CPU is the last column, in cores). Latencies in ms as wrk "
        "saw them; 'server p99' is the accepted (200) requests' own time in the server's log. "
        "CPU columns: cores used on average (2 = the whole machine).",
        "",
        "stpm-serve's defaults: 1 worker x 2 threads, max batch 4, max wait 2 ms (a batch waits "
        "to fill only while the last one had company).",
        "",
        "Targets:",
        *checks,
    ]
    header = [
        "runtime",
        "workers",
        "threads",
        "max batch",
        "max wait ms",
        "clients",
        "req/s",
        "p50",
        "p95",
        "p99",
        "server p99",
        "statuses",
        "socket errors",
        "server CPU",
        "wrk CPU",
    ]
    benchkit.write_markdown_report(report, "stpm-serve under load", notes, header, rows, command)
    if swaps[0]:
        report.write_text(report.read_text().rstrip() + "\n\n" + "".join(swaps))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="the FP32 ONNX export")
    parser.add_argument("--int8", type=Path, required=True, help="the INT8 ONNX export")
    parser.add_argument("--images", type=Path, required=True, help="a folder of test images")
    parser.add_argument("--count", type=int, default=64, help="images to rotate through")
    parser.add_argument("--seconds", type=float, default=10, help="each load run's length")
    parser.add_argument("--memory-requests", type=int, default=10_000)
    parser.add_argument("--results", type=Path, default=benchkit.SCRIPTS / "results")
    parser.add_argument(
        "--part",
        choices=("load", "swap", "record"),
        default="load",
        help="load: the load runs (serve.md's table); swap: the swap-under-load run and the "
        "memory per model (serve.md's last section)",
    )
    parser.add_argument("--swap-seconds", type=float, default=40, help="the swap run's length")
    args = parser.parse_args()
    command = "python scripts/load_test.py " + " ".join(sys.argv[1:])
    if args.part == "record":
        with tempfile.TemporaryDirectory(dir=Path.home()) as work:
            results = run_record(args, Path(work))
        write_record(results, args.results, command)
        print((args.results / "record.md").read_text().split("## At the service")[1])
        return
    if args.part == "swap":
        with tempfile.TemporaryDirectory() as work:
            results = run_swaps(args, Path(work))
        write_swaps(results, args.results, command)
        print((args.results / "serve.md").read_text().split(SWAP_SECTION)[1])
        return
    with tempfile.TemporaryDirectory() as work:
        results = run(args, Path(work))
    results["command"] = command
    write(results, args.results, command)
    print((args.results / "serve.md").read_text())


if __name__ == "__main__":
    main()
