#!/bin/bash
# After run.sh: the two hard-suite policies again (a field dropped from their first outputs) and on DDIM-10,
# the sampler of configs/methods/seed_methods.yaml's closed loop.
cd "$(dirname "$0")/../../.." && . .venv/bin/activate
export OMP_NUM_THREADS=1
R=benchmarks/results/seed-methods
run() { name=$1; shift; mkdir -p $R/$name
        python -m benchmarks.seed_methods out_dir=$R/$name progress=false "$@" > $R/$name/log.txt 2>&1; }
run dpt-metaworld-hard checkpoint=dpt-metaworld-hard tasks=[hard]
run dit-metaworld-hard checkpoint=dit-metaworld-hard tasks=[hard]
run dpt-metaworld-hard-ddim10 checkpoint=dpt-metaworld-hard tasks=[hard] sampler.kind=ddim sampler.steps=10
run dit-metaworld-hard-ddim10 checkpoint=dit-metaworld-hard tasks=[hard] sampler.kind=ddim sampler.steps=10
