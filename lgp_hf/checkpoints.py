"""Model weights on resume, where transformers' own loading loses them."""

from __future__ import annotations

import json
import os

from safetensors import safe_open
from transformers import PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, logging

logger = logging.get_logger(__name__)


def checkpoint_weight_names(checkpoint: str) -> set[str] | None:
    """Tensor names stored in a checkpoint's safetensors file(s), or None when it has none."""
    single, index = os.path.join(checkpoint, SAFE_WEIGHTS_NAME), os.path.join(checkpoint, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(single):
        with safe_open(single, framework="pt") as handle:
            return set(handle.keys())
    if os.path.isfile(index):
        with open(index) as handle:
            return set(json.load(handle)["weight_map"])
    return None


def reload_renamed_weights(model, checkpoint: str) -> bool:
    """Reload `model`'s weights through `from_pretrained` when the checkpoint stores them under other names.

    `save_pretrained` writes some architectures under their legacy names (transformers 5.24 saves ViT's
    `vit.layers.N` as `vit.encoder.layer.N`), but `Trainer._load_from_checkpoint` reads them with a plain
    `load_state_dict`, which only warns about the missing keys: a resumed ViT would silently keep its initial
    trunk. `from_pretrained` applies the renaming; its weights are copied in place, so the optimizer and any
    wrapper keep pointing at the same parameters. Returns whether it reloaded.
    """
    names = checkpoint_weight_names(checkpoint)
    if not isinstance(model, PreTrainedModel) or names is None or names >= set(model.state_dict()):
        return False
    loaded = type(model).from_pretrained(checkpoint, dtype=next(model.parameters()).dtype)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"Could not restore {missing} from {checkpoint}: the model and its checkpoint do not match.")
    logger.info(f"Reloaded the weights of {checkpoint} through from_pretrained (renamed keys).")
    return True
