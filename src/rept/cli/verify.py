"""`rept verify`: check an index against its manifest without loading a model."""

from __future__ import annotations

import json
import sys

HELP = ("check an index against its manifest: every file's sha256, every shard's layer, dims and row range, "
        "the row count (no model is loaded)")


def add_arguments(p) -> None:
    p.add_argument("--index", required=True, help="index folder (signatures or a method index)")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    from rept.store.index import open_store

    index = open_store(args.index)
    problems = index.check()
    files = index.manifest["files"]
    if args.json:
        print(json.dumps({"index": args.index, "ok": not problems, "files": len(files),
                          "bytes": sum(f["bytes"] for f in files.values()), "problems": problems}, indent=2))
    elif problems:
        for problem in problems:
            print(f"rept: error: {problem}", file=sys.stderr)
    else:
        print(f"{args.index}: {len(files)} files, {index.manifest['rows']} rows: every checksum matches")
    return 2 if problems else 0
