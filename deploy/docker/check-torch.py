"""The trainer image's torch, checked right after its install: prints its version
and CUDA, and refuses a CPU build the requirement did not ask for.

A ``+cpu`` wheel in the wheel directory satisfies ``torch==2.13.0`` (a local
version matches its public one, and sorts above it), so a CUDA image built with
the CPU wheel there would otherwise build fine and fail only on a GPU machine.
Usage: ``python check-torch.py TORCH_SPEC TORCH_VARIANT`` (cuda or cpu: the build the
image is for, a build argument each compose service sets).
"""

import sys

import torch

spec, variant = sys.argv[1], sys.argv[2]
print("torch", torch.__version__, "cuda", torch.version.cuda)
if variant == "cuda" and torch.version.cuda is None:
    sys.exit(
        f"TORCH_SPEC={spec} installed a CPU build of torch ({torch.__version__}) into the CUDA "
        "trainer image, most likely from a +cpu wheel in WHEEL_DIR: build it with a wheel "
        "directory without one (WHEEL_DIR=...), or build the CPU image (TORCH_VARIANT=cpu)"
    )
