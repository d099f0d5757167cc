#!/usr/bin/env python3
"""Prints the dependency graph between the top-level modules of a crate
(`crate::<module>` references, excluding tests) and any cycles.

usage: tools/module_graph.py [operators/src]
"""
import os, re, sys
from collections import defaultdict

root = sys.argv[1] if len(sys.argv) > 1 else "operators/src"
mods = sorted(set(
    n[:-3] if n.endswith(".rs") else n
    for n in os.listdir(root)
    if n not in ("lib.rs", "main.rs") and (n.endswith(".rs") or os.path.isdir(os.path.join(root, n)))
))
deps = defaultdict(set)
pat = re.compile(r"crate::(\w+)")
for m in mods:
    files = []
    base = os.path.join(root, m)
    if os.path.isdir(base):
        for d, _, fs in os.walk(base):
            files += [os.path.join(d, f) for f in fs if f.endswith(".rs")]
    if os.path.exists(base + ".rs"):
        files.append(base + ".rs")
    for f in files:
        if re.search(r"(^|/)tests?(\.rs|/)", os.path.relpath(f, root)) or f.endswith("_tests.rs"):
            continue
        text = open(f).read()
        # drop #[cfg(test)] modules at the end of files
        cut = text.find("#[cfg(test)]\nmod tests")
        if cut >= 0:
            text = text[:cut]
        # references in code, not in comments or doc comments
        code = "\n".join(l.split("//")[0] for l in text.splitlines())
        for t in pat.findall(code):
            if t != m and t in mods:
                deps[m].add(t)
for m in mods:
    print(f"{m:12} -> {', '.join(sorted(deps[m]))}")
# cycles (Tarjan)
index, low, stack, on, out, i = {}, {}, [], set(), [], [0]
def strong(v):
    index[v] = low[v] = i[0]; i[0] += 1; stack.append(v); on.add(v)
    for w in deps[v]:
        if w not in index:
            strong(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop(); on.discard(w); comp.append(w)
            if w == v: break
        if len(comp) > 1: out.append(sorted(comp))
for m in mods:
    if m not in index: strong(m)
print("cycles:", out if out else "none")
sys.exit(1 if out else 0)
