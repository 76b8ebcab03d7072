#!/usr/bin/env bash
# A real Slurm cluster on this machine (munged + slurmctld + slurmd n1, n2), for trying experiments/slurm/ by hand.
#   scripts/local_slurm.sh start /tmp/slurm-here     # prints: export SLURM_CONF=...
#   eval "$(scripts/local_slurm.sh start /tmp/slurm-here)"; export MASTER_ADDR=127.0.0.1
#   sbatch --cpus-per-task=1 experiments/slurm/single_node.sbatch experiments/toy/ring8/dmd2.yaml
#   scripts/local_slurm.sh stop /tmp/slurm-here      # stops the daemons by their recorded PIDs
# Needs root; installs Debian's slurm-wlm and munge with apt-get when sbatch is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" -m tests.slurm_cluster "$@"
