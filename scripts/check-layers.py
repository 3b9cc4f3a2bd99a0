#!/usr/bin/env python3
"""Checks that no two top-level modules of a crate import each other,
directly or through others (`use crate::x`, `crate::x::…` paths).

Usage: scripts/check-layers.py [CRATE_SRC_DIR ...]   (default: every crate)
Exits 1 and prints the cycle when there is one.
"""
import os, re, sys

def modules(src):
    mods = {}
    for name in os.listdir(src):
        p = os.path.join(src, name)
        if name.endswith('.rs') and name not in ('lib.rs', 'main.rs'):
            mods[name[:-3]] = [p]
        elif os.path.isdir(p):
            files = []
            for root, _, fs in os.walk(p):
                files += [os.path.join(root, f) for f in fs if f.endswith('.rs')]
            mods[name] = files
    return mods

def edges(mods):
    out = {m: set() for m in mods}
    for m, files in mods.items():
        for f in files:
            text = open(f).read()
            text = text.split('#[cfg(test)]')[0]
            for dep in re.findall(r'crate::([a-z_]+)', text):
                if dep in mods and dep != m:
                    out[m].add(dep)
    return out

def cycle(g):
    state, stack = {}, []
    def visit(n):
        state[n] = 1; stack.append(n)
        for d in sorted(g[n]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                c = visit(d)
                if c: return c
        stack.pop(); state[n] = 2
        return None
    for n in sorted(g):
        if n not in state:
            c = visit(n)
            if c: return c
    return None

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
dirs = sys.argv[1:] or [os.path.join(root, d, 'src') for d in
        ('common', 'dispatcher', 'agent-server', 'server', 'cli', 'loadtest', 'tests')]
bad = False
for d in dirs:
    if not os.path.isdir(d):
        continue
    c = cycle(edges(modules(d)))
    if c:
        bad = True
        print(f"{d}: import cycle: {' -> '.join(c)}")
    else:
        print(f"{d}: no import cycles")
sys.exit(1 if bad else 0)
