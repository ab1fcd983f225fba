"""The drop-in modules forward every name of Horovod's matching module that gTop-k has
nothing to add to, so that a program whose import line was swapped finds all of them.

:func:`forward_horovod` copies into a drop-in module's namespace each public name of a
Horovod module that is Horovod's own (a function, class or constant defined in a
``horovod`` module, or a ``horovod`` submodule; not the third-party modules Horovod imports
for itself, such as ``os`` or ``tf``) and that the drop-in does not define, and extends its
``__all__``.  What gTop-k replaces (``init``, ``DistributedOptimizer``, the tapes...) is
defined by the drop-in first and so never overwritten.  docs/compatibility.md lists what is
forwarded, replaced and refused.
"""
import types

__all__ = ["horovod_names", "forward_horovod"]


def horovod_names(module):
    """The public names of Horovod module ``module`` that are Horovod's own API."""
    names = []
    for name in dir(module):
        if name.startswith("_"):
            continue
        value = getattr(module, name)
        if isinstance(value, types.ModuleType):
            if value.__name__.startswith("horovod."):
                names.append(name)
        elif str(getattr(value, "__module__", None) or "horovod").startswith("horovod"):
            names.append(name)
    return names


def forward_horovod(namespace, module):
    """Copy each name of :func:`horovod_names` (``module``) that ``namespace`` (a drop-in
    module's ``globals()``) lacks into it and into its ``__all__``; returns the names
    forwarded."""
    forwarded = [n for n in horovod_names(module) if n not in namespace]
    for name in forwarded:
        namespace[name] = getattr(module, name)
    namespace.setdefault("__all__", [])
    namespace["__all__"] = list(namespace["__all__"]) + forwarded
    return forwarded
