"""The query: scoring modes and top-k search (search), one tracer over any index (trace)."""
