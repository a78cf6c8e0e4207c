"""The retrieval service (``llmesh.retrieval.v1.Retrieval``, port 50065): collections,
document ingestion, hybrid search and answers with citations. It owns no state yet:
every RPC answers UNIMPLEMENTED until collections land (they will live in
``LLMESH_HOME/retrieval/``, and it will call embedding and inference). Called by the
gateway."""
