"""Where a model is cut into trunk and head, and the hooks that run the head alone with autograd.

The *head* is the set of final modules whose parameters get exact gradients on every example; the *trunk*
is every other trainable parameter, whose gradient is predicted on the prediction micro-batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

#: Attribute names searched, in order, for a model's final layer when no head is named.
HEAD_ATTRIBUTE_NAMES = ("classifier", "score", "head", "lm_head")


def find_head_module_names(model: nn.Module, head_modules: list[str] | None = None) -> list[str]:
    """Names (as in `model.named_modules()`) of the head modules.

    With `head_modules` given, each name is checked; otherwise the first of `HEAD_ATTRIBUTE_NAMES` that the
    model has, else the module returned by `get_output_embeddings()`. Raises `ValueError` naming the argument
    and the allowed values when a name is unknown, when nothing is found, or when the head has no trainable
    parameter (its gradient could not be computed exactly, so the method would have nothing to predict from).
    """
    modules = dict(model.named_modules())
    if head_modules:
        unknown = [name for name in head_modules if name not in modules or name == ""]
        if unknown:
            candidates = [n for n in modules if n and n.count(".") <= 1][-12:]
            raise ValueError(
                f"head_modules: {unknown} are not modules of {type(model).__name__}. Allowed values are names from "
                f"`model.named_modules()`, for example {candidates}."
            )
        names = list(head_modules)
    else:
        names = [name for name in HEAD_ATTRIBUTE_NAMES if isinstance(modules.get(name), nn.Module)][:1]
        if not names and hasattr(model, "get_output_embeddings"):
            output_embeddings = model.get_output_embeddings()
            names = [name for name, module in modules.items() if module is output_embeddings and name][:1]
        if not names:
            raise ValueError(
                f"head_modules: could not find the final layer of {type(model).__name__} (looked for the attributes "
                f"{list(HEAD_ATTRIBUTE_NAMES)} and get_output_embeddings()). Name it with head_modules=[...]."
            )
    if not any(p.requires_grad for name in names for p in modules[name].parameters()):
        raise ValueError(
            f"head_modules: {names} have no trainable parameters; the head must hold parameters with "
            "requires_grad=True (name a module that does, e.g. the classifier layer)."
        )
    return names


@dataclass
class ModelPartition:
    """The trainable parameters of a model split into head and trunk, in a fixed order."""

    head_module_names: list[str]
    output_module: nn.Module
    head_modules: list[nn.Module]
    head_params: list[nn.Parameter]
    trunk_params: list[nn.Parameter]
    trunk_names: list[str] = field(default_factory=list)

    @classmethod
    def from_model(cls, model: nn.Module, head_modules: list[str] | None = None) -> "ModelPartition":
        """Partition `model`; the last named head module is the one whose output is the logits."""
        names = find_head_module_names(model, head_modules)
        modules = dict(model.named_modules())
        head_ids = {id(p) for name in names for p in modules[name].parameters() if p.requires_grad}
        head_params, trunk_params, trunk_names = [], [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if id(param) in head_ids:
                head_params.append(param)
            else:
                trunk_params.append(param)
                trunk_names.append(name)
        if not trunk_params:
            raise ValueError(
                f"head_modules: {names} hold every trainable parameter, so there is no trunk gradient to predict; "
                "name fewer, later modules."
            )
        return cls(
            head_module_names=names,
            output_module=modules[names[-1]],
            head_modules=[modules[name] for name in names],
            head_params=head_params,
            trunk_params=trunk_params,
            trunk_names=trunk_names,
        )

    @property
    def num_trunk_parameters(self) -> int:
        return sum(p.numel() for p in self.trunk_params)


class HeadCapture:
    """Holds the output (logits) of the model's final head module from the last forward pass."""

    def __init__(self) -> None:
        self.logits: torch.Tensor | None = None


@contextlib.contextmanager
def capture_head(partition: ModelPartition, head_only_autograd: bool = False):
    """Capture the logits of the final head module during a forward pass.

    With `head_only_autograd=True` the forward is expected to run under `torch.no_grad()`: a pre-hook on
    each head module turns autograd back on, so the trunk runs without building a graph while the head and
    everything after it (the model's own loss) are differentiable. This is the prediction micro-batch's
    "trunk forward without autograd, head forward and backward": it uses the model's own forward and loss,
    so any model whose head runs after its trunk works unchanged.
    """
    capture = HeadCapture()

    def enable_grad(module, args):
        # The first head module to run switches autograd on; its inputs come from the no-grad trunk, so the
        # graph starts there. Later head modules find it on already and keep their inputs' graph.
        torch.set_grad_enabled(True)

    def keep_output(module, args, output):
        capture.logits = output[0] if isinstance(output, (tuple, list)) else output

    handles = [partition.output_module.register_forward_hook(keep_output)]
    if head_only_autograd:
        handles += [module.register_forward_pre_hook(enable_grad) for module in partition.head_modules]
    try:
        yield capture
    finally:
        for handle in handles:
            handle.remove()
