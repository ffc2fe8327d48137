"""Shared fixtures: signing keys, the sample campaigns, a small synthetic set."""

from __future__ import annotations

from pathlib import Path

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
def sample_set() -> CampaignSet:
    return load_campaigns(SAMPLE_CAMPAIGNS)


@pytest.fixture(scope="session")
def synthetic_set() -> CampaignSet:
    return parse_documents(synth.generate(3000, seed=11))


@pytest.fixture()
def sample_bundle(sample_set: CampaignSet, signing_key: SigningKey) -> bundle.Bundle:
    return bundle.build(sample_set, 3, [signing_key], ttl=3600, target_group="default")
