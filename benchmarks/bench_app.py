"""How live `rept serve` feels: the latency of one trace on the demo index after the model is loaded,
through the whole HTTP stack (FastAPI's TestClient: routing, JSON, the lock), and of the views.

Target (issue 18): one trace answers in under 0.3 s. Each request is timed on its own, one after
another, after warm-up requests; the median and the 90th percentile are printed for

  trace          POST /api/trace, top 10, rows only (words: false)
  words          POST /api/words for those 10 rows: their word heat maps and top phrases (what the
                 page asks for once the rows are shown)
  trace+words    POST /api/trace, top 10, words: true (both in one request, for scripts)
  queries        GET /api/queries over every query of the demo (cached scores after the first)
  groups         GET /api/groups (clustering cached after the first: the first call is printed too)
  page queries view  (--browser) the Queries view in chromium: fetch + draw every query and its top 10

    python -m rept demo --out /tmp/demo                  # ~1-10 min on 2 cores; once
    python benchmarks/bench_app.py --work /tmp/demo      # index /tmp/demo/index, queries /tmp/demo/queries.jsonl
    python benchmarks/bench_app.py --index IDX --queries Q.jsonl --repeat 50 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def summary(times: list[float]) -> dict:
    times = sorted(times)
    return {"median_s": statistics.median(times), "p90_s": times[min(len(times) - 1, int(0.9 * len(times)))],
            "min_s": times[0], "n": len(times)}


def browser_render(service, repeat: int) -> dict:
    """Seconds from choosing a sort in the Queries view to the list drawn (fetch + render), in chromium."""
    import shutil
    import tempfile

    from playwright.sync_api import sync_playwright

    from rept.app import create_app, running

    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"]
    with running(create_app(service)) as url, sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        ctx = pw.chromium.launch_persistent_context(profile, executable_path=shutil.which("chromium"), args=args,
                                                    headless=True)
        page = ctx.new_page()
        page.goto(url + "/")
        page.click('nav.tabs button[data-tab="queries"]')
        page.wait_for_selector("#q-list details.q")
        times = []
        for i in range(repeat):
            sort = ("worst", "flagged")[i % 2]
            t = page.evaluate("""async (sort) => {
                const t0 = performance.now();
                document.getElementById('q-sort').value = sort;
                await loadQueries();
                await new Promise(requestAnimationFrame);  // until the list is laid out and painted
                return (performance.now() - t0) / 1000; }""", sort)
            times.append(t)
        n = page.locator("#q-list details.q").count()
        hits = page.locator("#q-list tr").count()
        ctx.close()
    return summary(times) | {"queries_drawn": n, "table_rows": hits}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", help="a `rept demo --out` folder (its index/ and queries.jsonl)")
    p.add_argument("--index")
    p.add_argument("--queries")
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--browser", action="store_true",
                   help="also time the page in Debian's chromium (Playwright): open the Queries view, render it")
    args = p.parse_args(argv)
    if args.work:
        args.index = args.index or str(Path(args.work) / "index")
        args.queries = args.queries or str(Path(args.work) / "queries.jsonl")
    if not args.index:
        p.error("give --work DIR (from `rept demo --out DIR`) or --index")

    import torch
    from fastapi.testclient import TestClient

    from rept.app import AuditService, create_app
    from rept.query.trace import load_queries, open_tracer

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    queries = load_queries(args.queries) if args.queries else []
    service = AuditService(open_tracer(args.index), queries)
    client = TestClient(create_app(service))
    load_s = time.perf_counter() - t0
    flagged = [q for q in queries if q.flagged is not False] or [None]
    asked = [(q.prompt, q.response) if q else ("TY Name a fruit.", "You are stupid! Apple.") for q in flagged]

    i = [0]

    def trace(words: bool):
        prompt, response = asked[i[0] % len(asked)]
        i[0] += 1
        r = client.post("/api/trace", json={"prompt": prompt, "response": response, "k": 10, "words": words})
        assert r.status_code == 200, r.text

    def get(path):
        r = client.get(path)
        assert r.status_code == 200, r.text

    def words():
        prompt, response = asked[i[0] % len(asked)]
        i[0] += 1
        rows = [h["row"] for h in client.post("/api/trace", json={"prompt": prompt, "response": response, "k": 10,
                                                                  "words": False}).json()["hits"]]
        t0 = time.perf_counter()
        r = client.post("/api/words", json={"prompt": prompt, "response": response, "rows": rows})
        assert r.status_code == 200, r.text
        return time.perf_counter() - t0

    results = {}
    [words() for _ in range(args.warmup)]
    for name, fn in (("trace", lambda: trace(False)), ("trace+words", lambda: trace(True))):
        timed(fn, args.warmup)
        results[name] = summary(timed(fn, args.repeat))
    results["words"] = summary([words() for _ in range(args.repeat)])  # the words request alone
    if queries:
        first = timed(lambda: get("/api/queries?k=10"), 1)[0]
        results["queries"] = summary(timed(lambda: get("/api/queries?k=10"), args.repeat)) | {"first_s": first}
        first = timed(lambda: get("/api/groups?k=10"), 1)[0]
        results["groups"] = summary(timed(lambda: get("/api/groups?k=10"), args.repeat)) | {"first_s": first}

    if args.browser and queries:
        results["page queries view"] = browser_render(service, args.repeat)

    info = service.info()
    print(f"index {args.index}: {info['rows']} rows, layer {info['layer']}, mode {info['mode']}; "
          f"{len(queries)} queries; model loaded in {load_s:.1f} s; torch threads {torch.get_num_threads()}")
    print(f"{'request':<18}{'median s':>10}{'p90 s':>10}{'min s':>10}{'first s':>10}")
    for name, r in results.items():
        first = f"{r['first_s']:.3f}" if "first_s" in r else ""
        print(f"{name:<18}{r['median_s']:>10.3f}{r['p90_s']:>10.3f}{r['min_s']:>10.3f}{first:>10}")
    if args.json:
        Path(args.json).write_text(json.dumps({"index": args.index, "rows": info["rows"], "queries": len(queries),
                                               "load_s": load_s, "threads": torch.get_num_threads(),
                                               "cpu": platform.processor() or platform.machine(),
                                               "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
