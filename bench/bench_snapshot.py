"""Snapshot benchmark: compile time, payload size and verify time for 100k and 1M campaigns.

Each figure is printed beside a baseline measured in the same run on the same data:
- compile: json.dumps of the same campaign documents (the cost of merely serialising them);
- verify: `sha256sum` (coreutils) over the same payload file, i.e. the raw hashing floor.
Goals (issue 2): 1M campaigns compile in under 60 s; verify (hash + signature) under 1 s.
"validate" is parsing and checking the authored documents into the model; "compile" is the
compiler proper (model to signed payload). Both are printed, and their sum.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

from appliance.snapshot import bundle, synth
from appliance.snapshot.manifest import generate_key, load_signing_key, verify_dir
from appliance.snapshot.model import parse_documents


def run(campaigns: int, workdir: Path) -> dict[str, float]:
    documents = synth.generate(campaigns, seed=7)
    started = time.perf_counter()
    for _, doc in documents:
        json.dumps(doc)
    baseline_serialise = time.perf_counter() - started

    started = time.perf_counter()
    campaign_set = parse_documents(documents)
    validate = time.perf_counter() - started
    del documents

    key_path, pub_path = generate_key(workdir / f"keys-{campaigns}")
    key = load_signing_key(key_path)
    started = time.perf_counter()
    built = bundle.build(campaign_set, 1, [key], ttl=86400, target_group="default")
    compile_s = time.perf_counter() - started
    del campaign_set
    out = workdir / f"snap-{campaigns}"
    bundle.write(built, out)

    policy = bundle.policy([pub_path])
    started = time.perf_counter()
    verify_dir(out, policy)
    verify_s = time.perf_counter() - started
    started = time.perf_counter()
    subprocess.run(["sha256sum", str(out / "payload.capnp")], check=True, capture_output=True)
    baseline_hash = time.perf_counter() - started
    return {
        "campaigns": campaigns, "validate_s": validate, "compile_s": compile_s,
        "baseline_json_dumps_s": baseline_serialise, "payload_bytes": len(built.payload),
        "verify_s": verify_s, "baseline_sha256sum_s": baseline_hash,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="100000,1000000",
                        help="campaign counts, comma-separated")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="adpop-bench-") as tmp:
        print(f"{'campaigns':>10} {'validate':>9} {'compile':>9} {'(json.dumps)':>13} "
              f"{'payload MB':>11} {'verify':>8} {'(sha256sum)':>12}")
        for size in (int(s) for s in args.sizes.split(",")):
            r = run(size, Path(tmp))
            print(f"{r['campaigns']:>10} {r['validate_s']:>8.2f}s {r['compile_s']:>8.2f}s "
                  f"{r['baseline_json_dumps_s']:>12.2f}s {r['payload_bytes'] / 1e6:>11.1f} "
                  f"{r['verify_s']:>7.3f}s {r['baseline_sha256sum_s']:>11.3f}s", flush=True)
            total = r["validate_s"] + r["compile_s"]
            print(f"{'':>10} goals: compile {r['compile_s']:.1f}s (< 60 s for 1M; with "
                  f"validation of the authored files {total:.1f}s), verify "
                  f"{r['verify_s']:.3f}s (< 1 s)", flush=True)


if __name__ == "__main__":
    main()
