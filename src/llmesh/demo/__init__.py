"""The main job (``llmesh demo``) and what it needs: the deterministic demo models built
offline at ``llmesh models init`` (:mod:`llmesh.demo.models`) and the bundled corpus and
FAQ (``corpus/``). Importing this package is cheap: torch loads only when a model is built."""
