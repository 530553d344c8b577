"""`kdbench teachers list|verify|prune`: the teacher store (kdbench.teachers) as a user sees it.

    kdbench teachers list   [--store DIR] [--runs DIR...]   what is stored: architecture, dataset, recipe, top-1,
                                                            size, and how many runs learned from it
    kdbench teachers verify [--store DIR]                   every entry's sha256 against meta.json (exit 1 if any fails)
    kdbench teachers prune  [--store DIR] [--unused] [--yes]
                                                            remove half-written entries (and, with --unused, those no
                                                            run under --runs used); without --yes only lists them

The store defaults to <results root>/teachers (KDBENCH_RESULTS, default ./outputs), the runs to the results root.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from kdbench.teachers import StoredTeacher, is_locked, scan_store, store_users, verify_entry


def _results_root() -> Path:
    return Path(os.environ.get("KDBENCH_RESULTS", "./outputs")).expanduser()


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def describe(t: StoredTeacher) -> dict:
    """The columns of `kdbench teachers list` for one entry."""
    rec = t.record or {}
    config = (t.meta or {}).get("config") or rec.get("config") or {}
    trainer, optim, schedule = config.get("trainer") or {}, config.get("optim") or {}, config.get("schedule") or {}
    method = (config.get("method") or {}).get("name") or rec.get("method") or "?"
    recipe = (f"{method}, {trainer.get('epochs', '?')} ep, batch {trainer.get('batch_size', '?')}, "
              f"{optim.get('name', '?')} lr {optim.get('lr', '?')}, {schedule.get('name', '?')}, seed {config.get('seed', '?')}")
    if rec.get("teacher"):
        recipe += f", from {rec['teacher']}"
    top1 = rec.get("last_top1")
    return {"entry": t.entry.name, "arch": rec.get("student") or (config.get("student") or {}).get("label") or "?",
            "dataset": rec.get("dataset") or (config.get("dataset") or {}).get("name") or "?", "recipe": recipe,
            "top-1": f"{top1:.2f}" if isinstance(top1, (int, float)) else "", "size": _size(t.size),
            "state": "complete" if t.complete else ("training now" if is_locked(t.entry) else "half-written")}


def _table(rows: list[dict]) -> str:
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kdbench teachers", description="The teacher store.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("command", choices=["list", "verify", "prune"])
    parser.add_argument("--store", type=Path, help="the store (default: <results root>/teachers)")
    parser.add_argument("--runs", type=Path, nargs="*", help="where to look for the runs that used each teacher "
                                                             "(default: the results root)")
    parser.add_argument("--unused", action="store_true", help="prune: also complete entries no run used")
    parser.add_argument("--yes", action="store_true", help="prune: remove them (without it: only list them)")
    args = parser.parse_args(argv)
    store = args.store or _results_root() / "teachers"
    entries = scan_store(store)
    if not entries:
        print(f"kdbench teachers: no entries in {store}", file=sys.stderr)
        return 0
    roots = [*(args.runs if args.runs else [_results_root()]), store]
    if args.command == "list":
        users = store_users(entries, roots)
        rows = [{**describe(t), "used by": f"{len(users.get(t.entry.name, []))} run(s)"} for t in entries]
        print(_table(rows))
        print(f"\n{len(entries)} entries in {store}; runs searched in: {', '.join(map(str, roots[:-1]))}")
        return 0
    if args.command == "verify":
        bad = 0
        for t in entries:
            ok, detail = verify_entry(t.entry)
            bad += not ok
            print(f"{'ok  ' if ok else 'FAIL'}  {t.entry.name}  {detail}")
        print(f"\n{len(entries) - bad} of {len(entries)} entries verified" + (f"; {bad} failed (delete a failed entry "
              "and the next job that needs it trains it again)" if bad else ""))
        return 1 if bad else 0
    users = store_users(entries, roots) if args.unused else {}
    doomed = [(t, "half-written") for t in entries if not t.complete and not is_locked(t.entry)]
    if args.unused:
        doomed += [(t, "used by no run") for t in entries if t.complete and not users.get(t.entry.name)]
    if not doomed:
        print("kdbench teachers: nothing to prune")
        return 0
    for t, why in doomed:
        print(f"{'removing' if args.yes else 'would remove'}  {t.entry.name}  ({why}, {_size(t.size)})")
        if args.yes:
            shutil.rmtree(t.entry.directory)
    if not args.yes:
        print("\n(nothing removed: add --yes to remove these)")
    return 0
