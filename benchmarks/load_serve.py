"""Bounded load test of ``freqar serve`` on 127.0.0.1: N requests from C concurrent clients.

Starts ``python -m freqar serve`` as a subprocess on a free local port, records one reference PNG per
distinct request setting (sequentially), then fires the load. Every request must end with a PNG whose
seed/settings headers and bytes match its reference, or with a 503 carrying Retry-After; anything else
counts as lost or mismatched and makes the script exit 1. Reports throughput, p50/p95 latency,
rejections and the server's resident memory (sampled from /proc) before, during and after.

    python benchmarks/load_serve.py                      # 50 requests, 8 clients, var-tiny, queue 8
    python benchmarks/load_serve.py --queue 2            # a queue smaller than the clients: 503s
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx


@dataclass
class Outcome:
    status: int
    seconds: float
    problem: str | None = None


@dataclass
class MemorySampler:
    """Samples a process's resident memory (VmRSS, MiB) every ``period`` seconds in a thread."""

    pid: int
    period: float = 0.05
    samples: list[float] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def rss(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.samples.append(self.rss())
            except OSError:
                return
            time.sleep(self.period)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings_for(i: int, distinct: int, model: str) -> dict:
    """Request ``i``'s body: ``distinct`` different settings, half of them SparseVAR-accelerated."""
    k = i % distinct
    body = {"model": model, "seed": 1000 + k, "label": k % 10}
    if k % 2:
        body.update(accel="sparsevar", knobs={"keep": 0.5})
    return body


def request(client: httpx.Client, body: dict) -> tuple[Outcome, str | None]:
    t0 = time.perf_counter()
    try:
        r = client.post("/api/generate", json=body, headers={"Accept": "image/png"})
    except httpx.HTTPError as e:
        return Outcome(-1, time.perf_counter() - t0, f"transport error {type(e).__name__}: {e}"), None
    dt = time.perf_counter() - t0
    if r.status_code == 503:
        ok = r.headers.get("retry-after", "").isdigit()
        return Outcome(503, dt, None if ok else "503 without Retry-After"), None
    if r.status_code != 200 or r.headers.get("content-type") != "image/png":
        return Outcome(r.status_code, dt, f"unexpected answer {r.status_code}: {r.text[:200]}"), None
    got = json.loads(r.headers["x-freqar-settings"])
    if r.headers.get("x-freqar-seed") != str(body["seed"]) or any(got[k] != v for k, v in body.items()):
        return Outcome(200, dt, f"settings mismatch: sent {body}, got {got}"), None
    return Outcome(200, dt), hashlib.sha256(r.content).hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--model", default="var-tiny", help="preset or saved model directory to serve")
    ap.add_argument("--queue", type=int, default=8, help="the server's --queue")
    ap.add_argument("--concurrency", type=int, default=1, help="the server's --concurrency")
    ap.add_argument("--threads", type=int, default=1, help="the server's --threads (torch threads)")
    ap.add_argument("--distinct", type=int, default=10, help="distinct request settings")
    ap.add_argument("--json", help="also write the report here")
    args = ap.parse_args()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "freqar", "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--models", args.model, "--queue", str(args.queue), "--concurrency", str(args.concurrency)]
    cmd += ["--threads", str(args.threads)]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    report: dict = {"command": " ".join(cmd[1:]), "requests": args.requests, "clients": args.clients}
    try:
        with httpx.Client(base_url=base, timeout=600) as c:
            end = time.monotonic() + 120
            while True:
                try:
                    models = c.get("/api/models").json()["models"]
                    break
                except httpx.HTTPError:
                    if server.poll() is not None or time.monotonic() > end:
                        print(server.stdout.read() if server.stdout else "", file=sys.stderr)
                        raise SystemExit("server did not start") from None
                    time.sleep(0.2)
            model = models[0]["name"]
            mem = MemorySampler(server.pid)
            refs = {}
            for k in range(args.distinct):  # sequential references; also warms the server up
                out, digest = request(c, settings_for(k, args.distinct, model))
                if out.problem:
                    raise SystemExit(f"reference request failed: {out.problem}")
                refs[k] = digest
            report["rss_mib_after_warmup"] = round(mem.rss(), 1)
            sampler = threading.Thread(target=mem.run, daemon=True)
            sampler.start()

        def client_loop(ids: list[int]) -> list[tuple[int, Outcome, str | None]]:
            with httpx.Client(base_url=base, timeout=600) as cl:
                return [(i, *request(cl, settings_for(i, args.distinct, model))) for i in ids]

        shards = [list(range(j, args.requests, args.clients)) for j in range(args.clients)]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = [r for shard in pool.map(client_loop, shards) for r in shard]
        wall = time.perf_counter() - t0
        mem.stop.set()
        sampler.join()
        with httpx.Client(base_url=base, timeout=30) as c:
            alive = c.get("/api/models").status_code == 200 and server.poll() is None
            report["rss_mib_after"] = round(mem.rss(), 1)
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()

    images = [(i, o, d) for i, o, d in results if o.status == 200 and o.problem is None]
    mismatched = [i for i, _, d in images if d != refs[i % args.distinct]]
    problems = [(i, o.problem) for i, o, _ in results if o.problem]
    rejected = [o for _, o, _ in results if o.status == 503 and o.problem is None]
    lost = args.requests - len(images) - len(rejected)
    lat = sorted(o.seconds for _, o, _ in images)

    def pct(q: float) -> float:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 1) if lat else float("nan")

    report.update(
        {
            "images": len(images),
            "rejected_503": len(rejected),
            "lost": lost,
            "mismatched": len(mismatched),
            "problems": problems[:10],
            "server_alive_after": alive,
            "wall_s": round(wall, 2),
            "throughput_img_per_s": round(len(images) / wall, 2),
            "latency_ms_p50": pct(0.50),
            "latency_ms_p95": pct(0.95),
            "latency_ms_mean": round(statistics.fmean(lat) * 1000, 1) if lat else None,
            "rss_mib_peak": round(max(mem.samples), 1) if mem.samples else None,
            "cpu_count": os.cpu_count(),
        }
    )
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    ok = lost == 0 and not mismatched and not problems and alive
    print("OK: every request ended with its own image or a 503" if ok else "FAILED", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
