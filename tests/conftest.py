import os
import sys

import pytest
import torch

# Nothing in the tests may reach the network: Hugging Face offline mode, set before any test
# imports huggingface_hub/datasets (they read it once) and inherited by subprocesses.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

sys.path.insert(0, os.path.dirname(__file__))  # reference.py / helpers.py

torch.set_num_threads(1)  # tiny matrices: threads only add overhead


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
