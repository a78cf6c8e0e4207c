"""The embedding service (``llmesh.embedding.v1.Embedding``, port 50064): text and image
vectors and CLIP similarity. It owns no state yet: every RPC answers UNIMPLEMENTED until
the embedding models are served (they will run on Triton, its one peer to come). Called
by the gateway and, later, by retrieval."""
