"""Run a module with some of its parameters and buffers replaced, and always restore them.

``torch.func.functional_call`` swaps tensors by name, once per name. A module registered under
two names (``nn.ModuleList([lin, lin])``) is one object reached by two names: the second swap
saves the first one's replacement as the "original", and the restore leaves that replacement in
the model (measured on torch 2.13: a fake tensor left in the user's model after tracing). Here
every (module object, attribute) slot is swapped exactly once, whatever the number of names that
reach it, and tied tensors (one object under several names, e.g. GPT-2's ``wte``/``lm_head``)
get the same replacement in every slot.
"""

from __future__ import annotations

import contextlib

import torch


def _slots(model: torch.nn.Module, names: dict) -> dict:
    """``{(id(module), attr): (module, attr, canonical name)}`` for every slot holding one of the
    tensors named in ``names`` (any alias of it)."""
    originals = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    by_object = {id(originals[n]): n for n in names if n in originals}
    slots = {}
    for _, mod in model.named_modules(remove_duplicate=False):
        for attr, t in [*mod._parameters.items(), *mod._buffers.items()]:
            if t is not None and id(t) in by_object:
                slots[(id(mod), attr)] = (mod, attr, by_object[id(t)])
    missing = set(names) - set(originals)
    if missing:
        raise KeyError(f"not a parameter or buffer of {type(model).__name__}: {sorted(missing)}")
    return slots


@contextlib.contextmanager
def swapped_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor]):
    """Inside the block, ``model``'s parameters/buffers named in ``tensors`` (by
    ``named_parameters()`` / ``named_buffers()`` names) are those tensors."""
    slots = _slots(model, tensors)
    saved = []
    try:
        for mod, attr, name in slots.values():
            table = mod._parameters if attr in mod._parameters else mod._buffers
            saved.append((table, attr, table[attr]))
            table[attr] = tensors[name]
        yield model
    finally:
        for table, attr, original in reversed(saved):
            table[attr] = original


@contextlib.contextmanager
def kept_tensor_attributes(model: torch.nn.Module):
    """Tensors held in plain attributes (``self.scale = torch.arange(4.)``, a cache a module
    fills on its first call: Hugging Face BEiT's ``relative_position_index``) are what they were
    before the block: a trace reads them as constants, and a value the forward stored during the
    trace (a fake tensor) does not stay in the user's model."""
    modules = {id(m): m for _, m in model.named_modules(remove_duplicate=False)}
    saved = {key: {k: v for k, v in m.__dict__.items() if isinstance(v, torch.Tensor)}
             for key, m in modules.items()}
    try:
        yield model
    finally:
        for key, m in modules.items():
            for k, v in list(m.__dict__.items()):
                if isinstance(v, torch.Tensor) and saved[key].get(k) is not v:
                    if k in saved[key]:
                        m.__dict__[k] = saved[key][k]
                    else:
                        del m.__dict__[k]


_PLAIN = (bool, int, float, str, type(None))


def module_signature(model: torch.nn.Module) -> tuple:
    """What a trace of ``model``'s forward took as fixed and user code may change between
    calls, as a tuple of constants: per submodule its type, plain attributes (numbers, strings,
    flags: ``self.scale``, ``self.use_residual``), number of hooks, and its parameters' and
    buffers' shapes and dtypes; and the submodules' identities (replacing one changes it). fx_bk
    keys its programs on it (``fx_bk/runtime.py``, NOTE [stale traces]). Attributes of other
    objects (a config object's fields) are not included."""
    sig = []
    for name, m in model.named_modules():
        attrs = tuple((k, v) for k, v in m.__dict__.items()
                      if not k.startswith("_") and k != "training" and isinstance(v, _PLAIN))
        hooks = (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                 len(m._backward_pre_hooks))
        tensors = tuple((k, tuple(t.shape), t.dtype)
                        for k, t in [*m._parameters.items(), *m._buffers.items()]
                        if t is not None)
        sig.append((name, id(m), type(m).__qualname__, attrs, hooks, tensors))
    return tuple(sig)



def wrapped_attribute(wrapper: torch.nn.Module, name: str, child: str):
    """``wrapper.__getattr__``: an attribute the wrapper lacks comes from its submodule
    ``child`` (a Hugging Face ``config`` read through fx_bk's wrappers)."""
    try:
        return torch.nn.Module.__getattr__(wrapper, name)
    except AttributeError:
        if name.startswith("__") or "_modules" not in wrapper.__dict__:
            raise
        return getattr(wrapper._modules[child], name)
