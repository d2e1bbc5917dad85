"""The HTTP service: ``icl-cl serve`` learns sessions while it serves predictions.

Importing this package loads nothing heavy; :func:`icl_cl.service.app.create_app` builds the
FastAPI application, :func:`icl_cl.service.server.serve` runs it under uvicorn, and
:class:`icl_cl.service.client.Client` talks to it.
"""
