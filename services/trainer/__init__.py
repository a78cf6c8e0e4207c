"""The trainer service (50063): dataset uploads, LoRA fine-tuning jobs (one worker
process each), evaluation and the adapter registry. Its state lives in
``LLMESH_HOME/trainer/`` (``trainer.db``, ``datasets/<id>/``, ``jobs/<id>/``); adapters are
published to ``LLMESH_HOME/adapters/name@vN`` with ``registry.json``, which inference and
Triton load from. It calls no peer: its workers run locally."""
