"""`rept serve`: a local web app over an index and its model (ask, trace, queries, groups, export).

    from rept.app import AuditService, create_app
    from rept.query.trace import Tracer, load_queries
    service = AuditService(Tracer("idx"), load_queries("queries.jsonl"))
    app = create_app(service)          # a FastAPI app: uvicorn.run(app) or TestClient(app)

`service` holds the logic (rept.app.service), `server` the HTTP layer and the page
(rept.app.server, templates/app.html.j2). See docs/app.md.
"""

from rept.app.server import create_app, running
from rept.app.service import AppError, AuditService

__all__ = ["AppError", "AuditService", "create_app", "running"]
