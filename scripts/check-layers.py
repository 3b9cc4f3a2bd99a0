#!/usr/bin/env python3
"""Checks the layering of every crate, at every level of its module tree:

- no two modules of a crate's top level import each other, directly or
  through others (`use crate::x`, `crate::x::…` paths);
- inside each folder module, no two of its children import each other
  (`super::sibling`, or `crate::path::to::folder::sibling`);
- in the folders of STRICT, no child imports from the folder's own
  `mod.rs` (`super::Item` that is not a sibling module): what children
  share lives in a child of its own. (Elsewhere a child may extend its
  parent's type: `impl Store` split by aggregate.)

Usage: scripts/check-layers.py [CRATE_SRC_DIR ...]   (default: every crate)
Exits 1 and prints each cycle or parent import.
"""
import os, re, sys

def code(path):
    # Unit tests may reach anywhere; comments (doc links) are no imports.
    text = open(path).read().split('#[cfg(test)]')[0]
    return '\n'.join(l for l in text.splitlines() if not l.lstrip().startswith('//'))

def children(folder):
    """The child modules of a folder module: name -> its files."""
    mods = {}
    for name in os.listdir(folder):
        p = os.path.join(folder, name)
        if name.endswith('.rs') and name not in ('lib.rs', 'main.rs', 'mod.rs'):
            mods[name[:-3]] = [p]
        elif os.path.isdir(p) and name != 'bin':
            files = []
            for root, _, fs in os.walk(p):
                files += [os.path.join(root, f) for f in fs if f.endswith('.rs')]
            mods[name] = files
    return mods

def edges(mods, path_prefix, folder):
    """Imports between siblings: `crate::<prefix>X` anywhere in a child's
    files, and `super::X` in the files directly under `folder`."""
    out = {m: set() for m in mods}
    crate_ref = re.compile(r'crate::' + re.escape(path_prefix) + r'([a-z_]+)')
    for m, files in mods.items():
        for f in files:
            text = code(f)
            deps = set(crate_ref.findall(text))
            if os.path.dirname(f) == folder or f == os.path.join(folder, m, 'mod.rs'):
                if os.path.dirname(f) == folder:
                    deps |= set(re.findall(r'\bsuper::([a-z_]+)', text))
            out[m] |= {d for d in deps if d in mods and d != m}
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

def parent_imports(folder, mods):
    """Children (files directly in a folder module) that take an item from
    the folder's mod.rs: `super::Item` or `super::{…}` naming no sibling."""
    found = []
    for m, files in mods.items():
        for f in files:
            if os.path.dirname(f) != folder:
                continue
            for line in code(f).splitlines():
                s = line.strip()
                if s.startswith('//'):
                    continue
                for g in re.findall(r'\bsuper::\{([^}]*)\}', s):
                    names = [n.strip().split('::')[0] for n in g.split(',') if n.strip()]
                    if any(n not in mods and n != 'self' for n in names):
                        found.append((f, s))
                for n in re.findall(r'\bsuper::([A-Za-z_][A-Za-z0-9_]*)\b(?!::)', s):
                    if n not in mods and n != 'super':
                        found.append((f, s))
    return found

# Folders whose children never import their parent (issue 28: the driver).
STRICT = ('dispatcher/src/driver',)

def check(src):
    bad = False
    for root, dirs, _ in os.walk(src):
        dirs[:] = [d for d in dirs if d != 'bin']
        if root != src and not os.path.isfile(os.path.join(root, 'mod.rs')):
            continue
        mods = children(root)
        rel = os.path.relpath(root, src)
        prefix = '' if rel == '.' else rel.replace(os.sep, '::') + '::'
        c = cycle(edges(mods, prefix, root))
        if c:
            bad = True
            print(f"{root}: import cycle: {' -> '.join(c)}")
        strict = any(os.path.abspath(root).startswith(os.path.join(ROOT, s)) for s in STRICT)
        if root != src and strict:
            for f, line in parent_imports(root, mods):
                bad = True
                print(f"{f}: imports from its parent module: {line}")
    return bad

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
dirs = sys.argv[1:] or [os.path.join(ROOT, d, 'src') for d in
        ('common', 'dispatcher', 'agent-server', 'server', 'cli', 'loadtest', 'tests')]
bad = False
for d in dirs:
    if not os.path.isdir(d):
        continue
    if check(d):
        bad = True
    else:
        print(f"{d}: no import cycles at any level")
sys.exit(1 if bad else 0)
