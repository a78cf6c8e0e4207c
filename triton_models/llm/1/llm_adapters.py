"""LoRA adapters resident in the model: loaded lazily from the adapter store, LRU-bounded.

Only the decode thread calls this (between steps), so PEFT state is touched by one thread.
Once the first adapter is loaded the model is a PeftModel; requests name their adapter per
row (`adapter_names`), "__base__" for the base model.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from typing import Any

import triton_python_backend_utils as pb_utils
from llm_errors import RequestError, invalid, not_found

BASE = "__base__"


class AdapterCache:
    def __init__(self, base: Any, folder: str, size: int) -> None:
        self.base = base
        self.folder = folder
        self.size = size
        self.model: Any = base  # what a forward pass calls: the base model, then the PeftModel
        self.peft: Any = None  # PeftModel once the first adapter is loaded
        self.loaded: OrderedDict[str, str] = OrderedDict()  # LRU: name -> folder

    def adapter_names(self, adapters: list[str]) -> list[str] | None:
        """A forward pass's adapter_names for rows with these adapters (None: no LoRA layers yet)."""
        if self.peft is None:
            return None
        return [a or BASE for a in adapters]

    def ensure(self, names: set[str]) -> dict[str, RequestError]:
        """Load missing adapters (LRU-bounded). Returns errors for names that failed."""
        errors: dict[str, RequestError] = {}
        for name in sorted(names):
            if name in self.loaded:
                self.loaded.move_to_end(name)
                continue
            folder = os.path.join(self.folder, name)
            if not os.path.isfile(os.path.join(folder, "adapter_config.json")):
                errors[name] = not_found("adapter", name)
                continue
            t0 = time.perf_counter()
            try:
                if self.peft is None:
                    from peft import PeftModel

                    self.peft = PeftModel.from_pretrained(self.base, folder, adapter_name=name, is_trainable=False)
                    self.peft.eval()
                    self.model = self.peft
                else:
                    self.peft.load_adapter(folder, adapter_name=name, is_trainable=False)
            except Exception as exc:
                errors[name] = invalid("adapter", f"cannot load adapter '{name}' ({exc})")
                continue
            self.loaded[name] = folder
            pb_utils.Logger.log_info(f"llm: loaded adapter {name!r} in {(time.perf_counter() - t0) * 1000:.1f} ms")
        self._evict(names)
        return errors

    def _evict(self, keep: set[str]) -> None:
        """Drop least recently used adapters beyond the bound, except those in `keep`."""
        while len(self.loaded) > self.size:
            victim = next((n for n in self.loaded if n not in keep), None)
            if victim is None:
                break
            self.loaded.pop(victim)
            try:
                self.peft.delete_adapter(victim)
                pb_utils.Logger.log_info(f"llm: evicted adapter {victim!r}")
            except Exception as exc:  # keep serving; the adapter just stays resident
                pb_utils.Logger.log_warn(f"llm: could not evict adapter {victim!r}: {exc}")
