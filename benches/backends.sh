# Sourced by benches/callgrind.sh and benches/perf.sh: `backends DIR PROTO
# [CPU]` starts one nginx worker with the bench harness's backend config
# (../shared/bench/conf) on 127.0.0.1:2808x (h1) / 2809x (h2c), pinned to
# CPU if given, its pid in NG; and writes DIR/almond.yaml: the proxy on
# :28180 (admin :28190), lb round_robin over the three PROTO backends.
backends() {
  local d=$1 proto=$2 cpu=${3:-} eps
  sed -e "s#@RUN@#$d#" -e "s#@BODY@#hello from the backend, 48 bytes of body text.\\\\n#" \
    -e "s#@H1_LISTEN@#listen 127.0.0.1:28081; listen 127.0.0.1:28082; listen 127.0.0.1:28083;#" \
    -e "s#@H2_LISTEN@#listen 127.0.0.1:28091 http2; listen 127.0.0.1:28092 http2; listen 127.0.0.1:28093 http2;#" \
    "$(dirname "${BASH_SOURCE[0]}")/../../shared/bench/conf/backend-nginx.conf" > $d/nginx.conf
  if [ -n "$cpu" ]; then taskset -c $cpu nginx -c $d/nginx.conf -p $d -e $d/ng.err &
  else nginx -c $d/nginx.conf -p $d -e $d/ng.err &
  fi
  NG=$!
  if [ $proto = http1 ]; then eps='[{ addr: "127.0.0.1:28081" }, { addr: "127.0.0.1:28082" }, { addr: "127.0.0.1:28083" }]'
  else eps='[{ addr: "127.0.0.1:28091" }, { addr: "127.0.0.1:28092" }, { addr: "127.0.0.1:28093" }]'; fi
  cat > $d/almond.yaml <<Y
admin: 127.0.0.1:28190
listeners:
  - bind: 127.0.0.1:28180
    service: bench
services:
  bench:
    protocol: $proto
    lb: round_robin
    endpoints: $eps
Y
}
