"""Fleet budget pacing over a simulated day (issue 24).

Twenty simulated PoPs with skewed traffic shares serve a diurnal day of requests to 200
campaigns whose daily budgets are below their demand. Each PoP is the engine's own pacing
code (libadpop_pacing.so: the Pacing and ShardPacer the engine's shards run, with its 100 ms
tick), driven by simulated time. The origin is the real allocator
(appliance.origin.pacing.Allocator) and demand book, run every interval on the spend the
origin would have stored (impressions arrive a few seconds after they are shown) and the
PoPs' reports. One PoP is cut off from the origin for two hours: no allowances, no reports,
its events held until it is back.

What the simulator itself does is only the world around them: which campaigns each request
could serve (random targeting), the lottery order, whether and when an ad's impression fires.

Prints each campaign's spend against its daily budget (median and worst error), the worst
overshoot, and the largest deviation of hourly delivery from the pacing curve (even and
front-loaded campaigns; ASAP campaigns have no hourly shape to hold). Goals: within ±2 % of
budget, overshoot at most 1 %, hourly delivery within ±10 % of the curve.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from appliance.origin.pacing import Allocator, Budget, DemandBook, curve
from appliance.snapshot.model import Pacing

LIB = Path(__file__).resolve().parent.parent / "engine" / "build" / "libadpop_pacing.so"
DAY = 20_000  # the simulated UTC day
I64, U32, U64 = ctypes.c_int64, ctypes.c_uint32, ctypes.c_uint64


def load() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(LIB))
    lib.adpop_pacing_new.restype = ctypes.c_void_p
    lib.adpop_pacing_new.argtypes = [U32]
    lib.adpop_pacing_install.restype = ctypes.c_int
    lib.adpop_pacing_install.argtypes = [ctypes.c_void_p, U64, I64, I64, I64, I64, U32,
                                         ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.adpop_pacing_error.restype = ctypes.c_char_p
    lib.adpop_pacing_error.argtypes = [ctypes.c_void_p]
    handle_and_count: list[Any] = [ctypes.c_void_p, U32]
    lib.adpop_pacing_serve.argtypes = handle_and_count + [ctypes.c_void_p] * 6
    lib.adpop_pacing_charge.argtypes = handle_and_count + [ctypes.c_void_p] * 3
    lib.adpop_pacing_report.argtypes = handle_and_count + [ctypes.c_void_p] * 3
    lib.adpop_pacing_free.argtypes = [ctypes.c_void_p]
    return lib


def ptr(a: np.ndarray) -> int:
    return int(a.ctypes.data)


def diurnal(hour: np.ndarray | float) -> np.ndarray | float:
    """Traffic relative to the day's mean: peak at 20:00 UTC, trough (0.45) at 08:00."""
    return 1.0 + 0.55 * np.cos(2 * np.pi * (np.asarray(hour) - 20.0) / 24.0)


def simulate(args: argparse.Namespace) -> dict[str, float]:
    rng = np.random.default_rng(args.seed)
    lib = load()
    n_pops, n_camps = args.pops, args.campaigns
    shares = 1.0 / np.arange(1, n_pops + 1) ** 0.9
    shares /= shares.sum()
    cut_pop = 3  # cut off from 10:00 to 12:00
    cut_from, cut_to = 10 * 3600, 12 * 3600
    q = rng.uniform(0.02, 0.08, n_camps)  # share of requests a campaign could serve
    price = rng.uniform(500, 4000, n_camps).round().astype(np.uint64)  # micros per impression
    show = 0.85  # chosen ads whose impression fires
    styles = [Pacing.EVEN, Pacing.FRONTLOADED, Pacing.ASAP]
    kinds = [styles[k] for k in rng.choice(3, n_camps, p=[0.6, 0.25, 0.15])]
    demand_value = args.rate * 86400 * q * price * show
    budget = (demand_value * rng.uniform(0.02, 0.04, n_camps)).round().astype(np.int64)
    names = [f"camp-{i:03d}" for i in range(n_camps)]
    hashes = np.arange(1, n_camps + 1, dtype=np.uint32)  # id hashes, sorted
    budgets = [Budget(names[i], int(budget[i]), 0, kinds[i]) for i in range(n_camps)]

    pops = [lib.adpop_pacing_new(4096) for _ in range(n_pops)]
    allocator = Allocator(interval_ms=int(args.interval * 1000))
    book = DemandBook()
    day0 = DAY * 86400
    known = np.zeros((n_pops, n_camps), dtype=np.int64)  # spend stored at the origin
    held: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []  # in transit
    pending: list[list[np.ndarray]] = [[] for _ in range(n_pops)]  # impressions not yet shown
    shown_spend = np.zeros((24, n_camps), dtype=np.float64)
    eligible = np.zeros(n_camps, dtype=np.uint64)
    reported = np.zeros(n_camps, dtype=np.uint64)
    started = time.perf_counter()
    alloc_s = 0.0
    t = 0.0
    while t < 86400:
        now_ms = int((day0 + t) * 1000)
        cut = cut_from <= t < cut_to
        # --- the origin's round: stored spend, the PoPs' reports, allowances out --------
        keep = []
        for arrive, pop_i, camp_i, value in held:
            if (arrive <= t).all() and not (cut and (pop_i == cut_pop).any()):
                np.add.at(known, (pop_i, camp_i), value)
            else:
                keep.append((arrive, pop_i, camp_i, value))
        held = keep
        for p in range(n_pops):
            if cut and p == cut_pop:
                continue
            lib.adpop_pacing_report(pops[p], n_camps, ptr(hashes), ptr(eligible), ptr(reported))
            book.report(f"pop-{p}", DAY, {names[i]: (int(eligible[i]), 0)
                                          for i in range(n_camps) if eligible[i]}, day0 + t)
            for i in np.nonzero(reported > known[p])[0]:
                known[p, i] = reported[i]  # a PoP's own report is fresher than its events
        spent = {(f"pop-{p}", names[i]): int(known[p, i])
                 for p, i in zip(*np.nonzero(known), strict=True)}
        a0 = time.perf_counter()
        given = allocator.allocate(now_ms, budgets, spent, book.snapshot(),
                                   book.live(day0 + t, args.interval))
        alloc_s += time.perf_counter() - a0
        for pop_name, allowance in given.items():
            p = int(pop_name.split("-")[1])
            if cut and p == cut_pop:
                continue
            caps = np.array([allowance.caps.get(n, 0) for n in names], dtype=np.uint64)
            floor = np.array([allowance.spent.get(n, 0) for n in names], dtype=np.uint64)
            ok = lib.adpop_pacing_install(pops[p], allowance.seq, allowance.issued_ms,
                                          allowance.interval_end_ms, allowance.expires_ms,
                                          allowance.day, n_camps, ptr(hashes), ptr(caps),
                                          ptr(floor))
            if not ok:
                raise SystemExit(f"install refused: {lib.adpop_pacing_error(pops[p]).decode()}")
        # --- one interval of traffic at every PoP ----------------------------------------
        span = min(args.interval, 86400 - t)
        for p in range(n_pops):
            mean = args.rate * shares[p] * float(diurnal((t + span / 2) / 3600)) * span
            n = int(rng.poisson(mean))
            times = np.sort(rng.uniform(t, t + span, n))
            # Each request could serve about sum(q) campaigns, each in proportion to its q,
            # in the order the lottery would try them.
            counts = rng.poisson(q.sum(), n)
            candidates = rng.choice(n_camps, int(counts.sum()), p=q / q.sum()).astype(np.uint32)
            offsets = np.zeros(n + 1, dtype=np.uint32)
            np.cumsum(counts, out=offsets[1:])
            cand_hashes = hashes[candidates]
            cand_prices = price[candidates]
            rolls = rng.integers(0, 2**63, len(candidates), dtype=np.uint64)
            chosen = np.empty(n, dtype=np.int32)
            times_ms = ((day0 + times) * 1000).astype(np.int64)
            lib.adpop_pacing_serve(pops[p], n, ptr(times_ms), ptr(offsets), ptr(cand_hashes),
                                   ptr(cand_prices), ptr(rolls), ptr(chosen))
            won = chosen >= 0
            camp = candidates[chosen[won]]
            fires = rng.random(len(camp)) < show
            shown_at = times[won][fires] + rng.uniform(0.3, 6.0, int(fires.sum()))
            pending[p].append(np.stack([shown_at, camp[fires].astype(np.float64)]))
            # Impressions due by the end of this interval are charged now, in time order.
            due_all = np.concatenate(pending[p], axis=1) if pending[p] else np.zeros((2, 0))
            due = due_all[0] < t + span
            later = due_all[:, ~due]
            pending[p] = [later] if later.shape[1] else []
            now_due = due_all[:, due]
            now_due = now_due[:, np.argsort(now_due[0])]
            at, ci = now_due[0], now_due[1].astype(np.int64)
            if len(at):
                at_ms = ((day0 + at) * 1000).astype(np.int64)
                ch = hashes[ci]
                pr = price[ci]
                lib.adpop_pacing_charge(pops[p], len(at), ptr(at_ms), ptr(ch), ptr(pr))
                hours = np.minimum((at // 3600).astype(np.int64), 23)
                np.add.at(shown_spend, (hours, ci), pr.astype(np.float64))
                # Stored at the origin a couple of seconds later (held while cut off).
                held.append((at + args.lag, np.full(len(at), p), ci, pr.astype(np.int64)))
        t += span
    for h in pops:
        lib.adpop_pacing_free(h)

    spend = shown_spend.sum(axis=0)
    error = (spend - budget) / budget
    paced = np.array([k is not Pacing.ASAP for k in kinds])
    hourly_dev = 0.0
    worst_at = ("", 0)
    if args.verbose:
        worst = int(np.argmin(error))
        print(f"  worst campaign {names[worst]}: {kinds[worst].value}, budget "
              f"{budget[worst] / 1e6:.2f}, spent {spend[worst] / 1e6:.2f}, price {price[worst]}")
    for i in np.nonzero(paced)[0]:
        for h in range(24):
            want = budget[i] * (curve(kinds[i], (h + 1) / 24) - curve(kinds[i], h / 24))
            dev = abs(shown_spend[h, i] - want) / want
            if dev > hourly_dev:
                hourly_dev, worst_at = dev, (names[i], h)
    if args.verbose:
        i = names.index(worst_at[0])
        print(f"  worst hour: {worst_at[0]} ({kinds[i].value}, budget {budget[i] / 1e6:.2f}, "
              f"price {price[i]}) hour {worst_at[1]}: "
              + " ".join(f"{shown_spend[h, i] / budget[i] * 100:.2f}" for h in range(24)))
    if args.verbose:
        for h in range(24):
            devs = [(shown_spend[h, i] - budget[i] * (curve(kinds[i], (h + 1) / 24)
                                                      - curve(kinds[i], h / 24)))
                    / (budget[i] * (curve(kinds[i], (h + 1) / 24) - curve(kinds[i], h / 24)))
                    for i in np.nonzero(paced)[0]]
            print(f"  hour {h:2d}: deviation min {min(devs) * 100:+.1f} % max "
                  f"{max(devs) * 100:+.1f} %")
    return {
        "median_error": float(statistics.median(np.abs(error))),
        "worst_under": float(error.min()), "worst_over": float(max(0.0, error.max())),
        "hourly_dev": hourly_dev, "worst_hour": float(worst_at[1]),
        "seconds": time.perf_counter() - started, "allocator_s": alloc_s,
        "requests_per_day": args.rate * 86400,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pops", type=int, default=20)
    parser.add_argument("--campaigns", type=int, default=200)
    parser.add_argument("--rate", type=float, default=400.0, help="fleet requests per second")
    parser.add_argument("--interval", type=float, default=10.0, help="pacing.interval, s")
    parser.add_argument("--lag", type=float, default=2.0, help="impression to stored, s")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--verbose", action="store_true", help="each hour's deviations")
    args = parser.parse_args()
    r = simulate(args)
    print(f"pacing simulation: {args.pops} PoPs, {args.campaigns} campaigns, "
          f"{r['requests_per_day'] / 1e6:.1f} M requests in a simulated day, "
          f"interval {args.interval:g} s, PoP 3 cut off 10:00-12:00 "
          f"({r['seconds']:.0f} s, allocator {r['allocator_s']:.0f} s)")
    print(f"  spend vs daily budget: median |error| {r['median_error'] * 100:.2f} %, "
          f"worst under {r['worst_under'] * 100:+.2f} %, worst over "
          f"{r['worst_over'] * 100:+.2f} %  (goal: within ±2 %, overshoot <= 1 %)")
    print(f"  hourly delivery vs pacing curve: worst deviation {r['hourly_dev'] * 100:.1f} % "
          f"(hour {int(r['worst_hour'])})  (goal: within ±10 %)")


if __name__ == "__main__":
    main()
