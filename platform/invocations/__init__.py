"""Invocations: the invocation record, the request ledger the serving workers write, and the
reply stream that brings tokens and outcomes back to the API."""
