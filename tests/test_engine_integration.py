"""The real engine binary: decisions against the Python reference, hostile input, swaps, drain."""

from __future__ import annotations

import datetime as dt
import json
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.snapshot import synth
from appliance.snapshot.manifest import SigningKey
from appliance.snapshot.model import CampaignSet, Request, campaign_matches, parse_documents
from appliance.up import free_port
from tests.engine_harness import ENGINE, REPO, RunningEngine, install, running_engine

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def engine_set() -> CampaignSet:
    return parse_documents(synth.generate(3000, seed=31))


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, engine_set: CampaignSet,
           signing_key: SigningKey) -> Iterator[RunningEngine]:
    with running_engine(tmp_path_factory.mktemp("engine"), engine_set, signing_key,
                        extra=["--request-timeout", "800"]) as running:
        yield running


def hour_of_week(t: int) -> int:
    moment = dt.datetime.fromtimestamp(t, tz=dt.UTC)
    return moment.weekday() * 24 + moment.hour


class Reference:
    """Direct evaluation of eligibility from the authored campaigns (not the payload)."""

    def __init__(self, campaign_set: CampaignSet) -> None:
        self.campaigns = [c for c in campaign_set.campaigns if not c.paused]
        self.by_id = {c.id: c for c in self.campaigns}
        self.creatives = {c.id: c for c in campaign_set.creatives}
        self.placements = {p.id: p for p in campaign_set.placements}

    def eligible(self, request: dict[str, Any], placement: dict[str, Any]) -> set[str]:
        pl = self.placements.get(placement["id"])
        if pl is None:
            return set()
        allowed = {str(s) for s in pl.sizes}
        if placement.get("sizes"):
            allowed &= set(placement["sizes"])
        t = request["time"]
        values = {
            "country": (request["geo"]["country"],), "region": (request["geo"]["region"],),
            "device": (request["device"]["type"],), "os": (request["device"]["os"],),
            "domain": (request["site"]["domain"],), "keyword": tuple(request["keywords"]),
            "segment": tuple(request["user"]["segments"]), "placement": (placement["id"],),
            "hour": (str(hour_of_week(t)),),
        }
        values = {k: tuple(x for x in v if x) for k, v in values.items()}
        out = set()
        for camp in self.campaigns:
            if not camp.start <= t < camp.end:
                continue
            if not any(str(self.creatives[ad.creative].size) in allowed for ad in camp.ads):
                continue
            if campaign_matches(camp, Request(values)):
                out.add(camp.id)
        return out


def random_request(rng: random.Random, i: int, placements: int = 1) -> dict[str, Any]:
    seen_placements = [p[0] for p in synth.PLACEMENTS] + ["no-such-placement"]
    chosen = rng.sample(seen_placements, placements)
    return {
        "id": f"req-{i}",
        "placements": [
            {"id": pid, "count": rng.randint(1, 3),
             **({"sizes": rng.sample(list(synth.SIZES), 3)} if rng.random() < 0.3 else {})}
            for pid in chosen],
        "user": {"key": f"u{rng.randrange(1000)}",
                 "segments": [f"seg-{rng.randrange(500)}" for _ in range(rng.randint(0, 8))]},
        "device": {"type": rng.choice(synth.DEVICES), "os": rng.choice(synth.OSES)},
        "geo": {"country": rng.choice(synth.COUNTRIES[:12]),
                "region": f"{rng.choice(synth.COUNTRIES[:3])}-{rng.randint(1, 20):02d}"},
        "site": {"domain": f"site{rng.randrange(2000)}.example"},
        "keywords": [f"kw{rng.randrange(3000)}" for _ in range(rng.randint(0, 6))],
        "time": synth.YEAR_START + rng.randrange(0, 300 * 86400),
        "explain": True,
    }


def test_explain_equals_reference_for_1000_requests(engine: RunningEngine,
                                                   engine_set: CampaignSet) -> None:
    ref = Reference(engine_set)
    rng = random.Random(77)
    filled = 0
    eligible_total = 0
    for i in range(1000):
        request = random_request(rng, i, placements=1 if i % 4 else 3)
        code, answer = engine.admin_call("POST", "/decide", request)
        assert code == 200, answer
        used_ads: set[str] = set()
        taken_labels: dict[str, str] = {}
        for placement, result in zip(request["placements"], answer["placements"], strict=True):
            want = ref.eligible(request, placement)
            got = set(result["explain"]["eligible"])
            assert got == want, (request, sorted(got ^ want)[:5])
            eligible_total += len(want)
            assert result["explain"]["hour_of_week"] == hour_of_week(request["time"])
            priorities = [ref.by_id[a["campaign"]].priority for a in result["ads"]]
            for ad in result["ads"]:
                assert ad["campaign"] in want, "chosen ad is not eligible"
                assert ad["ad"] not in used_ads, "duplicate ad in one answer"
                used_ads.add(ad["ad"])
                for label in ref.by_id[ad["campaign"]].exclusion_labels:
                    owner = taken_labels.setdefault(label, ad["campaign"])
                    assert owner == ad["campaign"], f"competitive exclusion broken on {label}"
            assert priorities == sorted(priorities)
            if result["ads"] and len(request["placements"]) == 1:
                filled += 1
                # Strict priority: the first ad comes from the best tier present. Budgeted
                # campaigns have no allowance here: pacing holds them back, and says so.
                paced = {loss["campaign"] for loss in result["explain"]["lost"]
                         if loss["reason"] == "pacing"}
                assert priorities[0] == min(ref.by_id[c].priority for c in want - paced)
            if not want:
                assert result["ads"] == []
    assert filled > 300, "too few requests found an ad to make the comparison meaningful"
    assert eligible_total > 5000


def test_decisions_replay_exactly(engine: RunningEngine) -> None:
    rng = random.Random(5)
    for i in range(50):
        request = random_request(rng, i)
        request["explain"] = False
        first = engine.post("/v1/decide", request)
        again = engine.post("/v1/decide", request)
        assert first == again


def test_get_and_post_agree(engine: RunningEngine) -> None:
    request = {"id": "same", "placements": [{"id": "home-side", "sizes": ["300x250", "300x600"],
                                             "count": 2}],
               "geo": {"country": "US"}, "device": {"type": "desktop"}, "time": 1770000000}
    code, posted = engine.post("/v1/decide", request)
    assert code == 200
    status, body = engine.get("/v1/decide?id=same&placement=home-side&sizes=300x250,300x600"
                              "&count=2&country=US&device=desktop&time=1770000000")
    assert status == 200
    assert json.loads(body) == posted
    assert posted["placements"][0]["ads"], "US desktop should find something"


def test_explain_is_admin_only(engine: RunningEngine) -> None:
    code, body = engine.post("/v1/decide", {"id": "x", "placements": [{"id": "home-top"}],
                                            "explain": True})
    assert code == 403
    assert body == {"error": "explain_forbidden"}


PROMTOOL = REPO / ".tools" / "promtool"


def test_healthz_and_metrics(engine: RunningEngine) -> None:
    """/metrics only on the metrics address, never on the serving port; the whole exposition
    parses with Prometheus's own parser and passes `promtool check metrics`."""
    from prometheus_client.parser import text_string_to_metric_families

    assert engine.get("/healthz") == (200, b"ok\n")
    assert engine.get("/healthz", engine.metrics_port) == (200, b"ok\n")
    assert engine.get("/metrics")[0] == 404, "internals stay off the public port"
    assert engine.get("/v1/decide?placements=home-top", engine.metrics_port)[0] == 404
    for n in range(5):
        assert engine.post("/v1/decide", {"id": f"m{n}", "placements": [{"id": "home-top"}]}
                           )[0] == 200
    code, body = engine.get("/metrics", engine.metrics_port)
    assert code == 200
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert families["adpop_snapshot_version"].samples[0].value == 1
    # A counter's family is named without _total; its samples keep it.
    decide = [s for s in families["adpop_requests"].samples
              if s.labels == {"route": "decide_post"}]
    assert decide and decide[0].value >= 5
    latency = {s.name: s for s in families["adpop_request_duration_seconds"].samples
               if not s.labels}
    assert latency["adpop_request_duration_seconds_count"].value >= 5
    assert 0 < latency["adpop_request_duration_seconds_sum"].value < 5
    checked = subprocess.run([str(PROMTOOL), "check", "metrics"], input=body, capture_output=True,
                             timeout=30, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_listens_on_ipv6_and_a_list_of_addresses(tmp_path: Path, engine_set: CampaignSet,
                                                 signing_key: SigningKey) -> None:
    """`[::]:PORT` is dual stack; a list serves on every address it names (beside the
    harness's own --listen: every --listen adds)."""

    def ask(family: socket.AddressFamily, host: str, port: int) -> bytes:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect((host, port))
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            return sock.recv(256)

    dual, v6, v4 = free_port(), free_port(), free_port()
    flags = ["--listen", f"[::]:{dual}", "--listen", f"[::1]:{v6},127.0.0.1:{v4}"]
    with running_engine(tmp_path, engine_set, signing_key, extra=flags, shards=2) as eng:
        for family, host, port in ((socket.AF_INET6, "::1", dual), (socket.AF_INET, "127.0.0.1",
                                   dual), (socket.AF_INET6, "::1", v6),
                                   (socket.AF_INET, "127.0.0.1", v4)):
            assert ask(family, host, port).startswith(b"HTTP/1.1 200"), (host, port)
    assert f"serving 127.0.0.1:{eng.port}, [::]:{dual}, [::1]:{v6}, 127.0.0.1:{v4}" in \
        eng.log.read_text()


# Bodies the JSON reader must refuse (400 bad_json), with the reason it gives.
JSON_REFUSED = [
    (b'{"id":"x","placements":[{"id":"home-top","count":01}]}', "leading zero"),
    (b'{"id":"x","placements":[{"id":"home-top"}],"time":-017}', "leading zero"),
    (b'{"id":"x","placements":[{"id":"home-top"}],"time":1' + b"0" * 63 + b"}",
     "number too long"),
    (b'{"id":"x","placements":[{"id":"home-top"}],"time":1.' + b"0" * 62 + b"}",
     "number too long"),
    (b'{"id":"\xff","placements":[{"id":"home-top"}]}', "invalid UTF-8"),
    (b'{"id":"\xc3","placements":[{"id":"home-top"}]}', "invalid UTF-8"),  # cut short
    (b'{"id":"\xc0\xaf","placements":[{"id":"home-top"}]}', "invalid UTF-8"),  # overlong
    (b'{"id":"\xed\xa0\x80","placements":[{"id":"home-top"}]}', "invalid UTF-8"),  # surrogate
    (b'{"id":"\xf4\x90\x80\x80","placements":[{"id":"home-top"}]}', "invalid UTF-8"),
    (b'{"id":"x","placements":[{"id":"home-top"}],"keywords":["\x80"]}', "invalid UTF-8"),
]


def test_json_reader_refuses_leading_zeros_long_numbers_and_bad_utf8(
        engine: RunningEngine) -> None:
    """RFC 8259 numbers and RFC 3629 UTF-8, each refusal a 400 naming its reason; the
    edge cases that are valid still serve."""
    before = engine.status()["errors"]["bad_json"]
    for body, reason in JSON_REFUSED:
        answer = exchange(engine.port, b"POST /v1/decide HTTP/1.1\r\nContent-Length: %d\r\n\r\n"
                          % len(body) + body)
        assert answer.startswith(b"HTTP/1.1 400"), (body[:60], answer[:60])
        assert reason.encode() in answer, (body[:60], answer)
    assert engine.status()["errors"]["bad_json"] - before == len(JSON_REFUSED)
    for good in ({"id": "caf\u00e9 \U0001f600", "placements": [{"id": "home-top"}]},
                 {"id": "z", "placements": [{"id": "home-top", "count": 1}], "time": 0},
                 {"id": "z", "placements": [{"id": "home-top"}], "time": 1770000000.0,
                  "keywords": ["\u00fcber", "-0"]}):
        raw = json.dumps(good, ensure_ascii=False).encode()
        answer = exchange(engine.port, b"POST /v1/decide HTTP/1.1\r\nContent-Length: %d\r\n\r\n"
                          % len(raw) + raw)
        assert answer.startswith(b"HTTP/1.1 200"), (good, answer[:200])


def hostile_corpus(rng: random.Random) -> list[bytes]:
    valid = json.dumps({"id": "r", "placements": [{"id": "home-top", "count": 1}],
                        "geo": {"country": "US"}}).encode()

    def post(body: bytes, extra: bytes = b"") -> bytes:
        return (b"POST /v1/decide HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n"
                % (len(body), extra)) + body

    corpus: list[bytes] = []
    for method in (b"FOO", b"DELETE", b"PUT", b"get", b"G\x01T", b"", b"POST POST", b"\xff\xfe"):
        corpus.append(method + b" /v1/decide HTTP/1.1\r\nHost: x\r\n\r\n")
    for version in (b"HTTP/2.0", b"HTTP/1.x", b"HTTX/1.1", b"", b"HTTP/1.1 extra"):
        corpus.append(b"GET /healthz " + version + b"\r\n\r\n")
    for target in (b"v1/decide", b"/v1/\x00decide", b"*", b"/" + b"a" * 9000):
        corpus.append(b"GET " + target + b" HTTP/1.1\r\n\r\n")
    corpus.append(b"GET / HTTP/1.1\r\nX: " + b"y" * 20000 + b"\r\n\r\n")
    corpus.append(b"GET / HTTP/1.1\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(200)) + b"\r\n")
    corpus.append(b"GET / HTTP/1.1\r\n folded: header\r\n\r\n")
    corpus.append(b"GET / HTTP/1.1\r\nno-colon-header\r\n\r\n")
    for length in (b"-1", b"abc", b"99999999999999999999", b"1 2", b""):
        corpus.append(b"POST /v1/decide HTTP/1.1\r\nContent-Length: " + length + b"\r\n\r\n{}")
    corpus.append(b"POST /v1/decide HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}")
    corpus.append(b"POST /v1/decide HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"2\r\n{}\r\n0\r\n\r\n")
    corpus.append(b"POST /v1/decide HTTP/1.1\r\nContent-Length: 10000000\r\n\r\n")
    # Truncated bodies: the connection ends before the body does.
    for cut in (1, len(valid) // 2, len(valid) - 1):
        corpus.append(post(valid)[: len(post(valid)) - cut])
    # Every prefix of a valid body, declared as complete: invalid JSON of every kind.
    for cut in range(len(valid)):
        corpus.append(post(valid[:cut]))
    # Random byte flips of a valid body.
    for _ in range(150):
        body = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            body[rng.randrange(len(body))] = rng.randrange(256)
        corpus.append(post(bytes(body)))
    bad_bodies = [
        b"[" * 5000 + b"]" * 5000, b'{"id":' * 2000, b"nul", b"{}", b"[]", b'"str"', b"1e999",
        b'{"id":"x","placements":[]}', b'{"id":"x","placements":"home-top"}',
        b'{"id":"x","placements":[{"id":"p","count":0}]}',
        b'{"id":"x","placements":[{"id":"p","count":21}]}',
        b'{"id":"x","placements":[{"id":"p","count":1.5}]}',
        b'{"id":"x","placements":[{"id":"p","sizes":["300by250"]}]}',
        b'{"id":"x","placements":[{"id":"p","sizes":["0x0"]}]}',
        b'{"id":"x","placements":[' + b",".join([b'{"id":"p"}'] * 30) + b"]}",
        b'{"id":"\\ud800","placements":[{"id":"p"}]}', b'{"id":"\\u12","placements":[]}',
        b'{"id":"x","placements":[{"id":"p"}],"keywords":' + json.dumps(
            ["k"] * 100).encode() + b"}",
        b'{"id":"x","placements":[{"id":"p"}],"geo":"US"}',
        b'{"id":"x","placements":[{"id":"p"}],"time":-5}',
        b'{"id":"' + b"x" * 60000 + b'","placements":[{"id":"p"}]}',
        b'{"id":"x","placements":[{"id":"p"}]} trailing', b"\x00" * 64, bytes(range(256)),
        *(body for body, _ in JSON_REFUSED),
    ]
    corpus.extend(post(b) for b in bad_bodies)
    for query in (b"id=x&placement=home-top&sizes=axb", b"id=x&placement=home-top&count=abc",
                  b"id=%zz&placement=home-top", b"placement=home-top", b"id=x",
                  b"id=x&placement=home-top&time=-1", b"id=x&" + b"placement=p&" * 40,
                  b"id=x&placement=home-top&count=99", b"%", b"&&&="):
        corpus.append(b"GET /v1/decide?" + query + b" HTTP/1.1\r\n\r\n")
    for _ in range(200):
        corpus.append(bytes(rng.randrange(256) for _ in range(rng.randint(1, 300))))
    return corpus


def exchange(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the engine may hang up mid-send on garbage: that is an answer too
        chunks = []
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
        except (TimeoutError, ConnectionResetError):
            pass
        return b"".join(chunks)


ALLOWED = {200, 400, 403, 404, 405, 408, 413, 431, 501, 503, 505}


def test_query_values_must_be_utf8(engine: RunningEngine) -> None:
    """A GET decision's values reach the spool and the origin's store, which take UTF-8
    only: other bytes are a 400 (recorded nowhere), well-formed ones serve."""
    for query in ("id=%FF&placement=home-top", "id=ok&placement=%C0%AF",
                  "id=%ED%A0%80&placement=home-top", "id=ok&placement=home-top&keyword=%F5"):
        status, body = engine.get(f"/v1/decide?{query}")
        assert status == 400 and b"invalid UTF-8 in the query" in body, (query, body)
    status, _ = engine.get("/v1/decide?id=caf%C3%A9&placement=home-top")
    assert status == 200


def test_hostile_corpus_never_crashes_or_hangs(engine: RunningEngine) -> None:
    corpus = hostile_corpus(random.Random(99))
    assert len(corpus) >= 500
    before = engine.status()["errors"]
    for i, payload in enumerate(corpus):
        started = time.monotonic()
        answer = exchange(engine.port, payload)
        assert time.monotonic() - started < 5, f"item {i} hung"
        assert engine.alive(), f"engine died on item {i}: {payload[:80]!r}"
        if answer:
            assert answer.startswith(b"HTTP/1.1 "), (i, answer[:80])
            for line in answer.split(b"\r\n"):
                if line.startswith(b"HTTP/1.1 "):
                    assert int(line.split()[1]) in ALLOWED, (i, line)
    after = engine.status()["errors"]
    for reason in ("bad_request_line", "headers_too_large", "body_too_large", "bad_json",
                   "bad_content_length", "transfer_encoding", "method_not_allowed"):
        assert after[reason] > before[reason], f"{reason} was never counted"
    assert engine.get("/healthz") == (200, b"ok\n")


def test_slowloris_gets_408_and_others_are_served(engine: RunningEngine) -> None:
    socks = []
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", engine.port), timeout=5)
        s.sendall(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
        socks.append(s)
    # Meanwhile a normal client is served at once.
    assert engine.get("/healthz")[0] == 200
    time.sleep(0.3)
    for s in socks:
        s.sendall(b"a")
    answers = []
    for s in socks:
        data = b""
        try:
            while chunk := s.recv(4096):
                data += chunk
        except TimeoutError:
            pass
        answers.append(data)
        s.close()
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), answers[:2]
    assert engine.status()["errors"]["timeout"] >= 20


def test_pipelining_and_split_writes(engine: RunningEngine) -> None:
    body = json.dumps({"id": "p", "placements": [{"id": "home-top"}]}).encode()
    one = (b"POST /v1/decide HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
    three = one + b"GET /healthz HTTP/1.1\r\n\r\n" + one
    with socket.create_connection(("127.0.0.1", engine.port), timeout=5) as sock:
        for i in range(0, len(three), 7):  # split at awkward places
            sock.sendall(three[i:i + 7])
            time.sleep(0.001)
        data = b""
        while data.count(b"HTTP/1.1 200") < 3:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 3


ENGINE_TSAN = REPO / "engine" / "build-tsan" / "adpop-engine"


@pytest.mark.parametrize("build", ["optimised", "tsan"])
def test_swaps_under_load_fail_no_request(tmp_path: Path, engine_set: CampaignSet,
                                          signing_key: SigningKey, rng: random.Random,
                                          build: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """50 snapshot swaps under load from three clients, on two shards; the ThreadSanitizer
    build checks the swap and reclamation protocol (and the shards' shared dedup table)
    for data races while it runs."""
    binary = ENGINE_TSAN if build == "tsan" else ENGINE
    monkeypatch.setenv("TSAN_OPTIONS", "halt_on_error=0:exitcode=66")
    with running_engine(tmp_path, engine_set, signing_key, binary=binary) as eng:
        stop = threading.Event()
        results: list[tuple[int, int]] = []  # (ok, failed) per loader

        def load(seed: float) -> None:
            import http.client
            ok = failed = 0
            conn = http.client.HTTPConnection("127.0.0.1", eng.port, timeout=10)
            local = random.Random(seed)  # one source per loader, from the test's seeded one
            deadline = time.monotonic() + 120  # bounded even if the swaps stall
            while not stop.is_set() and time.monotonic() < deadline:
                request = random_request(local, local.randrange(10**6))
                request["explain"] = False
                try:
                    conn.request("POST", "/v1/decide", body=json.dumps(request))
                    resp = conn.getresponse()
                    resp.read()
                    if resp.status == 200:
                        ok += 1
                    else:
                        failed += 1
                except (OSError, http.client.HTTPException):
                    failed += 1
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", eng.port, timeout=10)
            conn.close()
            results.append((ok, failed))

        loaders = [threading.Thread(target=load, args=(rng.random(),)) for _ in range(3)]
        for t in loaders:
            t.start()
        for version in range(2, 52):
            install(eng.store, engine_set, version, signing_key)
            code, status = eng.admin_call("POST", "/load")
            assert code == 200, status
            assert status["version"] == version
        stop.set()
        for t in loaders:
            t.join()
        assert len(results) == 3
        assert sum(r[1] for r in results) == 0, results
        assert sum(r[0] for r in results) > 100
        deadline = time.monotonic() + 5
        while eng.status()["loads"]["retired_pending"] and time.monotonic() < deadline:
            time.sleep(0.1)
        status = eng.status()
        assert status["loads"]["ok"] == 51
        assert status["loads"]["retired_pending"] == 0, "old snapshots were never released"
        eng.process.terminate()
        assert eng.process.wait(60) == 0, eng.log.read_text()[-4000:]
    assert "ThreadSanitizer" not in eng.log.read_text(), eng.log.read_text()[-6000:]


def test_sighup_reloads_and_bad_snapshot_keeps_serving(tmp_path: Path, engine_set: CampaignSet,
                                                       signing_key: SigningKey) -> None:
    with running_engine(tmp_path, engine_set, signing_key) as eng:
        install(eng.store, engine_set, 2, signing_key)
        eng.process.send_signal(1)  # SIGHUP
        deadline = time.monotonic() + 5
        while eng.status()["version"] != 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert eng.status()["version"] == 2
        # A corrupt payload behind `current` is refused; version 2 keeps serving.
        eng.store.add(3, b"{}", b"\x00" * 64)
        eng.store.activate(3)
        code, body = eng.admin_call("POST", "/load")
        assert code == 409
        assert body["error"] == "load_refused"
        assert eng.status()["version"] == 2
        assert eng.get("/healthz")[0] == 200


def test_drain_and_undrain(tmp_path: Path, engine_set: CampaignSet,
                           signing_key: SigningKey) -> None:
    with running_engine(tmp_path, engine_set, signing_key) as eng:
        code, status = eng.admin_call("POST", "/drain")
        assert code == 200 and status["draining"] is True
        assert eng.get("/healthz") == (503, b"draining\n")
        code, body = eng.post("/v1/decide", {"id": "d", "placements": [{"id": "home-top"}]})
        assert code == 503 and body == {"error": "draining"}
        code, status = eng.admin_call("POST", "/undrain")
        assert status["draining"] is False
        assert eng.get("/healthz")[0] == 200
        assert eng.post("/v1/decide", {"id": "d", "placements": [{"id": "home-top"}]})[0] == 200


@pytest.mark.parametrize("args", [
    ["--shards", "zero", "--snapshot", "/x"], ["--bogus", "1"], [], ["--listen", "nope"],
    ["--snapshot", "/x", "--listen", "::1:8080"], ["--snapshot", "/x", "--listen", "[::1:8080"],
    ["--snapshot", "/x", "--listen", "127.0.0.1:8080,"],
    ["--snapshot", "/x", "--metrics-listen", "[1.2.3.4]:9"],
    ["--snapshot", "/x", "--cpus", "0,1", "--shards", "3"],
    ["--snapshot", "/x", "--idle-poll-us", "-1"],
])
def test_bad_flags_exit_2_with_one_line(args: list[str]) -> None:
    result = subprocess.run([str(ENGINE), *args], capture_output=True, text=True, check=False,
                            timeout=10)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("adpop-engine: ")


def test_idle_polling_only_while_the_shard_is_busy(tmp_path: Path, engine_set: CampaignSet,
                                                   signing_key: SigningKey) -> None:
    def polled(eng: RunningEngine) -> float:
        return metric_value(eng, "adpop_idle_poll_seconds_total")

    started = time.monotonic()
    with running_engine(tmp_path, engine_set, signing_key, ["--idle-poll-us", "2000"],
                        shards=1) as eng:
        # Idle polling is time spent by this process: it can never exceed the process's life
        # (the first batch once counted the whole uptime of the machine).
        assert polled(eng) <= time.monotonic() - started
        # Light traffic: the shard waits through nearly all of every 100 ms, so it sleeps
        # after each request instead of polling 2 ms (0.2 s for these 100 requests).
        time.sleep(0.3)
        light = polled(eng)
        for i in range(100):
            code, body = eng.post("/v1/decide", {"id": f"p{i}", "placements": [{"id": "home-top"}]})
            assert code == 200 and body["id"] == f"p{i}"
            time.sleep(0.01)
        assert polled(eng) - light < 0.05
        assert metric_value(eng, "adpop_shards_polling") == 0
        # Busy: pipelined requests sent for 0.6 s keep the shard working without a wait, so
        # it polls, and after the last of them it polls its 2 ms before it sleeps.
        busy = polled(eng)
        batch = (b"GET /v1/decide?id=busy&placement=home-top&country=US&device=desktop"
                 b"&time=1770000000 HTTP/1.1\r\n\r\n") * 10_000
        sent = [0]

        def send_for(sock: socket.socket, seconds: float) -> None:
            until = time.monotonic() + seconds
            while time.monotonic() < until:
                sock.sendall(batch)
                sent[0] += 10_000

        with socket.create_connection(("127.0.0.1", eng.port), timeout=30) as sock:
            sender = threading.Thread(target=send_for, args=(sock, 0.6))
            sender.start()
            answered = 0
            tail = b""
            while sender.is_alive() or answered < sent[0]:
                chunk = sock.recv(1 << 20)
                assert chunk, f"connection closed after {answered} answers"
                answered += (tail + chunk).count(b"HTTP/1.1 200 ")
                tail = chunk[-12:]  # shorter than the mark, so no answer is counted twice
            sender.join()
            assert answered == sent[0]
        time.sleep(0.3)
        assert polled(eng) - busy > 0
        assert metric_value(eng, "adpop_shards_polling") == 0  # idle again, it sleeps at once


def test_missing_snapshot_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run([str(ENGINE), "--snapshot", str(tmp_path / "none"), "--listen",
                             "127.0.0.1:0"], capture_output=True, text=True, check=False,
                            timeout=10)
    assert result.returncode == 1
    assert "snapshot folder" in result.stderr


def test_pipelined_flood_from_a_slow_reader_is_answered_whole(engine: RunningEngine) -> None:
    """20,000 pipelined requests sent at once by a client that reads late: the engine stops
    reading while its answers back up, then reads on (edge-triggered epoll will not report
    the waiting bytes again), and answers every one."""
    count = 20_000
    request = (b"GET /v1/decide?id=flood&placement=home-top&country=US&device=desktop"
               b"&time=1770000000 HTTP/1.1\r\n\r\n")
    with socket.create_connection(("127.0.0.1", engine.port), timeout=10) as sock:
        sock.sendall(request * count)
        time.sleep(0.5)
        received = 0
        tail = b""
        deadline = time.monotonic() + 60
        while received < count and time.monotonic() < deadline:
            chunk = sock.recv(1 << 20)
            assert chunk, f"connection closed after {received} answers"
            data = tail + chunk
            received += data.count(b"HTTP/1.1 200 OK")
            tail = data[-16:]  # a status line split across reads is counted once
            received -= tail.count(b"HTTP/1.1 200 OK")
        received += tail.count(b"HTTP/1.1 200 OK")
    assert received == count


def test_prices_above_the_payloads_own_stats_are_refused(tmp_path: Path,
                                                         engine_set: CampaignSet,
                                                         signing_key: SigningKey) -> None:
    """PoPs bound prices and budgets by the stats; the engine holds the campaigns to them."""
    from appliance.snapshot.compiler import compile_payload, schema

    payload, _ = compile_payload(engine_set, 4, 1_770_000_000)
    with schema().Payload.from_bytes(payload) as reader:
        builder = reader.as_builder(num_first_segment_words=len(payload) // 8 + 16)
    builder.stats.maxEcpmMicros = 0  # stats that understate the campaigns' prices
    lying = builder.to_bytes()
    assert int.from_bytes(lying[:4], "little") == 0  # one segment, so only the stats differ
    with running_engine(tmp_path, engine_set, signing_key) as eng:
        eng.store.add(4, b"{}", lying)
        eng.store.activate(4)
        code, body = eng.admin_call("POST", "/load")
        assert code == 409, body
        assert "above the payload's stats" in body["message"]
        assert eng.status()["version"] == 1


LOADGEN = ENGINE.parent / "adpop-loadgen"


def test_loadgen_sends_every_path_of_its_request_file(engine: RunningEngine,
                                                      tmp_path: Path) -> None:
    # The bench's latency run reads the throughput rounds' request mix from a file: a load
    # generator that sent one path, or miscounted, would measure different work.
    before = metric_value(engine, 'adpop_requests_total{route="decide_get"}')
    healthz_before = metric_value(engine, 'adpop_requests_total{route="healthz"}')
    paths = tmp_path / "requests.txt"
    paths.write_text("/v1/decide?id=lg&placement=home-top&country=US\n\n/healthz\n")
    result = subprocess.run([str(LOADGEN), "127.0.0.1", str(engine.port), f"@{paths}", "200",
                             "1", "2"], capture_output=True, text=True, timeout=30, check=True)
    report = json.loads(result.stdout)
    assert (report["sent"], report["ok"], report["errors"]) == (200, 200, 0)
    assert metric_value(engine, 'adpop_requests_total{route="decide_get"}') - before == 100
    assert metric_value(engine, 'adpop_requests_total{route="healthz"}') - healthz_before == 100


def test_loadgen_reports_its_own_stalls(engine: RunningEngine, tmp_path: Path) -> None:
    # The latency run's tail can come from the client itself: a load generator stopped for
    # half a second must say so (the requests scheduled meanwhile leave late), or a stalled
    # client would pass for a slow server.
    paths = tmp_path / "requests.txt"
    paths.write_text("/healthz\n")
    proc = subprocess.Popen([str(LOADGEN), "127.0.0.1", str(engine.port), f"@{paths}", "1000",
                             "2", "4"], stdout=subprocess.PIPE, text=True)
    time.sleep(0.6)
    proc.send_signal(signal.SIGSTOP)
    time.sleep(0.5)
    proc.send_signal(signal.SIGCONT)
    out, _ = proc.communicate(timeout=30)
    report = json.loads(out)
    assert (report["sent"], report["errors"]) == (2000, 0)
    assert report["client_stalls"] >= 1
    assert report["client_stalled_ms"] >= 400
    assert report["send_late_p99_us"] >= 100_000


def test_loadgen_refuses_an_empty_request_file(tmp_path: Path) -> None:
    paths = tmp_path / "requests.txt"
    paths.write_text("\n")
    result = subprocess.run([str(LOADGEN), "127.0.0.1", "9", f"@{paths}", "10", "1", "1"],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert result.stderr == f"adpop-loadgen: {paths} holds no request paths\n"


def metric_value(engine: RunningEngine, name: str) -> float:
    _, body = engine.get("/metrics", engine.metrics_port)
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_engine_makes_its_missing_key_and_spool_and_keeps_an_existing_key(
        tmp_path: Path, engine_set: CampaignSet, signing_key: SigningKey) -> None:
    # systemd execs the engine straight from the generated ExecStart: no wrapper makes them.
    # (The later flags override the harness's own key and spool.)
    made, spool = tmp_path / "made.key", tmp_path / "made-spool"
    flags = ["--token-key", str(made), "--spool", str(spool)]
    with running_engine(tmp_path, engine_set, signing_key, extra=flags):
        assert len(made.read_bytes()) == 32 and made.stat().st_mode & 0o777 == 0o600
        assert spool.is_dir()
    key = made.read_bytes()
    with running_engine(tmp_path, engine_set, signing_key, extra=flags):
        pass
    assert made.read_bytes() == key  # tokens signed before a restart stay valid


@pytest.mark.parametrize("flag", ["--token-key", "--spool"])
def test_engine_names_a_missing_parent_folder(tmp_path: Path, flag: str) -> None:
    result = subprocess.run([str(ENGINE), "--snapshot", "/x", flag, str(tmp_path / "no" / "x")],
                            capture_output=True, text=True, check=False, timeout=10)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "create its parent folder first" in result.stderr


NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


def untracked(answer: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """Each placement's ads without their signed tracking URLs, which every ad must have."""
    for placement in answer["placements"]:
        for ad in placement["ads"]:
            assert ad["imp"] and ad["click"]
    return [[{k: v for k, v in ad.items() if k not in ("imp", "click")} for ad in p["ads"]]
            for p in answer["placements"]]


def test_hugepages_back_the_snapshot_when_the_host_has_them(
        tmp_path: Path, engine_set: CampaignSet, signing_key: SigningKey) -> None:
    # adpop-engine.service passes --hugepages when the tuning reserves pages for the shards.
    before = NR_HUGEPAGES.read_text()
    request = {"id": "hp", "placements": [{"id": "home-top"}], "time": 1_770_000_000}
    try:
        NR_HUGEPAGES.write_text("0\n")
        with running_engine(tmp_path, engine_set, signing_key, extra=["--hugepages"]) as eng:
            assert eng.status()["hugepages"] is False  # none free: the file is mapped
            code, without = eng.post("/v1/decide", request)
            assert code == 200 and without["placements"][0]["ads"]
            NR_HUGEPAGES.write_text("64\n")
            install(eng.store, engine_set, 2, signing_key)
            assert eng.admin_call("POST", "/load")[0] == 200
            status = eng.status()
            assert status["hugepages"] is True and status["version"] == 2
            # The same campaigns (version 2 holds the same set), read from the copy. The
            # tracking URLs are left out: their expiry counts from the second they were made.
            assert untracked(eng.post("/v1/decide", request)[1]) == untracked(without)
    finally:
        NR_HUGEPAGES.write_text(before)


def test_idle_connections_never_lock_clients_out(tmp_path: Path, engine_set: CampaignSet,
                                                 signing_key: SigningKey) -> None:
    """Issue 20, case 4: the whole connection cap held by sockets that never send a byte.
    A new client is still served at once (the oldest idle connections make room), and the
    silent ones are closed after the short first-byte timeout, not the idle timeout."""
    flags = ["--max-connections", "64", "--first-byte-timeout", "300", "--idle-timeout", "60000"]
    with running_engine(tmp_path, engine_set, signing_key, extra=flags, shards=1) as eng:
        silent = []
        for _ in range(64):
            sock = socket.create_connection(("127.0.0.1", eng.port), timeout=5)
            silent.append(sock)
        try:
            time.sleep(0.1)  # every one accepted: the cap is full
            started = time.monotonic()
            assert eng.get("/healthz") == (200, b"ok\n"), "a new client gets in at the cap"
            assert time.monotonic() - started < 2
            errors = eng.status()["errors"]
            assert errors["idle_evicted"] >= 1 and errors["connection_cap"] == 0
            time.sleep(1.0)  # past the first-byte timeout and a 100 ms tick
            closed = 0
            for sock in silent:
                sock.settimeout(0.5)
                try:
                    closed += sock.recv(1) == b""
                except (ConnectionResetError, TimeoutError):
                    closed += 0
            assert closed == len(silent), f"{closed} of {len(silent)} silent sockets closed"
            assert eng.status()["errors"]["first_byte_timeout"] >= 1
            # A client that speaks is not cut by the first-byte timeout.
            with socket.create_connection(("127.0.0.1", eng.port), timeout=5) as talker:
                for _ in range(3):
                    talker.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                    assert talker.recv(256).startswith(b"HTTP/1.1 200")
                    time.sleep(0.4)
        finally:
            for sock in silent:
                sock.close()
