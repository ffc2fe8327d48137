"""Engine benchmark on a 100k-campaign synthetic snapshot, beside nginx on the same machine.

Prints, from one run:
- GET /v1/decide requests per second (wrk, same threads, connections and duration) against
  nginx answering a fixed 200, and their ratio (goal >= 1.0);
- server CPU microseconds per request for both (utime + stime of the server processes);
- p50 and p99 latency at a fixed open-loop rate of half the engine's maximum (goal p99 < 1 ms),
  with the same request mix as the throughput rounds, and nginx's at the same rate beside it;
- the decision microbenchmark in ns per decision (goal <= 2000 ns).
Both servers get one worker (engine --shards 1, nginx worker_processes 1) pinned to CPU 0 and
wrk one thread pinned to CPU 1, so each side has the same share of this machine and the
scheduler moves nothing between rounds. The two are measured in alternating rounds and each
side's median round is reported.
The engine polls for 200 us after its last event before it sleeps (--idle-poll-us), as a shard
on its own core does in the appliance; only while busy, so at half load it sleeps as nginx does.
Its CPU figure leaves out the time it spent polling with nothing to do
(adpop_idle_poll_seconds_total); the figure with that time is printed beside it.
The same wrk against the engine's GET /healthz, which does no work, is measured in every round
too: the most this load generator gets from this machine, so a ratio near 1.0 that the ceiling
shares is the client's limit, not the servers'.
Each latency round also prints what the load generator lost itself: how late its own p99
request left (send_late) and its stalls, which delay requests whatever the server.
A second engine, writing every decision to its event spool on disk, is measured in the same
rounds and printed on its own line.
Both engines run as the appliance does with fleet budgets: a redis-server as the PoP cache
(--cache, where each shard keeps its spend), and an allowance from the origin for every
budgeted campaign of the snapshot, so pacing (the cap check, reservations, the controller's
tick) runs on every request with a budgeted candidate. The allowances are large: nothing
stops for lack of budget, the work is all done. A third engine serves the same campaigns with
their budgets removed and no cache: the same-run baseline for what pacing costs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from statistics import median_high
from typing import Any

from appliance import cache
from appliance.snapshot import bundle, synth
from appliance.snapshot.manifest import generate_key, load_signing_key
from appliance.snapshot.model import parse_documents
from appliance.snapshot.store import SnapshotStore
from appliance.up import free_port
from bench.common import wait_http

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "engine" / "build"
DECIDE_PATH = ("/v1/decide?id=bench&placement=home-top&country=US&device=desktop&os=windows"
               "&segments=seg-1,seg-2&keywords=kw7&time=1770000000")


def cpu_seconds(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


REQUESTS_SCRIPT = Path(__file__).resolve().parent / "decide_requests.lua"


def request_paths() -> list[str]:
    """256 different GET /v1/decide paths: every request id draws its own lottery and the
    requests spread over placements, countries, devices, segments and keywords, all at one
    time inside the synthetic flights, as live traffic is."""
    countries = ["US", "GB", "DE", "FR", "JP", "CA", "BR", "IN"]
    devices = ["desktop", "mobile", "tablet", "ctv"]
    oses = ["android", "ios", "windows", "macos"]
    placements = ["home-top", "home-side", "article-inline", "mobile-banner"]
    return [f"/v1/decide?id=bench-{i}&placement={placements[i % 4]}"
            f"&country={countries[i * 3 % 8]}&device={devices[i * 7 % 4]}&os={oses[i * 5 % 4]}"
            f"&segments=seg-{i * 13 % 500},seg-{i * 31 % 500},seg-{i * 71 % 500}"
            f"&keywords=kw{i * 17 % 3000}&time=1770000000" for i in range(1, 257)]


DECIDED = 'adpop_requests_total{route="decide_get"}'


SERVER_CPU, CLIENT_CPU = 0, 1
IDLE_POLL_US = 200


def on_client_cpu(argv: list[str]) -> list[str]:
    """The load generator on its own CPU (when the machine has a second one)."""
    return ["taskset", "-c", str(CLIENT_CPU), *argv] if (os.cpu_count() or 1) > 1 else argv


def wrk(url: str, paths: Path, seconds: int, connections: int) -> float:
    out = subprocess.run(on_client_cpu(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s",
                          str(REQUESTS_SCRIPT), url, "--", str(paths)]),
                         capture_output=True, text=True, check=True).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if not match:
        raise RuntimeError(f"wrk output not understood: {out}")
    if non2xx:
        raise RuntimeError(f"{url}: {non2xx.group(1)} non-2xx answers")
    return float(match.group(1))


def measure(url: str, paths: Path, pids: list[int], seconds: int, connections: int,
            idle: Callable[[], float] = lambda: 0.0) -> tuple[float, float, float]:
    """(requests per second, server CPU us per request without idle polling, and with it)."""
    before, idle_before = cpu_seconds(pids), idle()
    started = time.monotonic()
    rps = wrk(url, paths, seconds, connections)
    elapsed = time.monotonic() - started
    used = cpu_seconds(pids) - before
    polled = idle() - idle_before
    requests = rps * elapsed
    return rps, (used - polled) / requests * 1e6, used / requests * 1e6


def metric(metrics_url: str, name: str) -> float:
    """One sample of the engine's /metrics, served on its --metrics-listen address only (the
    first line for `name`)."""
    with urllib.request.urlopen(f"{metrics_url}/metrics") as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name):
                return float(line.rsplit(" ", 1)[1])
    raise RuntimeError(f"/metrics has no {name}")


def median_round(results: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    """The round with the median requests per second, with its CPU figures."""
    ordered = sorted(results)
    return ordered[len(ordered) // 2]


def client_loss(run: dict[str, float]) -> str:
    """What adpop-loadgen lost itself in one latency run: its requests' send delay and its
    stalls, which delay requests whatever the server."""
    return (f"{run['send_late_p99_us']:.0f} us, {run['client_stalls']:.0f} stalls "
            f"{run['client_stalled_ms']:.0f} ms")


def nginx_conf(prefix: Path, port: int) -> Path:
    conf = prefix / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
worker_cpu_affinity {1 << SERVER_CPU:b};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{ default_type text/plain; return 200 "ok\\n"; }}
    }}
}}
""")
    return conf


def admin(sock: Path, method: str, path: str, body: bytes | None = None) -> dict[str, Any]:
    """One call to an engine's admin socket."""
    import http.client
    import socket

    class Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(str(sock))

    conn = Conn("engine", timeout=30)
    try:
        conn.request(method, path, body=body)
        resp = conn.getresponse()
        answer: dict[str, Any] = json.loads(resp.read())
        if resp.status != 200:
            raise SystemExit(f"bench_engine: {path} refused: {answer}")
        return answer
    finally:
        conn.close()


def give_allowances(sock: Path, campaigns: list[str]) -> None:
    """An allowance for every budgeted campaign, large enough that none runs out, valid for
    the whole run."""
    deadline = time.monotonic() + 20
    while not sock.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench_engine: no admin socket at {sock}")
        time.sleep(0.05)
    now_ms = int(time.time() * 1000)
    doc = {"seq": 1, "issued_ms": now_ms, "interval_end_ms": now_ms + 3_600_000,
           "expires_ms": now_ms + 3_600_000, "day": now_ms // 86_400_000,
           "campaigns": [{"id": c, "cap_micros": 10**15, "origin_spent_micros": 0}
                         for c in campaigns]}
    admin(sock, "POST", "/allowances", json.dumps(doc).encode())


def pacing_figures(sock: Path) -> dict[str, Any]:
    status = admin(sock, "GET", "/status")
    campaigns = status["pacing"]["campaigns"]
    return {"campaigns": len(campaigns),
            "eligible": sum(c["eligible"] for c in campaigns),
            "cache": status["cache"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--campaigns", type=int, default=100_000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            raise SystemExit(f"bench_engine: {tool} missing; run `make setup`")
    with tempfile.TemporaryDirectory(prefix="adpop-bench-engine-") as tmp:
        work = Path(tmp)
        key_path, _ = generate_key(work / "keys")
        campaign_set = parse_documents(synth.generate(args.campaigns, seed=7))
        built = bundle.build(campaign_set, 1, [load_signing_key(key_path)], ttl=86400,
                             target_group="default")
        store = SnapshotStore(work / "state")
        store.install(1, built.manifest_bytes, built.payload)
        # The same campaigns with no budgets: the same-run baseline for what pacing costs.
        unbudgeted = dataclasses.replace(campaign_set, campaigns=tuple(
            dataclasses.replace(c, budget_daily_micros=0, budget_total_micros=0)
            for c in campaign_set.campaigns))
        built_bare = bundle.build(unbudgeted, 1, [load_signing_key(key_path)], ttl=86400,
                                  target_group="default")
        store_bare = SnapshotStore(work / "state-bare")
        store_bare.install(1, built_bare.manifest_bytes, built_bare.payload)
        print(f"snapshot: {built.stats.campaigns} campaigns, {len(built.payload) / 1e6:.1f} MB")

        micro = subprocess.run([str(BUILD / "adpop-engine-bench"), "--benchmark_format=json"],
                               env=dict(os.environ, ADPOP_BENCH_PAYLOAD=str(
                                   store.current_link / "payload.capnp")),
                               capture_output=True, text=True, check=True)
        results = {b["name"].split("/")[0]: b for b in json.loads(micro.stdout)["benchmarks"]}

        engine_port, spooled_port, nginx_port = free_port(), free_port(), free_port()
        bare_port = free_port()
        (work / "nginx").mkdir()
        # With a token key, as in production: every ad carries signed impression and click URLs.
        token_key = work / "token.key"
        token_key.write_bytes(os.urandom(32))
        spool = work / "spool"
        spool.mkdir()
        paths = work / "requests.txt"
        paths.write_text("\n".join(request_paths()) + "\n")
        ceiling_paths = work / "healthz.txt"
        ceiling_paths.write_text("/healthz\n")

        metrics_ports = {engine_port: free_port(), spooled_port: free_port(),
                         bare_port: free_port()}
        budgeted = [c.id for c in campaign_set.campaigns
                    if c.budget_daily_micros or c.budget_total_micros]
        kv_port = free_port()
        password_file = work / "secrets" / "cache.password"
        cache.write_secrets(password_file)
        (work / "cache").mkdir()
        redis = subprocess.Popen(cache.redis_argv(shutil.which("redis-server") or "redis-server",
                                                  f"127.0.0.1:{kv_port}", 256 << 20,
                                                  work / "cache", password_file.parent),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        with_budgets = ["--cache", f"127.0.0.1:{kv_port}", "--cache-password-file",
                        str(password_file), "--pacing-campaigns",
                        str(max(16384, 2 * len(budgeted)))]

        def start_engine(port: int, *extra: str, snapshot: Path = store.current_link
                         ) -> subprocess.Popen[bytes]:
            return subprocess.Popen([str(BUILD / "adpop-engine"), "--listen", f"127.0.0.1:{port}",
                                     "--metrics-listen", f"127.0.0.1:{metrics_ports[port]}",
                                     "--snapshot", str(snapshot), "--shards", "1",
                                     "--cpus", str(SERVER_CPU), "--idle-poll-us",
                                     str(IDLE_POLL_US), "--token-key", str(token_key),
                                     "--admin", str(work / f"admin-{port}.sock"), *extra],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        engine = start_engine(engine_port, *with_budgets)
        # The baseline for the budgets' cost, in the same run: the same campaigns without
        # budgets (the same choices, no pacing work), no cache.
        bare = start_engine(bare_port, snapshot=store_bare.current_link)
        # The same engine writing every decision to its event spool on this disk, as the
        # appliance runs it: measured beside the others in every round.
        spooled = start_engine(spooled_port, "--spool", str(spool), *with_budgets)
        nginx = subprocess.Popen(["nginx", "-p", str(work / "nginx"), "-c",
                                  str(nginx_conf(work / "nginx", nginx_port)), "-g",
                                  "daemon off;"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        try:
            engine_base = f"http://127.0.0.1:{engine_port}"
            spooled_base = f"http://127.0.0.1:{spooled_port}"
            metrics_of = {f"http://127.0.0.1:{port}": f"http://127.0.0.1:{mport}"
                          for port, mport in metrics_ports.items()}
            nginx_url = f"http://127.0.0.1:{nginx_port}{DECIDE_PATH}"
            bare_base = f"http://127.0.0.1:{bare_port}"
            for url in (engine_base + DECIDE_PATH, spooled_base + DECIDE_PATH,
                        bare_base + DECIDE_PATH, nginx_url):
                wait_http(url)
            for port in (engine_port, spooled_port):
                give_allowances(work / f"admin-{port}.sock", budgeted)
            nginx_pids = [nginx.pid] + [int(p) for p in subprocess.run(
                ["pgrep", "-P", str(nginx.pid)], capture_output=True, text=True,
                check=False).stdout.split()]
            with urllib.request.urlopen(engine_base + DECIDE_PATH) as resp:
                filled = json.loads(resp.read())["placements"][0]["ads"]
            decided_before = metric(metrics_of[engine_base], DECIDED)
            no_fill_before = metric(metrics_of[engine_base], "adpop_no_fill_total")

            def engine_round(base: str,
                             proc: subprocess.Popen[bytes]) -> tuple[float, float, float]:
                return measure(base + DECIDE_PATH, paths, [proc.pid], args.seconds,
                               args.connections,
                               lambda: metric(metrics_of[base], "adpop_idle_poll_seconds_total"))

            rounds = [(measure(nginx_url, paths, nginx_pids, args.seconds, args.connections),
                       engine_round(engine_base, engine), engine_round(spooled_base, spooled),
                       measure(engine_base + "/healthz", ceiling_paths, [engine.pid],
                               args.seconds, args.connections),
                       engine_round(bare_base, bare))
                      for _ in range(args.rounds)]
            scrape = metrics_of[engine_base]
            decided = metric(scrape, DECIDED) - decided_before
            fill = 1 - (metric(scrape, "adpop_no_fill_total") - no_fill_before) / decided
            spooled_records = sum(f.stat().st_size for f in spool.iterdir())
            n_rps, n_cpu, _ = median_round([r[0] for r in rounds])
            e_rps, e_cpu, e_cpu_polling = median_round([r[1] for r in rounds])
            s_rps, s_cpu, s_cpu_polling = median_round([r[2] for r in rounds])
            b_rps, b_cpu, b_cpu_polling = median_round([r[4] for r in rounds])
            half = max(1.0, e_rps / 2)

            open_seconds = max(1, args.seconds // 2)

            def open_loop(port: int) -> dict[str, float]:
                return dict(json.loads(subprocess.run(on_client_cpu(
                    [str(BUILD / "adpop-loadgen"), "127.0.0.1", str(port), f"@{paths}",
                     f"{half:.0f}", str(open_seconds), "16"]),
                    capture_output=True, text=True, check=True).stdout))

            # The tail here is set by stalls of this machine's vCPUs (milliseconds, several a
            # second when both are busy), so one run is luck: alternating rounds, each side's
            # median round reported, and nginx at the same rate and requests as the floor.
            latency_rounds = [(open_loop(engine_port), open_loop(nginx_port))
                              for _ in range(args.rounds)]
            paced = pacing_figures(work / f"admin-{spooled_port}.sock")
        finally:
            for proc in (engine, spooled, bare, nginx, redis):
                proc.terminate()
                proc.wait(timeout=10)

    decide_ns = results["BM_Decide"]["real_time"]
    replay_ns = results["BM_DecideReplay"]["real_time"]
    match_ns = results["BM_Match"]["real_time"]
    print(f"wrk: 1 thread on CPU {CLIENT_CPU}, {args.connections} connections, {args.rounds} "
          f"alternating rounds of {args.seconds} s; one worker per server on CPU {SERVER_CPU}; "
          f"engine --idle-poll-us {IDLE_POLL_US}; {REQUESTS_SCRIPT.name}: 256 different "
          f"requests in turn, {fill:.0%} filled, ads with signed tracking URLs: "
          f"{'imp' in filled[0] and 'click' in filled[0]}")
    print("rounds (requests/s, nginx / engine / engine with spool / engine /healthz / engine "
          "without budgets): " + ", ".join(f"{n[0]:.0f} / {e[0]:.0f} / {sp[0]:.0f} / {c[0]:.0f}"
                                           f" / {b[0]:.0f}" for n, e, sp, c, b in rounds))
    print(f"budgets: {len(budgeted)} budgeted campaigns paced with allowances; "
          f"{paced['eligible']:,} pacing checks in the spooled engine over the run; cache "
          f"{'linked' if paced['cache']['shards_up'] else 'NOT linked'}, "
          f"{paced['cache']['degraded_decisions']:,} decisions without it")
    print(f"{'':24} {'requests/s':>12} {'CPU us/request':>15}")
    print(f"{'nginx fixed 200':24} {n_rps:>12.0f} {n_cpu:>15.2f}")
    print(f"{'engine GET /v1/decide':24} {e_rps:>12.0f} {e_cpu:>15.2f}   "
          f"({e_cpu_polling:.2f} with idle polling)")
    print(f"{'engine with event spool':24} {s_rps:>12.0f} {s_cpu:>15.2f}   "
          f"({s_cpu_polling:.2f} with idle polling; {spooled_records / 1e6:.0f} MB of records "
          f"written to disk)")
    print(f"{'engine without budgets':24} {b_rps:>12.0f} {b_cpu:>15.2f}   "
          f"({b_cpu_polling:.2f} with idle polling; the same campaigns without budgets, no "
          f"cache: the budgets cost {e_cpu - b_cpu:+.2f} us/request)")
    # Each round measures the three back to back, so a round's own ratio shares its
    # conditions; the median of those is the steadier figure on a noisy machine.
    paired = median_high(e[0] / n[0] for n, e, _, _, _ in rounds)
    paired_spool = median_high(sp[0] / n[0] for n, _, sp, _, _ in rounds)
    ceiling = median_high(c[0] / n[0] for n, _, _, c, _ in rounds)
    print(f"ratio engine/nginx: {e_rps / n_rps:.3f} of the medians, {paired:.3f} median of the "
          f"rounds' own   (goal >= 1.0); with the event spool: {s_rps / n_rps:.3f}, "
          f"{paired_spool:.3f}")
    print(f"ceiling: engine GET /healthz (no work) / nginx {ceiling:.3f} median of the rounds' "
          f"own; engine /v1/decide / its /healthz "
          f"{median_high(e[0] / c[0] for _, e, _, c, _ in rounds):.3f} (without budgets "
          f"{median_high(b[0] / c[0] for _, _, _, c, b in rounds):.3f})")
    print(f"open loop at {half:.0f} req/s (half the engine's maximum), {args.rounds} alternating "
          f"rounds of {open_seconds} s, p99 engine / nginx: " + ", ".join(
              f"{e['p99_us']:.0f} / {n['p99_us']:.0f} us" for e, n in latency_rounds))
    print("  load generator's own loss per round, engine / nginx runs (p99 of its send delay, "
          "its stalls): " + ", ".join(f"{client_loss(e)} / {client_loss(n)}"
                                      for e, n in latency_rounds))
    for name, side in (("engine", 0), ("nginx fixed 200", 1)):
        runs = sorted((r[side] for r in latency_rounds), key=lambda run: run["p99_us"])
        run = runs[len(runs) // 2]
        errors = sum(r[side]["errors"] for r in latency_rounds)
        print(f"  {name:22} median round: p50 {run['p50_us']:.0f} us, p99 {run['p99_us']:.0f} us, "
              f"p99.9 {run['p999_us']:.0f} us; {errors:.0f} errors in all rounds"
              + ("   (goal p99 < 1000 us)" if side == 0 else ""))
    print(f"decision microbenchmark: {decide_ns:.0f} ns/decision at one time, as live traffic "
          f"(goal <= 2000 ns); {replay_ns:.0f} ns replaying at scattered times; "
          f"explain's whole k-index match {match_ns:.0f} ns "
          f"({results['BM_Match']['matched']:.0f} campaigns matched per request)")


if __name__ == "__main__":
    main()
