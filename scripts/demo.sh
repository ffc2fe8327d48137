#!/usr/bin/env bash
# `make demo` until the PoP runs: build the sample campaigns into a signed snapshot, verify it,
# install it into a demo state directory and show what is in it.
set -euo pipefail
cd "$(dirname "$0")/.."
adpop=.venv/bin/adpop
demo=.demo
mkdir -p "$demo"
if ! ls "$demo"/keys/*.key >/dev/null 2>&1; then
    "$adpop" keys generate --out "$demo/keys"
fi
key=$(ls "$demo"/keys/*.key | head -n 1)
cat > "$demo/appliance.toml" <<TOML
[paths]
state_dir = "$PWD/$demo/state"

[snapshot]
trust = ["$PWD/$demo/keys"]
TOML
# Versions must rise: take the next one after what the demo PoP already holds.
version=$(( $(cat "$demo/state/high-water" 2>/dev/null || echo 0) + 1 ))
# Chain to the active snapshot, as the origin will: the manifest names its predecessor.
previous=()
if [ -f "$demo/state/current/payload.capnp" ]; then
    previous=(--previous "$(sha256sum "$demo/state/current/payload.capnp" | cut -d' ' -f1)")
fi
"$adpop" snapshot build --campaigns config/campaigns --version "$version" --key "$key" \
    --out "$demo/snapshot-v$version" "${previous[@]}"
"$adpop" snapshot verify --config "$demo/appliance.toml" "$demo/snapshot-v$version"
"$adpop" snapshot install --config "$demo/appliance.toml" "$demo/snapshot-v$version"
echo
"$adpop" snapshot inspect "$demo/snapshot-v$version"
echo
"$adpop" snapshot list --config "$demo/appliance.toml"
echo
echo "The engine, origin and console arrive with the next issues; for now try:"
echo "  $adpop snapshot inspect $demo/snapshot-v$version --json"
echo "  $adpop config dump --config $demo/appliance.toml"
