"""`sparsec serve`: the OpenAI API over a compiled model, batching requests per step.

``openai_api`` parses requests and builds responses (no HTTP), ``app`` is the ASGI app
(Starlette) over a ``sparsec.runtime.engine.Engine``, ``command`` the CLI (uvicorn).
Needs the ``serve`` extra; the runtime itself never imports this package.
"""
