"""medtune: train, evaluate and serve biomedical multimodal assistants."""
import os

__version__ = "0.1.0"

# Intel MKL (PyTorch's CPU BLAS on x86) may round a matrix product differently with the memory alignment of its
# inputs when it runs on several threads, so a run resumed from a checkpoint (tensors read from files) drifts
# from the uninterrupted run in the last bits. STRICT makes its results independent of alignment (measured on 2
# threads: a resumed run bit-identical with it, not without; about 3% slower on the small preset). MKL reads it
# once, when torch first uses it, so it is set on import, before torch; a value the user set is kept.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
