import os

# Tests run on the CPU even where libtpu is installed (it comes with the test extra for TPU
# AOT-compile tests); several test processes may load libtpu at once.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
