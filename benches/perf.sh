#!/bin/bash
# usage: benches/perf.sh BINARY LABEL PROTO(http1|http2) [SECONDS]
# Where the proxy's CPU time goes under the bench's load, user and kernel:
# `perf record -e cpu-clock` (a software clock: this VM has no hardware
# counters) on the proxy alone under `taskset -c 1`, lb round_robin over
# one nginx worker's 3 backend ports (../shared/bench/conf, ports
# 2808x h1 / 2809x h2c); load from CPU 0 for SECONDS (default 10): wrk
# -c64 (h1) or h2load -c4 -m16 (h2c). Prints the top symbols by self time
# and the user/kernel split. Not a benchmark: shares of one run's samples.
set -u
BIN=$1; LABEL=$2; PROTO=$3; SECS=${4:-10}
D=${PERF_DIR:-/tmp/almond-perf}/$LABEL-$PROTO; rm -rf $D; mkdir -p $D
. "$(dirname "$0")/backends.sh"
backends $D $PROTO 0
taskset -c 1 $BIN proxy --config $D/almond.yaml > $D/proxy.log 2>&1 &
PX=$!
for i in $(seq 1 60); do curl -s -o /dev/null http://127.0.0.1:28190/ready && break; sleep 0.5; done
load() {
  if [ $PROTO = http1 ]; then taskset -c 0 wrk -t1 -c64 -d${1}s http://127.0.0.1:28180/;
  else taskset -c 0 timeout $(( $1 + 30 )) h2load -t1 -c4 -m16 -D $1 http://127.0.0.1:28180/; fi
}
load 2 > /dev/null
perf record -q -e cpu-clock -F ${FREQ:-1999} ${PERF_G:-} -p $PX -o $D/perf.data -- sleep $SECS > /dev/null 2>&1 &
PR=$!
load $SECS > $D/load.txt
wait $PR
kill $PX; wait $PX 2>/dev/null
kill $NG; wait $NG 2>/dev/null
grep -E "Requests/sec|finished in|requests:" $D/load.txt
perf report -i $D/perf.data --no-children --sort dso -q 2>/dev/null | head -12
perf report -i $D/perf.data --no-children --sort sym -q 2>/dev/null | head -${TOP:-40}
