import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

# Triton kernels run in its interpreter on machines without a GPU. Triton reads this when a kernel module is
# first imported, and any test file may import one first, so it is set before collection.
if not os.path.exists("/dev/nvidiactl") and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PEFTLAB_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="uses the real default model; set PEFTLAB_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    # Tiny models run fastest on one thread, and parallel runs on a small machine do not fight over cores.
    import torch

    torch.set_num_threads(1)
