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
# One decision from the real engine on the snapshot just installed, then stop it.
port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
engine/build/adpop-engine --listen "127.0.0.1:$port" --snapshot "$demo/state/current" --shards 1 \
    --admin "$PWD/$demo/engine.sock" >"$demo/engine.log" 2>&1 &
engine_pid=$!
trap 'kill $engine_pid 2>/dev/null; wait $engine_pid 2>/dev/null || true' EXIT
url="http://127.0.0.1:$port/v1/decide?id=demo-1&placement=article-inline&country=US&device=desktop&time=1790000000"
.venv/bin/python - "$url" <<'PY'
import json, sys, time, urllib.request
url = sys.argv[1]
for _ in range(100):
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            print("engine answered GET", url.split("127.0.0.1")[1])
            print(json.dumps(json.load(resp), indent=2))
            break
    except OSError:
        time.sleep(0.05)
else:
    sys.exit("demo: the engine did not answer; see .demo/engine.log")
PY
echo
echo "The origin, supervisor and console arrive with the next issues; meanwhile try:"
echo "  engine/build/adpop-engine --snapshot $demo/state/current --listen 127.0.0.1:8080 --admin /tmp/adpop.sock"
echo "  $adpop snapshot inspect $demo/snapshot-v$version --json"
echo "  $adpop config dump --config $demo/appliance.toml"
