#!/bin/bash
# usage: benches/callgrind.sh BINARY LABEL PROTO(http1|http2) N
# Instructions per request of the proxy under callgrind (the method of
# docs/architecture.md's tower figures): one nginx worker with the bench
# harness's backend config (../shared/bench/conf) on 127.0.0.1:2808x (h1) /
# 2809x (h2c), the proxy on :28180 (admin :28190) under `taskset -c 1`,
# lb round_robin; 2,000 warm-up requests uninstrumented, then N counted.
# Clients: curl with 8 parallel HTTP/1.1 connections; h2load with 4
# connections of 16 streams each, the bench's h2 shape (nghttp, used before
# 2026-12-05, opened up to the proxy's 1,024 streams at once: the proxy
# shed some, and jemalloc's caches overflowed as they never do in the
# bench). jemalloc's decay is 50 times longer than the binary's, as the
# program runs about 50 times slower under callgrind. Not a load
# benchmark: counts, not wall-clock time.
# CALLGRIND_LOAD=wrk (HTTP/1.1 only): the counted load is the bench's own
# client instead, `wrk -t1 -c8` for CALLGRIND_SECS (default 20) seconds,
# whose requests carry only `Host` (curl's carry three headers); the count
# is divided by the requests wrk completed, and N is ignored.
set -u
BIN=$1; LABEL=$2; PROTO=$3; N=$4
D=${CALLGRIND_DIR:-/tmp/almond-callgrind}/$LABEL-$PROTO; rm -rf $D; mkdir -p $D
. "$(dirname "$0")/backends.sh"
backends $D $PROTO
taskset -c 1 env _RJEM_MALLOC_CONF=${CALLGRIND_MALLOC_CONF:-dirty_decay_ms:5000} valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=$D/cg.out $BIN proxy --config $D/almond.yaml > $D/proxy.log 2>&1 &
PX=$!
for i in $(seq 1 120); do curl -s -o /dev/null http://127.0.0.1:28190/ready && break; sleep 1; done
load() { if [ $PROTO = http1 ]; then curl -s --no-progress-meter --http1.1 -Z --parallel-max 8 "http://127.0.0.1:28180/$1[1-$2]" > /dev/null; else h2load -c 4 -m 16 -n $2 "http://127.0.0.1:28180/$1" > /dev/null; fi; }
load w 2000
callgrind_control -i on $PX >/dev/null
if [ "${CALLGRIND_LOAD:-curl}" = wrk ]; then
  taskset -c 0 wrk -t1 -c8 -d${CALLGRIND_SECS:-20}s http://127.0.0.1:28180/ > $D/wrk.txt
  N=$(grep -o "[0-9]* requests in" $D/wrk.txt | cut -d" " -f1)
else
  load r $N
fi
callgrind_control -i off $PX >/dev/null
callgrind_control -d $PX >/dev/null
curl -s http://127.0.0.1:28190/metrics | grep -v '^#' | grep 'requests_total\|errors_total' | grep -v ' 0$' > $D/codes.txt
kill $PX; wait $PX 2>/dev/null
kill $NG; wait $NG 2>/dev/null
echo "codes: $(tr '\n' ' ' < $D/codes.txt)"
F=$(ls -S $D/cg.out* | head -1)
TOT=$(for f in $D/cg.out*; do grep -h "^totals:" $f | head -1 | awk '{print $2}'; done | paste -sd+ | bc)
echo "$LABEL $PROTO total Ir $TOT over $N requests: $((TOT / N)) per request"
