"""The ``llmesh`` command line, one module per command group:

- ``mesh``: models, up/down/status/logs, demo (operators, on the mesh's host);
- ``inference``: generate, chat, templates (clients);
- ``trainer``: train, adapters (clients; ``adapters export`` on the mesh's host);
- ``security``: keys, audit, compliance (operators) and token (a client);
- ``common``: the config option, the connection options of client commands and the
  one-line errors.

Client commands go through the gateway with an API key when one is configured
(``--api-key-file`` or ``LLMESH_API_KEY_ID`` / ``LLMESH_API_SECRET``; ``--gateway``),
otherwise straight to this host's services with its internal identity.
"""

from llmesh.cli.app import app, main

__all__ = ["app", "main"]
