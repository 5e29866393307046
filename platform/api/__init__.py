"""HTTP API: Flask app factory, thin views over the services, JSON errors, OpenAPI."""
