"""SynthSAEBench (arXiv 2602.14687), the benchmark: its protocol and table (``bench``, which
trains SAEs, hence this floor above train) and its metrics (``metrics``). Its world and sampler
are a data source like any other: saekit.data.synthetic (``data.source: synthbench``).
"""
