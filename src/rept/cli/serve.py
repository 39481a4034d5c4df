"""`rept serve`: the audit app in the browser (rept.app)."""

from __future__ import annotations

HELP = "a local web app over an index: ask the model, trace its answer, read the queries, group the culprits, export them"


def add_arguments(p) -> None:
    from rept.cli.options import add_index_model_args, positive

    p.add_argument("--index", required=True, help="index folder made by `rept index` (a method index too)")
    p.add_argument("--queries", help="JSONL/CSV/Parquet with prompt, response[, label, flagged]: the Queries and "
                   "Groups views")
    p.add_argument("--max-queries", type=positive, default=None, help="the first N queries only")
    p.add_argument("--mitigation", action="append", default=[], metavar="DIR",
                   help="a `rept mitigate` output folder (or its results.json): its before/after charts; repeatable")
    p.add_argument("--correction", metavar="DIR", help="answer with the correction `rept correct` saved in DIR "
                   "(the Ask view can turn it off per answer); traces use the model as indexed")
    p.add_argument("--base-model", metavar="PATH",
                   help="the model before the fine-tune, for the Ask view's 'against the base model' trace "
                   "(rept trace --against-base; default: the index's model with its adapter off)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    add_index_model_args(p)


def run(args) -> int:
    import sys

    from rept.app.server import create_app, uvicorn_server
    from rept.app.service import AuditService
    from rept.cli.options import open_index
    from rept.errors import ReptError
    from rept.report import load_mitigation, mitigation_section
    from rept.query.trace import load_queries

    if not 0 <= args.port <= 65535:
        raise ReptError(f"--port must be from 0 to 65535, not {args.port}")
    queries = load_queries(args.queries) if args.queries else None  # bad files fail before the model loads
    for path in args.mitigation:
        mitigation_section(load_mitigation(path))
    correction = None
    if args.correction:
        from rept.repair.correct import Correction

        correction = Correction.load(args.correction)  # a bad folder fails before the model loads
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"rept: warning: binding {args.host}: anyone who can reach this address can use the app and read "
              "the training rows (no login)", file=sys.stderr)
    port = _bindable(args.host, args.port)  # a taken port fails before the model loads
    tracer = open_index(args)
    if correction is not None:
        correction.check_model(tracer.loaded)  # refused, naming what differs, on another model
    service = AuditService(tracer, queries, mitigations=args.mitigation, max_queries=args.max_queries,
                           correction=correction, correction_folder=args.correction, base_model=args.base_model)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"rept serve: http://{shown}:{port}/ ({service.info()['rows']} rows, {len(service.queries)} queries); "
          "Ctrl+C stops", file=sys.stderr)
    try:
        uvicorn_server(create_app(service), args.host, port).run()
    except (OSError, SystemExit) as exc:  # uvicorn exits when it cannot bind
        raise ReptError(f"cannot serve on {args.host}:{port}: {getattr(exc, 'strerror', None) or exc}") from None
    return 0


def _bindable(host: str, port: int) -> int:
    """`port` (or a free one for 0), checked by binding it once; a one-line error when it is taken."""
    import socket

    from rept.errors import ReptError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(infos[0][4])
            return s.getsockname()[1]
    except OSError as exc:
        raise ReptError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None
