"""Reading jaxprs in tests: which FFI targets a function calls."""

import jax


def equations(jaxpr):
    """Every equation of a jaxpr, those of its sub-jaxprs (custom_vjp, pjit) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                yield from equations(inner)


def ffi_calls(fn, *args) -> list[str]:
    """The FFI target of each call that ``fn(*args)`` makes, in order, with repeats."""
    return [eqn.params["target_name"] for eqn in equations(jax.make_jaxpr(fn)(*args).jaxpr)
            if eqn.primitive.name == "ffi_call"]


def ffi_targets(fn, *args) -> list[str]:
    """The FFI targets that ``fn(*args)`` calls, sorted, each once."""
    return sorted(set(ffi_calls(fn, *args)))
