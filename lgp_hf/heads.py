"""Where a model is cut into trunk and head, and the hooks that run the head alone with autograd.

The *head* is the set of final modules whose parameters get exact gradients on every example; the *trunk* is every
other trainable parameter, whose gradient is predicted on the prediction micro-batch. A parameter that the head
shares with the trunk (tied input and output embeddings) is both: its head use gets the exact gradient, its trunk
use the predicted one. While a head module runs, `capture_head` swaps each of its parameters for an alias (a view,
whose gradient flows on to the parameter), so that the gradient of the head use alone is the alias's gradient.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
from torch import nn

#: Attribute names searched, in order, for a model's final layer when no head is named.
HEAD_ATTRIBUTE_NAMES = ("classifier", "score", "qa_outputs", "head", "lm_head")


def find_head_module_names(model: nn.Module, head_modules: list[str] | None = None) -> list[str] | None:
    """Names (as in `model.named_modules()`) of the head modules, or None when the model has no identifiable head.

    With `head_modules` given, each name is checked (`ValueError` naming the argument and the allowed values when a
    name is unknown). Otherwise the rule is: the first of `HEAD_ATTRIBUTE_NAMES` that the model has as an attribute
    (attribute lookup, so wrappers that delegate to their model, like peft's, are searched too), else the module
    returned by `get_output_embeddings()`. That covers transformers' sequence, token and image classification
    (`classifier`, `score`), question answering (`qa_outputs`), multiple choice (`classifier`) and causal and
    seq2seq language models (`lm_head`, output embeddings).
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
        return list(head_modules)
    names_by_module = {}
    for name, module in modules.items():
        names_by_module.setdefault(id(module), name)
    for attribute in HEAD_ATTRIBUTE_NAMES:
        module = getattr(model, attribute, None)
        if isinstance(module, nn.Module) and names_by_module.get(id(module)):
            return [names_by_module[id(module)]]
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    if callable(get_output_embeddings):
        module = get_output_embeddings()
        if isinstance(module, nn.Module) and names_by_module.get(id(module)):
            return [names_by_module[id(module)]]
    return None


@dataclass
class ModelPartition:
    """The trainable parameters of a model split into head and trunk, in a fixed order.

    `shared_params` are head parameters that a module outside the head also owns (tied embeddings): they appear in
    both `head_params` (the gradient of their head use) and `trunk_params` (the gradient of the rest).
    """

    head_module_names: list[str]
    output_module: nn.Module
    head_modules: list[nn.Module]
    head_params: list[nn.Parameter]
    trunk_params: list[nn.Parameter]
    trunk_names: list[str]
    shared_params: list[nn.Parameter]

    @classmethod
    def from_model(cls, model: nn.Module, head_modules: list[str] | None = None) -> "ModelPartition | None":
        """Partition `model`; the last named head module is the one whose output is the logits. None when the model
        has no identifiable head or no trainable trunk parameter (nothing to predict)."""
        names = find_head_module_names(model, head_modules)
        if names is None:
            return None
        modules = dict(model.named_modules())
        head_ids, head_module_ids = set(), set()
        for name in names:
            for module in modules[name].modules():
                head_module_ids.add(id(module))
            head_ids.update(id(p) for p in modules[name].parameters() if p.requires_grad)
        # A head parameter is shared when a module outside the head owns it too (remove_duplicate=False: every owner).
        outside_ids = {
            id(param)
            for module in model.modules()
            if id(module) not in head_module_ids
            for param in module.parameters(recurse=False)
        }
        head_params, trunk_params, trunk_names, shared_params = [], [], [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if id(param) in head_ids:
                head_params.append(param)
            if id(param) not in head_ids or id(param) in outside_ids:
                trunk_params.append(param)
                trunk_names.append(name)
            if id(param) in head_ids and id(param) in outside_ids:
                shared_params.append(param)
        if not trunk_params:
            return None
        return cls(
            head_module_names=names,
            output_module=modules[names[-1]],
            head_modules=[modules[name] for name in names],
            head_params=head_params,
            trunk_params=trunk_params,
            trunk_names=trunk_names,
            shared_params=shared_params,
        )

    @property
    def num_trunk_parameters(self) -> int:
        return sum(p.numel() for p in self.trunk_params)


class HeadCapture:
    """What the head did in the last forward pass: the output (logits) of the final head module, and for each head
    parameter the aliases it was used through (one per call of its module)."""

    def __init__(self, num_params: int) -> None:
        self.logits: torch.Tensor | None = None
        self.aliases: list[list[torch.Tensor]] = [[] for _ in range(num_params)]
        self.alias_gradients: list[torch.Tensor | None] = [None] * num_params
        self.logit_gradient: torch.Tensor | None = None

    def record_gradients(self, indices: set[int] | None = None) -> None:
        """Hooks that keep, during the next backward through the captured forward, the gradient of the head use of
        the parameters at `indices` (None: all; summed over its aliases) and the logits' gradient summed over every
        position (vocabulary-wide, not batch x length x vocabulary): the head gradients and the logit-error signal
        at no extra backward, holding only what is asked for."""

        # The hooks live on tensors that this capture holds: through a weak reference they make no reference
        # cycle, which would keep a parameter-sized head gradient alive until Python's next cycle collection.
        capture = weakref.ref(self)

        def keep(index):
            def hook(gradient):
                if gradient is None:  # this use did not reach the loss
                    return
                gradients = capture().alias_gradients
                total = gradients[index]
                gradients[index] = gradient.detach().float() if total is None else total + gradient.detach().float()
            return hook

        def keep_logits(gradient):
            if gradient is None:
                return
            capture().logit_gradient = gradient.detach().float().reshape(-1, gradient.shape[-1]).sum(0)

        for index, uses in enumerate(self.aliases):
            if indices is None or index in indices:
                for alias in uses:
                    alias.register_hook(keep(index))
        if self.logits.requires_grad:
            self.logits.register_hook(keep_logits)


@contextlib.contextmanager
def capture_head(partition: ModelPartition, head_only_autograd: bool = False):
    """Capture the logits of the final head module and route head parameters through aliases during a forward.

    With `head_only_autograd=True` the forward is expected to run under `torch.no_grad()`: a pre-hook on each head
    module turns autograd back on, so the trunk runs without building a graph while the head and everything after
    it (the model's own loss) are differentiable. This is the prediction micro-batch's "trunk forward without
    autograd, head forward and backward": it uses the model's own forward and loss, so any model whose head runs
    after its trunk works unchanged. The aliases are views: values and the parameters' accumulated gradients are
    unchanged, only the head use becomes a tensor of its own to differentiate by.
    """
    capture = HeadCapture(len(partition.head_params))
    index = {id(p): i for i, p in enumerate(partition.head_params)}
    owners = {
        module: [name for name, p in module._parameters.items() if p is not None and id(p) in index]
        for head in partition.head_modules
        for module in head.modules()
    }
    owners = {module: names for module, names in owners.items() if names}
    originals: dict[nn.Module, dict[str, nn.Parameter]] = {}

    def enable_grad(module, args):
        # The first head module to run switches autograd on; its inputs come from the no-grad trunk, so the graph
        # starts there (they are made leaves that require grad, so that a frozen head, e.g. under LoRA, still gives
        # logits to differentiate by). Later head modules find it on already and keep their inputs' graph.
        torch.set_grad_enabled(True)
        return tuple(
            arg.detach().requires_grad_() if isinstance(arg, torch.Tensor) and arg.is_floating_point() and not arg.requires_grad else arg
            for arg in args
        )

    def use_aliases(module, args):
        if not torch.is_grad_enabled():
            return
        saved = originals.setdefault(module, {})
        for name in owners[module]:
            param = saved.setdefault(name, module._parameters[name])
            alias = param.view_as(param)
            capture.aliases[index[id(param)]].append(alias)
            module._parameters[name] = alias  # read back by the module's forward through nn.Module.__getattr__

    def restore(module, args=None, output=None):
        for name, param in originals.pop(module, {}).items():
            module._parameters[name] = param

    def keep_output(module, args, output):
        capture.logits = output[0] if isinstance(output, (tuple, list)) else output

    handles = []
    if head_only_autograd:
        handles += [module.register_forward_pre_hook(enable_grad) for module in partition.head_modules]
    for module in owners:
        handles.append(module.register_forward_pre_hook(use_aliases))
        handles.append(module.register_forward_hook(restore, always_call=True))
    handles.append(partition.output_module.register_forward_hook(keep_output))
    try:
        yield capture
    finally:
        for handle in handles:
            handle.remove()
        for module in list(originals):
            restore(module)
