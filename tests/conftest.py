"""Shared fixtures: signing keys, the sample campaigns, a small synthetic set."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest

from appliance.snapshot import bundle, synth
from appliance.snapshot.manifest import SigningKey, generate_key, load_signing_key
from appliance.snapshot.model import CampaignSet, load_campaigns, parse_documents
from tests.fake_control import fake  # noqa: F401 - the console tests' fake supervisor
from tests.up_harness import up  # noqa: F401 - the `up` fixture, for every test module

REPO = Path(__file__).resolve().parent.parent
SAMPLE_CAMPAIGNS = REPO / "config" / "campaigns"


@pytest.fixture(scope="session")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keys")


@pytest.fixture(scope="session")
def signing_key(keydir: Path) -> SigningKey:
    key_path, _ = generate_key(keydir)
    return load_signing_key(key_path)


@pytest.fixture(scope="session")
def tuf_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The root.json of a real TUF repository, for PoPs that need one to trust."""
    from appliance.origin.tuf_repo import Repository

    return Repository.open(tmp_path_factory.mktemp("origin-tuf")).metadata / "root.json"


@pytest.fixture(scope="session")
def sample_set() -> CampaignSet:
    return load_campaigns(SAMPLE_CAMPAIGNS)


@pytest.fixture(scope="session")
def synthetic_set() -> CampaignSet:
    return parse_documents(synth.generate(3000, seed=11))


@pytest.fixture()
def sample_bundle(sample_set: CampaignSet, signing_key: SigningKey) -> bundle.Bundle:
    return bundle.build(sample_set, 3, [signing_key], ttl=3600, target_group="default")


TIERS = ("unit", "integration", "image", "vm")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test has exactly one tier: `make check` selects by them (not image, not vm)."""
    wrong = [f"{item.nodeid}: {tiers or 'none'}" for item in items
             if len(tiers := [m.name for m in item.iter_markers() if m.name in TIERS]) != 1]
    if wrong:
        raise pytest.UsageError("tests without exactly one tier marker "
                                f"({', '.join(TIERS)}):\n  " + "\n  ".join(wrong))


# One seed for the run's randomised tests, printed in the header and beside each failure:
# ADPOP_TEST_SEED=N replays it.
SEED = int(os.environ.get("ADPOP_TEST_SEED") or random.SystemRandom().randrange(2**32))


def pytest_report_header() -> str:
    return f"randomised tests: ADPOP_TEST_SEED={SEED}"


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """A random source for one test, from the run's seed and the test's id."""
    request.node.user_properties.append(("seed", SEED))
    return random.Random(f"{SEED}:{request.node.nodeid}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    outcome = yield
    report = outcome.get_result()
    if report.failed and "rng" in getattr(item, "fixturenames", ()):
        report.sections.append(("seed", f"replay with ADPOP_TEST_SEED={SEED}"))
