"""Tuning: plan + verify over a fake sysfs/procfs tree of a big host, so the drift loop that
runs them every minute and on every device event costs nothing.

The tree: 64 CPUs on 2 NUMA nodes, two mlx5-style NICs with 127 queues each (256 IRQs in
all, with their async IRQs), cpufreq, 60 shards. Prints the median of 20 runs of plan (the
desired state from discovery) plus verify (every knob read and compared), goal < 200 ms,
beside the floor measured in the same run: reading each of those knob files once, nothing
else.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from appliance import config as cfg
from appliance.tuning import faketree, plan
from appliance.tuning.faketree import FakeNic
from appliance.tuning.host import Host

RUNS = 20
GOAL_MS = 200.0


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "tree"
        nics = [FakeNic(f"ens{i}f0", "pci", 127, node=i, local_cpus=f"{i * 32}-{i * 32 + 31}",
                        channels={"max_combined": 127, "combined": 127}) for i in range(2)]
        faketree.build(root, cpus=64, nodes=2, nics=nics, cpufreq=True)
        config = Path(tmp) / "appliance.toml"
        config.write_text(f'[engine]\nshards = 60\ncpus = "2-31,34-63"\n[paths]\n'
                          f'state_dir = "{tmp}/state"\n')
        appliance = cfg.load(cfg.Scope.APPLIANCE, config)
        host = Host(root)
        plan_verify, floor = [], []
        knobs = 0
        irqs = 0
        for _ in range(RUNS):
            started = time.perf_counter()
            want = plan.desired(appliance, host)
            rows = plan.rows(host, want.knobs, plan.kernel_owned(appliance, host))
            plan_verify.append(time.perf_counter() - started)
            knobs = len(rows)
            irqs = sum(len(n.irqs) for n in want.nics)
            started = time.perf_counter()
            for knob in want.knobs:
                knob.read()
            floor.append(time.perf_counter() - started)
        median_ms = statistics.median(plan_verify) * 1000
        print(f"tuning plan+verify: 64 CPUs, {irqs} IRQs, {knobs} knobs, median of {RUNS}: "
              f"{median_ms:.1f} ms (goal < {GOAL_MS:.0f} ms) "
              f"[{'met' if median_ms < GOAL_MS else 'NOT met'}]; "
              f"floor (read each knob file once): {statistics.median(floor) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
