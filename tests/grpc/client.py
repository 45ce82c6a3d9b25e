#!/usr/bin/env python3
"""A gRPC client for almond's tests (grpcio, no protobuf).

  client.py TARGET AUTHORITY CALL... | --forever CALL

TARGET is the proxy's host:port (h2c, prior knowledge); AUTHORITY the
:authority sent (the service name the proxy routes by). A CALL is
METHOD:STATUS:COUNT, e.g. Unary:OK:20 or Stream:UNAVAILABLE:5: COUNT calls
of almond.Test/METHOD asking for STATUS, one after another. Prints one JSON
line: {"codes": {CODE: n}, "backends": {NAME: n}, "details": {CODE: text}}
(a backend counts when its answer's trailers name it; details: the last
message a failed call came with, by its code). --forever repeats its CALL until killed,
printing nothing.
"""

import json
import sys

import grpc


def one(channel, method, status, codes, backends, details):
    path = f"/almond.Test/{method}"
    request = status.encode()
    try:
        if method == "Unary":
            _, call = channel.unary_unary(path).with_call(request, timeout=10)
        else:
            call = channel.unary_stream(path)(request, timeout=10)
            for _ in call:
                pass
        code = grpc.StatusCode.OK
        trailers = call.trailing_metadata() or ()
    except grpc.RpcError as e:
        code = e.code()
        trailers = e.trailing_metadata() or ()
        details[code.name] = e.details()
    codes[code.name] = codes.get(code.name, 0) + 1
    for key, value in trailers:
        if key == "x-backend":
            backends[value] = backends.get(value, 0) + 1


def main():
    args = sys.argv[1:]
    forever = "--forever" in args
    args = [a for a in args if a != "--forever"]
    target, authority, calls = args[0], args[1], args[2:]
    options = [("grpc.default_authority", authority), ("grpc.enable_retries", 0)]
    codes, backends, details = {}, {}, {}
    with grpc.insecure_channel(target, options=options) as channel:
        while True:
            for spec in calls:
                method, status, count = spec.split(":")
                for _ in range(int(count)):
                    one(channel, method, status, codes, backends, details)
            if not forever:
                break
    print(json.dumps({"codes": codes, "backends": backends, "details": details}), flush=True)


if __name__ == "__main__":
    main()
