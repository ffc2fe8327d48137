"""The engine's gtest unit tests, optimised, under ASan + UBSan and under TSan, on a compiled
payload."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from appliance.snapshot import bundle, synth
from appliance.snapshot.manifest import SigningKey
from appliance.snapshot.model import parse_documents
from tests.engine_harness import controls_set

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent
BINARIES = {
    "optimised": REPO / "engine" / "build" / "adpop-engine-tests",
    "asan-ubsan": REPO / "engine" / "build-asan" / "adpop-engine-tests",
    "tsan": REPO / "engine" / "build-tsan" / "adpop-engine-tests",
}


@pytest.fixture(scope="module")
def payloads(tmp_path_factory: pytest.TempPathFactory, signing_key: SigningKey
             ) -> dict[str, str]:
    """The synthetic payload (index, ranking) and the controls payload (caps, pacing)."""
    paths = {}
    for env, campaign_set in (("ADPOP_TEST_PAYLOAD", parse_documents(synth.generate(3000, 21))),
                              ("ADPOP_CONTROLS_PAYLOAD", controls_set())):
        built = bundle.build(campaign_set, 1, [signing_key], ttl=3600, target_group="default")
        out = tmp_path_factory.mktemp("engine-payload")
        bundle.write(built, out)
        paths[env] = str(out / "payload.capnp")
    return paths


@pytest.mark.parametrize("variant", sorted(BINARIES))
def test_gtest_suite(variant: str, payloads: dict[str, str]) -> None:
    binary = BINARIES[variant]
    assert binary.is_file(), f"{binary} missing: `make setup` builds the engine"
    env = dict(os.environ, **payloads,
               ASAN_OPTIONS="detect_leaks=1:abort_on_error=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1",
               TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1")
    result = subprocess.run([binary], env=env, capture_output=True, text=True, check=False,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "[  PASSED  ]" in result.stdout
    assert "FAILED" not in result.stdout


FUZZ = REPO / "engine" / "build-fuzz"


@pytest.mark.parametrize("target", ["http", "json"])
def test_fuzz_target_runs_its_seed_corpus(target: str, tmp_path: Path) -> None:
    """The libFuzzer targets build, replay the committed seeds, and survive a short, counted
    run (`make fuzz` runs them for longer)."""
    binary = FUZZ / f"fuzz_{target}"
    assert binary.is_file(), f"{binary} missing: `make setup` builds the fuzz targets"
    seeds = REPO / "engine" / "fuzz" / "corpus" / target
    assert len(list(seeds.iterdir())) >= 5
    result = subprocess.run([binary, "-runs=20000", "-seed=1", "-max_len=4096", str(tmp_path),
                             str(seeds)], capture_output=True, text=True, check=False,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done 20000 runs" in result.stderr
