"""``freqar serve``: a local web studio over the engine (needs the ``serve`` extra: starlette, uvicorn).

``studio`` holds the framework-free logic (validation, queues, results); ``app`` is the ASGI app. Importing
this package imports neither starlette nor uvicorn; ``freqar.serve.app`` does.
"""
