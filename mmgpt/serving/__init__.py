"""Serving: the OpenAI-compatible HTTP API (protocol, app) over a replica's model (service), deployed on Ray Serve
(deployment). Imports the runtime, never the training stack."""
