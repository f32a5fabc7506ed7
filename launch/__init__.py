"""Launchers: TPU VMs and pods (tpu.py), Slurm GPU clusters (gpu_slurm.py), plain multi-node
(multinode.py) and several processes on one machine (local.py). See launch/README.md."""
