"""Shared pytest configuration: deterministic, CPU-only, no network."""

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.manual_seed(0)
torch.set_num_threads(min(2, torch.get_num_threads()))
