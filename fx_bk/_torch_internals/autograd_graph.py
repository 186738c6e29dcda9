"""The door's helpers that read the autograd graph and hooks (see ``__init__.py``)."""

from __future__ import annotations

import contextlib

import torch

from ..user_code import user_frame


def current_graph_task_id() -> int:
    """The id of the autograd graph task (one ``backward()`` / ``autograd.grad`` call) running
    the caller, -1 outside a backward pass."""
    return torch._C._current_graph_task_id()


def backward_hooks(model: torch.nn.Module) -> list[str]:
    """Module paths with backward hooks (``register_full_backward_hook``,
    ``register_full_backward_pre_hook``, ``register_backward_hook``), ``"<global>"`` for
    hooks registered on every module."""
    from torch.nn.modules import module as nn_module

    found = [name or "<root>" for name, m in model.named_modules()
             if m._backward_hooks or m._backward_pre_hooks]
    if nn_module._global_backward_hooks or nn_module._global_backward_pre_hooks:
        found.append("<global>")
    return found


_HOOK_FUNCTION = "torch.nn.modules._functions.BackwardHookFunction"


def custom_functions(outputs) -> list[str]:
    """Qualified names of the Python ``autograd.Function`` classes in the autograd graph that
    produced ``outputs``. Left out: the Functions ``torch.library`` generates for custom ops
    (the op stays one node of the trace and its registered backward is used), and module
    backward hooks' own Function (``backward_hooks`` reports them by module)."""
    found, seen = {}, set()
    todo = [t.grad_fn for t in outputs if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        cls = getattr(node, "_forward_cls", None)
        if cls is not None:
            name = f"{cls.__module__}.{cls.__qualname__}"
            if cls.__module__ != "torch._library.autograd" and name != _HOOK_FUNCTION:
                found[name] = None
        todo.extend(child for child, _ in node.next_functions)
    return list(found)


@contextlib.contextmanager
def recording_tensor_hooks(found: list):
    """While tracing, record every ``Tensor.register_hook`` call (its user frame into
    ``found``): a hook that changes a gradient is not part of the traced forward."""
    tensor_hook = torch.Tensor.register_hook

    def register_hook(self, hook):
        found.append(user_frame())
        return tensor_hook(self, hook)

    torch.Tensor.register_hook = register_hook
    try:
        yield found
    finally:
        torch.Tensor.register_hook = tensor_hook
