"""The demo: a small byte-level LM on the complete works of Shakespeare, on an 8-device CPU mesh.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python -m gqlm.train --config experiments/tiny_cpu.py --workdir /tmp/gqlm_tiny

Expect on 2 CPU cores: ~3 minutes, validation bits per byte falling from ~8.6 to ~2.7 (the
corpus' unigram entropy is ~4.6 bits per byte), and a (Shakespeare-flavoured) sample at the end.
`get_config("smoke")` is the same experiment shrunk for tests.
"""

from gqlm.presets import tiny_cpu_experiment


def get_config(arg: str = ""):
    return tiny_cpu_experiment(arg)
