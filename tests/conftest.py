import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # reference.py / helpers.py

torch.set_num_threads(1)  # tiny matrices: threads only add overhead


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
