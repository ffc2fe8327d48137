"""The origin's TUF repository, checked by python-tuf's own client (ngclient's Updater): a
target is listed and found; a rotated targets key is followed and the retired one refused;
a root rotated with offline keys is followed once a threshold signed it; a freeze (stale
timestamp) and a mix-and-match of metadata are refused.

The Updater reads the repository's files through a fetcher over the folder (the origin's
HTTP route comes with the PoP side of the switch, issue 22 step 4); everything else is
python-tuf as a PoP runs it."""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from tuf.api import exceptions
from tuf.api._payload import Targets
from tuf.api.metadata import Metadata
from tuf.ngclient.fetcher import FetcherInterface
from tuf.ngclient.updater import Updater

from appliance.origin.tuf_repo import Repository, TufError

pytestmark = pytest.mark.unit

BASE = "https://origin.invalid/v1/tuf/"


class FolderFetcher(FetcherInterface):
    """Serves BASE/NAME from a folder, 404 for what is not there."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _fetch(self, url: str) -> Iterator[bytes]:
        path = self.folder / url.removeprefix(BASE)
        if not url.startswith(BASE) or not path.is_file():
            raise exceptions.DownloadHTTPError(f"{url}: not found", 404)
        yield path.read_bytes()


def client(repo: Repository, cache: Path, trusted_root: bytes) -> Updater:
    cache.mkdir(exist_ok=True)
    return Updater(str(cache), BASE, fetcher=FolderFetcher(repo.metadata),
                   bootstrap=trusted_root)


def listed(repo: Repository, name: str, data: bytes) -> None:
    repo.add_target(name, len(data), hashlib.sha256(data).hexdigest(),
                    {"version": int(name.rpartition("/")[2].partition(".")[0])})


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.open(tmp_path / "tuf")


def test_a_listed_target_is_found_with_its_hash_and_custom_fields(
        repo: Repository, tmp_path: Path) -> None:
    assert (repo.keys / "root-0").parent.stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in repo.keys.glob("*.key"))
    assert len(list(repo.keys.glob("root-*.key"))) == 3 and repo.root().roles["root"].threshold == 2
    listed(repo, "default/1.manifest.json", b"one")
    found = client(repo, tmp_path / "pop", repo.root_bytes()).get_targetinfo(
        "default/1.manifest.json")
    assert found is not None and found.length == 3
    assert found.hashes["sha256"] == hashlib.sha256(b"one").hexdigest()
    assert found.custom == {"version": 1}
    assert client(repo, tmp_path / "pop", repo.root_bytes()).get_targetinfo("x") is None


def test_a_rotated_targets_key_is_followed_and_the_retired_one_refused(
        repo: Repository, tmp_path: Path) -> None:
    trusted = repo.root_bytes()  # what the PoP was flashed with
    listed(repo, "default/1.manifest.json", b"one")
    assert client(repo, tmp_path / "pop", trusted).get_targetinfo("default/1.manifest.json")
    (old_key,) = repo.keys.glob("targets-*.key")
    assert repo.rotate("targets").startswith("root v2 in force")
    assert not old_key.exists() and old_key.with_suffix(".retired").exists()
    listed(repo, "default/2.manifest.json", b"two")
    pop = client(repo, tmp_path / "pop", trusted)
    assert pop.get_targetinfo("default/2.manifest.json") is not None, "followed root v2"
    assert Metadata.from_bytes((tmp_path / "pop" / "root.json").read_bytes()).signed.version == 2

    # The retired (compromised) key signs a targets file listing a bad target; even with the
    # online keys in the attacker's hands too, the PoP refuses it.
    targets = cast(Metadata[Targets], Metadata.from_bytes(repo.load("targets").to_bytes()))
    targets.signed.targets.clear()
    targets.signed.version += 1
    targets.signatures.clear()
    targets.sign(Repository.load_signer(old_key.with_suffix(".retired")))
    repo._save(targets)
    repo._save_online(repo.root(), targets.signed.version, time.time())
    with pytest.raises(exceptions.UnsignedMetadataError):
        client(repo, tmp_path / "pop", trusted).refresh()


def test_a_root_rotated_with_offline_keys_needs_their_threshold(
        repo: Repository, tmp_path: Path) -> None:
    trusted = repo.root_bytes()
    listed(repo, "default/1.manifest.json", b"one")
    offline = tmp_path / "offline"
    offline.mkdir()
    for path in sorted(repo.keys.glob("root-*.key"))[:2]:  # two of three leave the origin
        shutil.move(path, offline / path.name)
    said = repo.rotate("root")
    assert "staged with" in said and "adpop origin root sign" in said
    assert repo.root().version == 1, "one old root key is not the threshold of two"
    with pytest.raises(TufError, match="not a PEM private key"):
        repo.sign_root(tmp_path / "offline")
    said = repo.sign_root(next(offline.glob("*.key")))
    assert said.startswith("root v2 in force"), said
    listed(repo, "default/2.manifest.json", b"two")
    pop = client(repo, tmp_path / "pop", trusted)
    assert pop.get_targetinfo("default/2.manifest.json") is not None
    with pytest.raises(TufError, match="no root is waiting"):
        repo.sign_root(next(offline.glob("*.key")))


def test_a_freeze_and_a_mix_and_match_are_refused(repo: Repository, tmp_path: Path) -> None:
    trusted = repo.root_bytes()
    listed(repo, "default/1.manifest.json", b"one")
    listed(repo, "default/2.manifest.json", b"two")
    # Mix and match: the newest snapshot's name served with an older targets file in place.
    newest = repo.load("targets").signed.version
    saved = (repo.metadata / f"{newest}.targets.json").read_bytes()
    shutil.copy(repo.metadata / f"{newest - 1}.targets.json",
                repo.metadata / f"{newest}.targets.json")
    with pytest.raises(exceptions.RepositoryError):
        client(repo, tmp_path / "pop-mix", trusted).refresh()
    (repo.metadata / f"{newest}.targets.json").write_bytes(saved)
    assert client(repo, tmp_path / "pop-ok", trusted).get_targetinfo("default/2.manifest.json")
    # A freeze: metadata signed two days ago and replayed today has an expired timestamp.
    repo._save_online(repo.root(), newest, time.time() - 2 * 86400)
    with pytest.raises(exceptions.ExpiredMetadataError):
        client(repo, tmp_path / "pop-frozen", trusted).refresh()
    # The running origin re-signs the online roles once half their life is gone.
    assert repo.refresh_online() and not repo.refresh_online()
    client(repo, tmp_path / "pop-frozen", trusted).refresh()


def test_the_targets_keep_the_newest_entries_only(repo: Repository,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("appliance.origin.tuf_repo.MAX_TARGETS", 3)
    for version in range(1, 6):
        listed(repo, f"default/{version}.manifest.json", b"v%d" % version)
    assert list(repo.load("targets").signed.targets) == [
        "default/3.manifest.json", "default/4.manifest.json", "default/5.manifest.json"]


def test_reconcile_lists_what_an_older_origin_published(repo: Repository,
                                                        tmp_path: Path) -> None:
    from appliance.origin.db import OriginDB
    from appliance.origin.publish import reconcile
    from appliance.snapshot.manifest import Manifest, sign, target_path

    db = OriginDB(tmp_path / "origin")
    manifest = sign(Manifest("schema", 1, 0, 1, "e" * 64, 7, "", "default"), [])
    db.add_version(1, manifest, b"payload", "e" * 64, 1, 0, "all")  # no vouch: before TUF
    assert reconcile(db, repo) == [1]
    found = client(repo, tmp_path / "pop", repo.root_bytes()).get_targetinfo(
        target_path("default", 1))
    assert found is not None and found.hashes["sha256"] == hashlib.sha256(manifest).hexdigest()
    assert reconcile(db, repo) == [], "listed once"
