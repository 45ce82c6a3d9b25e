#!/usr/bin/env bash
# Builds the release binary with profile-guided optimisation (PGO):
# target/pgo/release/almond, the same program as `cargo build --release`,
# laid out and inlined by a profile of the proxy's own request path.
#
#   deploy/build-pgo.sh                       # from anywhere in the repository
#   PGO_SECONDS=20 deploy/build-pgo.sh        # a longer training run per load
#
# 1. builds an instrumented binary (target/pgo-gen), which counts its
#    branches and calls as it runs;
# 2. trains it: one nginx worker as the backends (HTTP/1.1 and h2c) on
#    127.0.0.1, the proxy in front of them, and for each upstream protocol
#    GETs and 1 KiB POSTs from wrk (HTTP/1.1) and h2load (h2c), each for
#    PGO_SECONDS (default 8); every answer must be a 2xx;
# 3. merges the counts with `llvm-profdata` (`rustup component add
#    llvm-tools`) and builds again with them (-Cprofile-use).
#
# Needs nginx, wrk, h2load (Debian: nginx-light wrk nghttp2-client) and
# curl. Ports PGO_PORT (default 29380) to PGO_PORT+13 must be free. See
# docs/operations.md, "Building the release binary", for what it gains.
#
# PGO_TRAIN_ONLY=BINARY runs step 2 alone with BINARY, no build (the
# tests run it so with the test build, for a second a load).
set -euo pipefail

cd "$(dirname "$0")/.."
root=$PWD
seconds=${PGO_SECONDS:-8}
base=${PGO_PORT:-29380}
listen=$base admin=$((base + 1))
h1=($((base + 2)) $((base + 3)) $((base + 4)))
h2=($((base + 11)) $((base + 12)) $((base + 13)))

for tool in cargo rustc nginx wrk h2load curl; do
    command -v "$tool" >/dev/null || {
        echo "build-pgo: $tool is missing (Debian: apt-get install nginx-light wrk nghttp2-client curl)" >&2
        exit 1
    }
done
train_only=${PGO_TRAIN_ONLY:-}
profdata=$(find "$(rustc --print sysroot)/lib/rustlib" -name llvm-profdata -type f | head -n 1)
if [ -z "$profdata" ] && [ -z "$train_only" ]; then
    echo "build-pgo: llvm-profdata is missing: rustup component add llvm-tools" >&2
    exit 1
fi

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

binary=${train_only:-$root/target/pgo-gen/release/almond}
if [ -z "$train_only" ]; then
    echo "==> 1/3 instrumented build (target/pgo-gen)"
    RUSTFLAGS="-Cprofile-generate=$work/build-raw" CARGO_INCREMENTAL=0 \
        cargo build --release --locked --bin almond --target-dir "$root/target/pgo-gen"
fi

echo "==> 2/3 training, ${seconds} s a load"
servers() {
    local ports=("$@") out=""
    for p in "${ports[@]}"; do out+="listen 127.0.0.1:$p ${proto_flag:-}; "; done
    echo "$out"
}
cat > "$work/nginx.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000000;
  keepalive_timeout 600s;
  client_body_buffer_size 64k;
  default_type text/plain;
  server { $(servers "${h1[@]}") location / { return 200 "hello from the backend, 48 bytes of body text.\n"; } }
  server { $(proto_flag=http2 servers "${h2[@]}") location / { return 200 "hello from the backend, 48 bytes of body text.\n"; } }
}
EOF
nginx -p "$work" -c "$work/nginx.conf" -e "$work/nginx-error.log" &
pids+=($!)
for _ in $(seq 1 50); do
    curl -so /dev/null "http://127.0.0.1:${h1[0]}/" && break
    sleep 0.1
done
head -c 1024 /dev/zero | tr '\0' 'a' > "$work/body"
cat > "$work/post.lua" <<EOF
wrk.method = "POST"
wrk.body = string.rep("a", 1024)
wrk.headers["Content-Type"] = "application/octet-stream"
EOF

# Every answer a 2xx, or the profile would be of the error paths.
check_wrk() {
    if grep -q "Non-2xx\|Socket errors" "$1"; then
        echo "build-pgo: training requests failed:" >&2
        cat "$1" >&2
        exit 1
    fi
}
check_h2load() {
    if ! grep -q " 0 failed, 0 errored" "$1" || ! grep -q "status codes: [0-9]* 2xx, 0 3xx, 0 4xx, 0 5xx" "$1"; then
        echo "build-pgo: training requests failed:" >&2
        cat "$1" >&2
        exit 1
    fi
}

for proto in http1 http2; do
    if [ "$proto" = http1 ]; then ports=("${h1[@]}"); else ports=("${h2[@]}"); fi
    endpoints=""
    for p in "${ports[@]}"; do endpoints+="{ addr: \"127.0.0.1:$p\" }, "; done
    cat > "$work/$proto.yaml" <<EOF
admin: 127.0.0.1:$admin
listeners:
  - bind: 127.0.0.1:$listen
    service: train
services:
  train:
    protocol: $proto
    lb: round_robin
    endpoints: [${endpoints%, }]
EOF
    LLVM_PROFILE_FILE="$work/train-raw/almond-%p.profraw" \
        "$binary" proxy --config "$work/$proto.yaml" \
        > "$work/proxy-$proto.log" 2>&1 &
    proxy=$!
    pids+=("$proxy")
    for _ in $(seq 1 100); do
        curl -fso /dev/null "http://127.0.0.1:$admin/ready" && break
        sleep 0.1
    done
    curl -fso /dev/null "http://127.0.0.1:$admin/ready" || {
        echo "build-pgo: the proxy did not start:" >&2
        cat "$work/proxy-$proto.log" >&2
        exit 1
    }
    url="http://127.0.0.1:$listen/train"
    wrk -t1 -c64 -d"${seconds}s" "$url" > "$work/out" && check_wrk "$work/out"
    wrk -t1 -c64 -d"${seconds}s" -s "$work/post.lua" "$url" > "$work/out" && check_wrk "$work/out"
    h2load -t1 -c4 -m16 -D "$seconds" "$url" > "$work/out" && check_h2load "$work/out"
    h2load -t1 -c4 -m16 -D "$seconds" -d "$work/body" "$url" > "$work/out" && check_h2load "$work/out"
    # The counts are written when the process exits: a clean shutdown.
    kill -TERM "$proxy"
    wait "$proxy"
    echo "    $proto upstream: trained"
done

if [ -n "$train_only" ]; then
    exit 0
fi
echo "==> 3/3 optimised build (target/pgo)"
"$profdata" merge -o "$work/almond.profdata" "$work"/train-raw/*.profraw
RUSTFLAGS="-Cprofile-use=$work/almond.profdata" CARGO_INCREMENTAL=0 \
    cargo build --release --locked --bin almond --target-dir "$root/target/pgo"
echo "built $root/target/pgo/release/almond"
