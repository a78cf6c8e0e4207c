"""The trainer service's section of the mesh configuration (``trainer:``)."""

from __future__ import annotations

from pydantic import Field

from llmesh.runtime.config import Section, ServerSettings


class TrainerSettings(Section):
    server: ServerSettings = ServerSettings(port=50063, metrics_port=9463)
    # ImportDataset reads files only inside this folder; empty: LLMESH_HOME/datasets.
    dataset_root: str = ""
    max_dataset_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    # The languages a tsv_translation dataset's pairs translate between, as words of the
    # prompt (the inference 'translate' template's source_lang/target_lang): the upload
    # request has no such fields, so this is the one place the default lives.
    translation_source_lang: str = Field(default="中文", min_length=1)
    translation_target_lang: str = Field(default="英文", min_length=1)
    # Jobs run one at a time in a worker process; one that dies is restarted from its
    # last checkpoint up to this many times in all.
    max_attempts: int = Field(default=3, ge=1)
    checkpoint_every_steps: int = Field(default=20, ge=1)
    # Eval examples generated greedily for ROUGE-L / exact match (the loss uses all).
    eval_generate_limit: int = Field(default=64, ge=1)
