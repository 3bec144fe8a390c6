"""Drop-in functions with a peer library's signature and semantics, backed by transferops:
``from transferops.compat import pot as ot`` for POT's Sinkhorn entry points."""
