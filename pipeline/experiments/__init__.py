"""Experiments beside the main path: the paper's Figure 1, ReLU against tanh (jobs/relu_vs_tanh.py)."""
