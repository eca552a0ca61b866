"""Where activations come from, one sub-package per concern:

- ``sources``: the batch-source interface, the source config family (``data.source``: one
  module per kind, listed in ``sources/registry.py``) and the multi-process sources;
- ``lm``: transformers models: loading, hook points and their names, harvesting, text packing;
- ``cache``: the activation cache on disk (reading and verifying, writing);
- ``documents``: text sources by document index, index ranges, held-out document sets;
- ``synthetic``: generated worlds with known features (the built-in generator, SynthSAEBench).

Nothing here imports from the floors above (eval, train, ...): tests/test_package_layout.py.
"""
