"""HTTP only: the Flask app factory, JSON errors, OpenAPI, and one thin blueprint per domain."""
