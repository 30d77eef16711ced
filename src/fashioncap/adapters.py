"""LoRA adapters (Hugging Face peft) on BLIP: added for `train.method: lora`, saved alone, merged at load.

An adapter's directory holds peft's adapter_config.json and adapter_model.safetensors, the processor, and
`base.json`: the pinned record of the model it adapts (origin.py: a registry version with its digests, or a
Hub id with its commit). Loading resolves the base (itself perhaps an adapter), applies the adapter and
merges it (`merge_and_unload`): the result is a plain BLIP, as fast as a fully fine-tuned one.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from .runtime import FashioncapError

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
BASE_FILE = "base.json"


class AdapterError(FashioncapError):
    """An adapter cannot be built or loaded; the message names what is missing."""


def target_pattern(targets: tuple[str, ...] | list[str], freeze_vision: bool) -> str:
    """peft's target_modules as a regex over module names: the named linear layers (BLIP: the text decoder's
    `query`/`value`, self- and cross-attention; the vision encoder's `qkv`), none in a frozen vision encoder."""
    scopes = "text_decoder" if freeze_vision else "text_decoder|vision_model"
    return rf"^(?:{scopes})\..*\.(?:{'|'.join(targets)})$"


def add_lora(model, lora, freeze_vision: bool):
    """The model with LoRA adapters on `lora.targets` (r, alpha, dropout as configured): only they train."""
    from peft import LoraConfig, get_peft_model

    pattern = target_pattern(lora.targets, freeze_vision)
    import re

    names = [n for n, _ in model.named_modules() if re.fullmatch(pattern, n)]
    if not names:
        raise AdapterError(f"train.lora.targets {list(lora.targets)} name no layer of this model"
                           + (" outside its frozen vision encoder" if freeze_vision else ""))
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=pattern,
                        bias="none")
    peft_model = get_peft_model(model, config)
    log.info("LoRA r=%d alpha=%g on %d layers: %d trainable parameters", lora.r, lora.alpha, len(names),
             sum(p.numel() for p in peft_model.parameters() if p.requires_grad))
    return peft_model


def is_adapted(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def trainable_state(model) -> dict:
    """What a checkpoint holds of the model: the whole state, or for an adapted model the adapter's alone."""
    if is_adapted(model):
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(model)
    return model.state_dict()


def load_trainable_state(model, state: dict) -> None:
    if is_adapted(model):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state)
        if getattr(result, "unexpected_keys", None):
            raise AdapterError(f"the checkpoint's adapter does not fit this model: {result.unexpected_keys[:3]}")
        return
    model.load_state_dict(state)


def is_adapter(directory) -> bool:
    return (Path(directory) / ADAPTER_CONFIG).is_file()


def save_base(directory: Path, record: dict) -> None:
    """Writes the base's pinned record beside a saved adapter."""
    (Path(directory) / BASE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def base_of(directory) -> dict:
    path = Path(directory) / BASE_FILE
    if not path.is_file():
        raise AdapterError(f"the adapter in {directory} has no {BASE_FILE}: the model it adapts is unknown")
    return json.loads(path.read_text())


def _same(a: dict, b: dict) -> bool:
    keys = ("kind", "init", "uri", "weights", "revision")
    return all(a.get(k) == b.get(k) for k in keys if b.get(k) is not None)


def merged(directory, load_base, what: str, known=None):
    """The BLIP an adapter directory stands for: its base loaded by `load_base(source, what, revision)` (from
    `known`, an origin.Init, when it is that very base; otherwise fetched from the registry, the Hub or its
    directory), the adapter applied and merged."""
    from peft import PeftModel

    from . import origin

    base = base_of(directory)
    where = origin.describe(base)
    with tempfile.TemporaryDirectory(prefix="fashioncap-base-") as tmp:
        if known is not None and _same(known.record, base):
            source = known.source
        elif base["kind"] == "registry":
            try:
                source = str(origin.fetch(base, Path(tmp) / "base"))
            except origin.InitError as error:
                raise AdapterError(f"{what} is a LoRA adapter whose base {where} cannot be loaded: {error}") from None
        elif base["kind"] == "local":
            source = base["init"]
            if not Path(source).is_dir() or origin.weights_digest(Path(source)) != base.get("weights"):
                raise AdapterError(f"{what} is a LoRA adapter whose base, the local directory {source}, is missing "
                                   "or holds other weights than it was trained on")
        else:
            source = base["init"]
        model = load_base(source, f"the base {where} of {what}", base.get("revision"))
        model = PeftModel.from_pretrained(model, str(directory)).merge_and_unload()
    return model
