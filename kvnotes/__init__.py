"""kvnotes: the shared substrate (model registry and loading, KV splicing, readout, statistics, records).

Importing it makes the process offline before transformers can be imported: nothing may touch the network at run
time, and model weights come only from installed PyPI packages.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
