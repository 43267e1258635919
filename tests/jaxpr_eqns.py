"""Walking a jaxpr for tests that check what a traced function does (which kernels, casts, pads)."""


def all_eqns(jaxpr):
    """Every equation of jaxpr, including those of nested jaxprs (jit, scan, while, custom_vjp, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from all_eqns(inner)
