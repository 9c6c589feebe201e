"""The shape of the tree itself: shared test code lives in support.py only."""
from __future__ import annotations

import ast
from pathlib import Path

from support import ROOT


def test_no_test_module_imports_another():
    """Test modules and benches share code through tests/support.py, never through each other."""
    bad = []
    for path in sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.startswith("test_") or n == "conftest"]
    assert not bad, bad


def test_the_core_opens_nothing():
    """The token core takes its store and custody from cryptobat.home: no sqlite, sockets,
    subprocesses, threads started or files read in it (a lock for its callers' threads is fine)."""
    core = ("token", "state", "policy", "prehash", "rrsig", "algorithms", "quorum", "officers", "clock",
            "audit", "keystore", "tally", "signing", "errors", "api", "rollback")
    banned = {"sqlite3", "socket", "subprocess", "selectors", "multiprocessing", "asyncio"}
    found = []
    for name in core:
        tree = ast.parse((ROOT / "src" / "cryptobat" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                found += [f"{name}: import {m}" for m in mods if m.split(".")[0] in banned]
            if isinstance(node, ast.Attribute) and node.attr in ("Thread", "Timer"):
                found.append(f"{name}: threading.{node.attr}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "open":
                found.append(f"{name}: open()")
            if isinstance(node, ast.Attribute) and node.attr in ("read_bytes", "read_text", "write_bytes",
                                                                  "write_text", "rglob", "fsync", "replace_file"):
                found.append(f"{name}: .{node.attr}")
    assert not found, found


def test_pkcs11_numbers_the_core_repeats_match_the_rpc_layers():
    """errors.py and algorithms.py keep PKCS#11 numbers so the core does not import p11rpc;
    they must be the RPC layer's numbers."""
    from cryptobat import algorithms, errors
    from cryptobat.p11rpc import constants as C
    for mod in (errors, algorithms):
        names = [n for n in dir(mod) if n.startswith(("CKR_", "CKM_", "CKK_"))]
        assert names
        for n in names:
            if hasattr(C, n):
                assert getattr(mod, n) == getattr(C, n), (mod.__name__, n)
