#!/usr/bin/env bash
#SBATCH --job-name=anonrisk-grid
#SBATCH --cpus-per-task=1
#SBATCH --time=00:30:00
#SBATCH --output=anonrisk-grid-%j.out
# Submit a whole benchmark grid from one sbatch:
#
#   sbatch slurm/full_grid.sh                                   # configs/grids/full.yaml
#   sbatch slurm/full_grid.sh configs/grids/smoke.yaml runs_dir=/scratch/$USER/anonrisk
#
# This driver job plans the grid (every cell validated before anything is queued), submits one job array
# per stage with dependencies (prepare -> anonymize -> train -> evaluate) and a collect job that gathers
# results/<grid>/ and MLflow, then exits: it holds one CPU for a minute, not for the grid's duration.
# Stages already done or still queued are skipped, so resubmitting after a failure or a new axis value
# runs only what is missing. Follow with `anonrisk grid status GRID`.
#
# Environment: activate the environment holding anonrisk before sbatch (sbatch passes it on), or set
# ANONRISK to the command to run (e.g. "srun --export=ALL /path/to/venv/bin/anonrisk"). MLflow: set
# MLFLOW_TRACKING_URI (a server every node can reach) or tracking.tracking_uri=... in the settings.
set -euo pipefail
GRID=${1:-configs/grids/full.yaml}
shift $(( $# > 0 ? 1 : 0 ))
cd "${SLURM_SUBMIT_DIR:-$(pwd)}"
ANONRISK=${ANONRISK:-anonrisk}
echo "anonrisk grid driver: job ${SLURM_JOB_ID:-none} on $(hostname), grid $GRID $*"
$ANONRISK grid submit "$GRID" "$@" --executor slurm
$ANONRISK grid status "$GRID" "$@" || true
