"""The trainer image's torch, checked right after its install: prints its version
and CUDA, and refuses a CPU build the requirement did not ask for.

A ``+cpu`` wheel in the wheel directory satisfies ``torch==2.13.0`` (a local
version matches its public one, and sorts above it), so a CUDA image built with
the CPU wheel there would otherwise build fine and fail only on a GPU machine.
Usage: ``python check-torch.py TORCH_SPEC``.
"""

import sys

import torch

spec = sys.argv[1]
print("torch", torch.__version__, "cuda", torch.version.cuda)
if torch.version.cuda is None and "+cpu" not in spec:
    sys.exit(
        f"TORCH_SPEC={spec} installed a CPU build of torch ({torch.__version__}), most likely "
        "a +cpu wheel in WHEEL_DIR: build the CUDA trainer with a wheel directory without it "
        "(WHEEL_DIR=...), or ask for a CPU image (TORCH_SPEC=torch==...+cpu)"
    )
