"""Stand-in for ModelPatcher, comfy.patcher_extension's wrappers, BaseModel.apply_model and a sampler.

The parts of the contract the patch depends on:
- `ModelPatcher.clone()` shares the model and deep-copies `model_options`; wrapper lists are copied.
- Wrappers of type "apply_model" receive `(executor, x, t, c_concat, c_crossattn, control,
  transformer_options, **kwargs)` and continue with `executor(...)`, which may be called more than once.
- The sampler merges the patcher's wrappers into a copy of `transformer_options`, adds `sample_sigmas`
  (the schedule, steps + 1 values) and, per evaluation, `sigmas` (the current sigma per batch item).
"""

from __future__ import annotations

import copy

import torch


class WrappersMP:
    APPLY_MODEL = "apply_model"


class WrapperExecutor:
    """Runs wrapper `index`, whose `executor(...)` continues with the next one, then the original."""

    def __init__(self, original, wrappers, index=0):
        self.original, self.wrappers, self.index = original, list(wrappers), index

    def execute(self, *args, **kwargs):
        if self.index == len(self.wrappers):
            return self.original(*args, **kwargs)
        return self.wrappers[self.index](WrapperExecutor(self.original, self.wrappers, self.index + 1), *args, **kwargs)

    __call__ = execute


class BaseModel(torch.nn.Module):
    """Holds the diffusion model; `apply_model` runs the "apply_model" wrappers around it."""

    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        options = transformer_options if transformer_options is not None else {}
        wrappers = [w for ws in options.get("wrappers", {}).get(WrappersMP.APPLY_MODEL, {}).values() for w in ws]
        executor = WrapperExecutor(self._apply_model, wrappers)
        return executor.execute(x, t, c_concat, c_crossattn, control, options, **kwargs)

    def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        return self.diffusion_model(x, t, context=c_crossattn, transformer_options=transformer_options)


class ModelPatcher:
    def __init__(self, model):
        self.model = model
        self.model_options = {"transformer_options": {}}
        self.wrappers: dict[str, dict[str, list]] = {}

    def clone(self):
        n = ModelPatcher(self.model)
        n.model_options = copy.deepcopy(self.model_options)
        n.wrappers = {kind: {key: list(ws) for key, ws in by_key.items()} for kind, by_key in self.wrappers.items()}
        return n

    def add_wrapper_with_key(self, wrapper_type, key, wrapper):
        self.wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(wrapper)

    def remove_wrappers_with_key(self, wrapper_type, key):
        self.wrappers.get(wrapper_type, {}).pop(key, None)

    def get_all_wrappers(self, wrapper_type):
        return [w for ws in self.wrappers.get(wrapper_type, {}).values() for w in ws]


class OldModelPatcher(ModelPatcher):
    """A ModelPatcher from before the wrapper system (no add_wrapper_with_key)."""

    add_wrapper_with_key = None
    remove_wrappers_with_key = None


def sampling_options(patcher: ModelPatcher, sigmas: torch.Tensor) -> dict:
    """The transformer_options a sampler run hands the model: the patcher's, its wrappers, the schedule."""
    options = copy.copy(patcher.model_options["transformer_options"])
    options["wrappers"] = {kind: dict(by_key) for kind, by_key in patcher.wrappers.items()}
    options["sample_sigmas"] = sigmas
    return options


def evaluate(patcher, x, sigma, context, options):
    """One model evaluation at `sigma`, as the sampler's calc_cond_batch makes it."""
    t = torch.full((x.shape[0],), float(sigma))
    call_options = {**options, "sigmas": t}
    return patcher.model.apply_model(x, t, None, context, None, call_options)


def sample(patcher, x, sigmas, context, second_order=False):
    """Euler (or Heun, `second_order`) over `sigmas`; the model output is the denoised prediction."""
    options = sampling_options(patcher, sigmas)
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - evaluate(patcher, x, s, context, options)) / s
        x_next = x + d * (s_next - s)
        if second_order and s_next > 0:
            d2 = (x_next - evaluate(patcher, x_next, s_next, context, options)) / s_next
            x_next = x + (d + d2) / 2 * (s_next - s)
        x = x_next
    return x
