#!/bin/bash
# almond-healthcheck [HOST:PORT]: GET /live on an almond admin or control
# listener (default 127.0.0.1:4191, the proxy's admin) and exit 0 on a 200.
# Plain bash (/dev/tcp), so the runtime image needs no HTTP client.
addr="${1:-127.0.0.1:4191}"
host="${addr%:*}"
port="${addr##*:}"
exec 3<>"/dev/tcp/${host}/${port}" || exit 1
printf 'GET /live HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$addr" >&3
IFS= read -r -t 3 status <&3 || exit 1
[[ $status == "HTTP/1.1 200"* ]]
