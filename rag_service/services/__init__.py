"""Use cases shared by the HTTP API, the CLI and the Python library."""
