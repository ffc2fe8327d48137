"""Signed manifests: every tampering is caught and named."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from appliance.snapshot import bundle
from appliance.snapshot.manifest import (
    Manifest,
    Policy,
    Reason,
    SigningKey,
    VerifyError,
    canonical,
    generate_key,
    load_signing_key,
    load_trust,
    sign,
    verify_dir,
    verify_manifest,
    verify_payload_bytes,
)

pytestmark = pytest.mark.unit

ADPOP = Path(sys.executable).parent / "adpop"


def policy_for(keydir: Path, **overrides: object) -> Policy:
    return replace(bundle.policy([keydir]), **overrides)  # type: ignore[arg-type]


def reason_of(data: bytes, policy: Policy, now: float | None = None) -> Reason | None:
    try:
        verify_manifest(data, policy, now)
    except VerifyError as exc:
        return exc.reason
    return None


def test_good_snapshot_verifies(sample_bundle: bundle.Bundle, keydir: Path,
                                tmp_path: Path) -> None:
    bundle.write(sample_bundle, tmp_path / "snap")
    manifest, payload = verify_dir(tmp_path / "snap", policy_for(keydir))
    assert manifest == sample_bundle.manifest
    assert payload == sample_bundle.payload


def _span(data: bytes, needle: bytes) -> range:
    start = data.index(needle)
    return range(start, start + len(needle))


@pytest.mark.parametrize("mask", [0x01, 0x20, 0xFF])
def test_every_manifest_byte_flip_fails_with_its_reason(sample_bundle: bundle.Bundle,
                                                        keydir: Path, mask: int) -> None:
    data = sample_bundle.manifest_bytes
    policy = policy_for(keydir)
    doc = json.loads(data)
    sig_span = _span(data, doc["signatures"][0]["sig"].encode())
    keyid_span = _span(data, doc["signatures"][0]["keyid"].encode())
    signed_span = _span(data, canonical(doc["signed"]))
    counts: dict[Reason, int] = {}
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= mask
        reason = reason_of(bytes(flipped), policy)
        assert reason is not None, f"flip of byte {i} ({chr(data[i])!r}) went unnoticed"
        counts[reason] = counts.get(reason, 0) + 1
        if i in sig_span:
            assert reason in (Reason.BAD_SIGNATURE, Reason.MALFORMED), i
        elif i in keyid_span:
            assert reason in (Reason.UNKNOWN_KEY, Reason.MALFORMED), i
        elif i in signed_span:
            assert reason in (Reason.BAD_SIGNATURE, Reason.MALFORMED), i
        else:
            assert reason is Reason.MALFORMED, i
    if mask == 0x01:
        # Flips that keep the JSON valid must be caught by the cryptography, not by luck.
        assert counts.get(Reason.BAD_SIGNATURE, 0) > len(signed_span) // 2
        assert counts.get(Reason.UNKNOWN_KEY, 0) == len(keyid_span)


def test_every_payload_byte_flip_is_a_hash_mismatch(sample_bundle: bundle.Bundle) -> None:
    payload = sample_bundle.payload
    for i in range(len(payload)):
        flipped = bytearray(payload)
        flipped[i] ^= 0x5A
        with pytest.raises(VerifyError) as info:
            verify_payload_bytes(sample_bundle.manifest, bytes(flipped))
        assert info.value.reason is Reason.HASH_MISMATCH


@pytest.mark.parametrize(("cut", "extra"), [(1, b""), (0, b"\0"), (len(b"x") * 100, b"")])
def test_payload_length_is_checked_before_hash(sample_bundle: bundle.Bundle, cut: int,
                                               extra: bytes) -> None:
    payload = sample_bundle.payload[: len(sample_bundle.payload) - cut] + extra
    with pytest.raises(VerifyError) as info:
        verify_payload_bytes(sample_bundle.manifest, payload)
    assert info.value.reason is Reason.LENGTH_MISMATCH


def test_unknown_key(sample_bundle: bundle.Bundle, tmp_path: Path) -> None:
    _, other_pub = generate_key(tmp_path / "other")
    assert reason_of(sample_bundle.manifest_bytes, bundle.policy([other_pub])) \
        is Reason.UNKNOWN_KEY


def test_expired_with_skew(sample_bundle: bundle.Bundle, keydir: Path) -> None:
    policy = policy_for(keydir, clock_skew=60)
    expires = sample_bundle.manifest.expires
    assert reason_of(sample_bundle.manifest_bytes, policy, now=expires + 59) is None
    assert reason_of(sample_bundle.manifest_bytes, policy, now=expires + 61) is Reason.EXPIRED


def test_threshold_counts_each_key_once(sample_bundle: bundle.Bundle, signing_key: SigningKey,
                                        tmp_path: Path, keydir: Path) -> None:
    second_path, second_pub = generate_key(tmp_path / "second")
    second = load_signing_key(second_path)
    both = bundle.policy([keydir, second_pub], threshold=2)
    manifest = sample_bundle.manifest
    assert reason_of(sign(manifest, [signing_key, second]), both) is None
    assert reason_of(sign(manifest, [signing_key]), both) is Reason.THRESHOLD_NOT_MET
    # The same key twice is still one key.
    doubled = sign(manifest, [signing_key, signing_key])
    assert len(json.loads(doubled)["signatures"]) == 2
    assert reason_of(doubled, both) is Reason.THRESHOLD_NOT_MET


def test_signature_by_wrong_key_under_trusted_id(sample_bundle: bundle.Bundle, keydir: Path,
                                                 signing_key: SigningKey,
                                                 tmp_path: Path) -> None:
    impostor_path, _ = generate_key(tmp_path / "impostor")
    impostor = load_signing_key(impostor_path)
    forged = sign(sample_bundle.manifest, [SigningKey(signing_key.id, impostor.private)])
    assert reason_of(forged, policy_for(keydir)) is Reason.BAD_SIGNATURE


def test_schema_mismatch(sample_bundle: bundle.Bundle, signing_key: SigningKey,
                         keydir: Path) -> None:
    other = replace(sample_bundle.manifest, schema_id="0x0000000000000001")
    assert reason_of(sign(other, [signing_key]), policy_for(keydir)) is Reason.SCHEMA_MISMATCH


def test_wrong_group(sample_bundle: bundle.Bundle, keydir: Path) -> None:
    policy = policy_for(keydir, target_group="canary")
    assert reason_of(sample_bundle.manifest_bytes, policy) is Reason.WRONG_GROUP


def test_too_large(sample_bundle: bundle.Bundle, signing_key: SigningKey, keydir: Path) -> None:
    small = policy_for(keydir, max_manifest_bytes=100)
    assert reason_of(sample_bundle.manifest_bytes, small) is Reason.TOO_LARGE
    huge = replace(sample_bundle.manifest, payload_length=10**12)
    assert reason_of(sign(huge, [signing_key]), policy_for(keydir)) is Reason.TOO_LARGE


def test_non_canonical_manifest_is_malformed(sample_bundle: bundle.Bundle,
                                             keydir: Path) -> None:
    pretty = json.dumps(json.loads(sample_bundle.manifest_bytes), indent=1).encode()
    assert reason_of(pretty, policy_for(keydir)) is Reason.MALFORMED


def test_signed_fields_are_typed(signing_key: SigningKey, keydir: Path) -> None:
    manifest = Manifest("0x1", 1, 0, int(time.time()) + 60, "ab", 1, "", "default")
    signed = manifest.signed()
    signed["version"] = "1"
    body = canonical(signed)
    sig = base64.b64encode(signing_key.private.sign(body)).decode()
    data = canonical({"signatures": [{"keyid": signing_key.id, "sig": sig}], "signed": signed})
    assert reason_of(data, Policy(trusted=load_trust([keydir]))) is Reason.MALFORMED


def test_verify_cli_exits_2_with_one_line(sample_bundle: bundle.Bundle, keydir: Path,
                                          tmp_path: Path) -> None:
    folder = tmp_path / "snap"
    bundle.write(sample_bundle, folder)
    ok = subprocess.run([ADPOP, "snapshot", "verify", "--trust", str(keydir), str(folder)],
                        capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ok: version 3")
    payload = folder / "payload.capnp"
    payload.write_bytes(payload.read_bytes()[:-8] + b"\x01" * 8)
    bad = subprocess.run([ADPOP, "snapshot", "verify", "--trust", str(keydir), str(folder)],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2
    assert bad.stdout == ""
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("adpop: verify failed: hash-mismatch: ")
