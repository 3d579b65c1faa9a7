import os
import sys

# `python -m tinyllama_ref` inside a checkout puts the checkout first on sys.path, where our kernels/ folder
# would stand in for Hugging Face's `kernels` package that transformers 5 imports (verify, lm-eval's peer
# model). The installed package never needs that entry: tinyllama_ref.kernels comes from the install.
_checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _checkout]

from .cli import main  # noqa: E402

main()
