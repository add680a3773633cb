"""The head/trunk boundary: where the backward draws the rows whose gradient goes on into the trunk.

The boundary is the input of the head: the floating tensors passed to the first head module that runs in a forward
(`find_head_module_names`). An identity autograd function is put there (`sampled_boundary`); in the backward it
receives dL/dh for every row (dim 0: the examples), after the head's own backward, so the head's gradient is exact
over the whole batch. It scores each row, s_i = ||dL/dh_i||, draws the control rows with inclusion probabilities
pi_i (`sampling`) and passes w_i dL/dh_i on, w_i = 1{drawn} / pi_i. Nothing about the loss or the model is
assumed: unbiasedness is the chain rule (`sampling`'s docstring). With a gradient predictor (`predictor`), the same
backward also returns the predictor's correction of the trunk parameters it is given as inputs (autograd adds it to
their gradients, as any other path's).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .sampling import horvitz_thompson_weights, inclusion_probabilities, poisson_draw

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
class BoundaryDraw:
    """What one crossing of the boundary drew: per row, the score, the inclusion probability and whether it was
    drawn (CPU tensors); `uniform`: the scores were not finite and the draw was uniform."""

    scores: torch.Tensor
    probabilities: torch.Tensor
    drawn: torch.Tensor
    uniform: bool


class BoundarySampler:
    """The draw made in the backward at the boundary, and a record of every draw of the current micro-batch.

    `fraction` f and `uniform_mix` set the inclusion probabilities; `generator` (set per micro-batch by the
    trainer) draws. At f = 1 every row is kept with weight 1 and the gradient passes unchanged (the same tensor):
    the boundary then only records the scores. `predictor` (`predictor.LinearGradientPredictor`, or None): the control
    variate whose `terms` the first crossing's backward returns for its `parameters`.
    """

    def __init__(self, fraction: float = 1.0, uniform_mix: float = 0.0):
        self.fraction = fraction
        self.uniform_mix = uniform_mix
        self.generator: torch.Generator | None = None
        self.draws: list[BoundaryDraw] = []
        self.predictor = None

    @staticmethod
    def row_scores(gradient: torch.Tensor) -> torch.Tensor:
        """s_i = ||dL/dh_i||, over all of row i's entries (float64, on the CPU)."""
        return gradient.detach().float().reshape(gradient.shape[0], -1).norm(dim=1).double().cpu()

    def reweight(self, gradient: torch.Tensor) -> torch.Tensor:
        """w_i dL/dh_i for the rows of `gradient` (dim 0), w drawn here (`sampling`)."""
        rows = gradient.shape[0]
        scores = self.row_scores(gradient)
        uniform = not bool(torch.isfinite(scores).all())
        if uniform:  # an fp16 overflow or a diverged loss: the step is skipped or useless, but the draw stays valid
            scores = torch.ones(rows, dtype=torch.float64)
        probabilities = inclusion_probabilities(scores, self.fraction, 1.0 if uniform else self.uniform_mix)
        if self.fraction >= 1:
            drawn = torch.ones(rows, dtype=torch.bool)
            self.draws.append(BoundaryDraw(scores, probabilities, drawn, uniform))
            return gradient
        drawn = poisson_draw(probabilities, self.generator)
        self.draws.append(BoundaryDraw(scores, probabilities, drawn, uniform))
        weights = horvitz_thompson_weights(drawn, probabilities).to(gradient.device, gradient.dtype)
        return gradient * weights.view(rows, *([1] * (gradient.dim() - 1)))


class _SampledBoundary(torch.autograd.Function):
    """Identity forward; the backward hands the incoming gradient to `BoundarySampler.reweight` and, when trunk
    parameters were given, returns the predictor's terms for them (computed from the draw just made)."""

    @staticmethod
    def forward(ctx, sampler: BoundarySampler, hidden: torch.Tensor, *parameters: torch.Tensor) -> torch.Tensor:
        ctx.sampler, ctx.corrects = sampler, bool(parameters)
        if parameters:
            ctx.save_for_backward(hidden)
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor):
        weighted = ctx.sampler.reweight(gradient)
        terms = ctx.sampler.predictor.terms(gradient, ctx.saved_tensors[0], ctx.sampler.draws[-1]) if ctx.corrects else []
        return None, weighted, *terms


def _crosses_boundary(value) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.requires_grad and value.dim() > 0


@contextlib.contextmanager
def sampled_boundary(head_modules: list[nn.Module], sampler: BoundarySampler):
    """During a forward, route the floating inputs of the first head module that runs through the sampler.

    Later calls of head modules in the same forward take their inputs from the head (or, rarely, from the trunk by
    another path, whose gradient then stays exact). Yields a list that holds True once the boundary was placed (a
    head whose input does not require a gradient, under a frozen trunk, places none: nothing below it to sample).
    The first tensor placed carries the predictor's parameters (`BoundarySampler.predictor`), so that its draw's
    correction reaches them once.
    """
    placed = [False]

    def place(module, args, kwargs):
        if placed[0] or not torch.is_grad_enabled():
            return None
        parameters = sampler.predictor.parameters() if sampler.predictor is not None else []

        def through(value):
            nonlocal parameters
            if not _crosses_boundary(value):
                return value
            carried, parameters = parameters, []
            return _SampledBoundary.apply(sampler, value, *carried)

        placed[0] = any(map(_crosses_boundary, (*args, *kwargs.values())))
        args = tuple(through(a) for a in args)
        kwargs = {k: through(v) for k, v in kwargs.items()}
        return args, kwargs

    handles = [module.register_forward_pre_hook(place, with_kwargs=True) for module in head_modules]
    try:
        yield placed
    finally:
        for handle in handles:
            handle.remove()
