#!/usr/bin/env python3
"""Fails on import circles between the modules of a crate.

For each `src` folder given, every module (file) is a node and every
`crate::a::b` or `super::a` path in its text an edge to the deepest module
that path names; a strongly connected component of more than one module is
a circle: files that cannot be read or changed alone (issue 22).
"""
import os
import re
import sys


def modules(root):
    mods = {}
    for folder, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".rs"):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)[:-3].split(os.sep)
            if rel[-1] == "mod" or (len(rel) == 1 and rel[0] in ("lib", "main")):
                rel = rel[:-1]
            with open(path, encoding="utf-8", errors="replace") as f:
                mods["::".join(rel)] = f.read()
    return mods


def edges(mods):
    out = {m: set() for m in mods}
    pattern = re.compile(r"\b(crate|super)((?:::[a-z_][a-z0-9_]*)+)")
    for m, text in mods.items():
        here = m.split("::") if m else []
        for kind, rest in pattern.findall(text):
            parts = rest.strip(":").split("::")
            if kind == "crate":
                base = []
            else:
                # `super` of a file module is its folder's module.
                base = here[:-1]
                while parts and parts[0] == "super":
                    parts, base = parts[1:], base[:-1]
            full = base + parts
            for k in range(len(full), 0, -1):
                target = "::".join(full[:k])
                if target in mods:
                    # A module's own children and the crate root are not
                    # edges that can close a circle worth reporting.
                    if target != m and target != "":
                        out[m].add(target)
                    break
    return out


def circles(graph):
    index, low, stack, on, found, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def main():
    bad = False
    for root in sys.argv[1:]:
        mods = modules(root)
        found = circles(edges(mods))
        for comp in found:
            bad = True
            print(f"{root}: import circle: {' <-> '.join(comp)}")
        if not found:
            print(f"{root}: {len(mods)} modules, no import circles")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
