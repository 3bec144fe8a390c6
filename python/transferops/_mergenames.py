"""The merge methods' names and options, torch-free: the ``transferops merge`` parser (and its
``--help``) is built from them without importing torch. :mod:`transferops.merging` re-exports
them and is where they are documented."""

SIGN_RULES = ("sum", "count")
SEMANTICS = ("peft", "mergekit", "paper")
METHODS = ("task_arithmetic", "ties", "magnitude_prune", "dare_linear", "dare_ties", "breadcrumbs",
           "breadcrumbs_ties", "della", "della_linear")
