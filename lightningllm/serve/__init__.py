"""``lightningllm serve``: an export behind OpenAI's completions and chat completions API, on LitServe.

``command`` parses the command line and starts the server; ``spec`` is the HTTP side (endpoints, limits,
streaming), ``protocol`` OpenAI's request and response bodies, ``worker`` the LitServe API that decodes
batches of requests with :func:`~lightningllm.generation.generate`, and ``rows`` each request's own limits and
text inside a batch. Importing this package imports none of them (LitServe is an optional dependency).
"""
