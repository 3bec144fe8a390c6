"""POT's ``ot.solve`` and ``ot.solve_sample``: being written."""
__all__: list[str] = []


def solve(*args, **kwargs):
    raise NotImplementedError("solve: being written")


solve_sample = solve
