"""Serving: the engine (loaded methods, queue, one worker per device), the HTTP API and the web page.

Import :mod:`brushnet.service.engine` for in-process use; :func:`brushnet.service.api.create_app` needs
the ``serve`` extra (fastapi, uvicorn, python-multipart).
"""
