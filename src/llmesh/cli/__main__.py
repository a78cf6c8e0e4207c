"""``python -m llmesh.cli``: the same as the ``llmesh`` command."""

from llmesh.cli.app import main

main()
