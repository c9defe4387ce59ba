#!/usr/bin/env python3
"""Module import cycles in a Rust crate's src/: the module graph and its circles.

Usage: tools/module_cycles.py [SRC_DIR] [--graph]

Every `crate::`, `super::` and `self::` path in the code (use lines and
paths written inline; comments, doc links and string literals are skipped)
is an edge from the module whose file holds it to the deepest module the path
names. Inline modules (`mod tests { ... }`) belong to their file's module;
`super::` inside them is resolved from where they sit.

The rule checked: at every level (the crate root, and each module with
children), the edges among its direct children, each child standing for its
whole subtree, form no circle. A parent and its own children may use each
other (`use super::Thing`); siblings and unrelated modules may not use each
other in a circle. Exit status 1, with each circle and the lines that make
it, when one exists.

--graph also prints the graph between the crate's top-level modules.
Only the standard library: runs wherever python3 does. src/main.rs (the
binary, which uses the library by its crate name) is not part of the graph.
"""

import os
import re
import sys
from collections import defaultdict


def strip(text):
    """The code of `text` with comments and string/char literals blanked out
    (newlines kept, so offsets and line numbers stay)."""
    out = []
    i, n = 0, len(text)

    def blank(s):
        return "".join("\n" if c == "\n" else " " for c in s)

    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(blank(text[i:j]))
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(blank(text[i:j]))
            i = j
        elif c in "rb" and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = re.match(r'(br|r)(#*)"', text[i:i + 300])
            if m:
                close = '"' + m.group(2)
                j = text.find(close, i + m.end())
                j = n if j < 0 else j + len(close)
                out.append(blank(text[i:j]))
                i = j
            elif text.startswith('b"', i):
                out.append(" ")
                i += 1
            elif text.startswith("b'", i):
                out.append(" ")
                i += 1
            else:
                out.append(c)
                i += 1
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            j = min(j + 1, n)
            out.append(blank(text[i:j]))
            i = j
        elif c == "'":
            # a char literal ('x', '\n', '\u{..}') or a lifetime ('a)
            if i + 1 < n and text[i + 1] == "\\":
                j = text.find("'", i + 2)
                j = n if j < 0 else j + 1
                out.append(blank(text[i:j]))
                i = j
            elif i + 2 < n and text[i + 2] == "'":
                out.append("   ")
                i += 3
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def file_modules(src):
    """{module path tuple: file} for the crate rooted at src/lib.rs."""
    modules = {}
    for dirpath, _, files in os.walk(src):
        for name in files:
            if not name.endswith(".rs"):
                continue
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, src)[:-3].split(os.sep)
            if rel == ["main"] or rel[0] == "bin":
                continue
            if rel == ["lib"]:
                rel = []
            elif rel[-1] == "mod":
                rel = rel[:-1]
            modules[tuple(rel)] = path
    return modules


IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def parse_tree(code, i, prefix, out):
    """Parse a use tree at code[i:] (after `prefix::`); append full paths."""
    ws = re.compile(r"\s*")
    i = ws.match(code, i).end()
    if i < len(code) and code[i] == "{":
        i += 1
        while True:
            i = ws.match(code, i).end()
            if i >= len(code) or code[i] == "}":
                return i + 1
            i = parse_tree(code, i, prefix, out)
            i = ws.match(code, i).end()
            if i < len(code) and code[i] == ",":
                i += 1
    m = re.compile(IDENT + r"|\*").match(code, i)
    if not m:
        out.append(prefix)
        return i
    seg = m.group(0)
    i = m.end()
    path = prefix if seg in ("self", "*") else prefix + [seg]
    m2 = re.compile(r"\s*::\s*").match(code, i)
    if m2 and seg != "*":
        return parse_tree(code, m2.end(), path, out)
    out.append(path)
    return i


def references(path, module):
    """[(target path as segments from the crate root, line)] in one file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    code = strip(text)
    # inline modules: (start, end, name)
    inline = []
    for m in re.finditer(r"\bmod\s+(" + IDENT + r")\s*\{", code):
        depth, j = 1, m.end()
        while j < len(code) and depth:
            if code[j] == "{":
                depth += 1
            elif code[j] == "}":
                depth -= 1
            j += 1
        inline.append((m.start(), j, m.group(1)))
    refs = []
    for m in re.finditer(r"(?<![A-Za-z0-9_:])(crate|super|self)\s*::", code):
        here = list(module) + [name for (s, e, name) in inline if s < m.start() < e]
        kind = m.group(1)
        if kind == "crate":
            base = []
        elif kind == "self":
            base = here
        else:
            base = here[:-1]
        paths = []
        parse_tree(code, m.end(), base, paths)
        line = code.count("\n", 0, m.start()) + 1
        for p in paths:
            while p and p[0] == "super":  # super::super::
                p = p[1:]
            refs.append((p, line))
    return refs


def deepest_module(path, modules):
    for k in range(len(path), -1, -1):
        if tuple(path[:k]) in modules:
            return tuple(path[:k])
    return ()


def tarjan(nodes, edges):
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
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
            out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def name(mod):
    return "::".join(mod) if mod else "crate"


def main(argv):
    args = [a for a in argv if not a.startswith("--")]
    src = args[0] if args else "src"
    modules = file_modules(src)
    # module -> module -> first (file, line)
    edges = defaultdict(dict)
    for mod, path in sorted(modules.items()):
        for target, line in references(path, mod):
            dest = deepest_module(target, modules)
            if dest != mod:
                edges[mod].setdefault(dest, (path, line))

    if "--graph" in argv:
        top = defaultdict(set)
        for a, targets in edges.items():
            for b in targets:
                if a and b and a[0] != b[0]:
                    top[a[0]].add(b[0])
        print("module graph (crate's top-level modules, each standing for its subtree):")
        for a in sorted({m[0] for m in modules if m}):
            print(f"  {a} -> {', '.join(sorted(top.get(a, ()))) or '(nothing)'}")

    circles = 0
    parents = sorted({m[:-1] for m in modules if m})
    for parent in parents:
        children = sorted({m[: len(parent) + 1] for m in modules if len(m) > len(parent) and m[: len(parent)] == parent})
        level = defaultdict(set)
        evidence = defaultdict(list)
        for a, targets in edges.items():
            for b, where in targets.items():
                if len(a) <= len(parent) or len(b) <= len(parent):
                    continue
                if a[: len(parent)] != parent or b[: len(parent)] != parent:
                    continue
                ca, cb = a[: len(parent) + 1], b[: len(parent) + 1]
                if ca != cb:
                    level[ca].add(cb)
                    evidence[(ca, cb)].append((name(a), name(b), where))
        for comp in tarjan(children, level):
            if len(comp) < 2:
                continue
            circles += 1
            members = set(comp)
            print(f"circle among the children of {name(parent)}: {', '.join(name(c) for c in comp)}")
            for ca in comp:
                for cb in sorted(level[ca] & members):
                    a, b, (path, line) = evidence[(ca, cb)][0]
                    print(f"  {name(ca)} -> {name(cb)}  ({a} uses {b} at {path}:{line})")
    if circles:
        print(f"{circles} import circle(s) in {src}")
        return 1
    print(f"no import circle in {src} ({len(modules)} modules)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
