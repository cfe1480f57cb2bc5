#!/bin/bash
# The recorded runs of benchmarks/seed_methods.py (one model after the other, one thread; logs beside the outputs).
cd "$(dirname "$0")/../../.." && . .venv/bin/activate
export OMP_NUM_THREADS=1
R=benchmarks/results/seed-methods
run() { name=$1; shift; mkdir -p $R/$name
        python -m benchmarks.seed_methods out_dir=$R/$name progress=false "$@" > $R/$name/log.txt 2>&1; }
run dpt-metaworld-hard checkpoint=dpt-metaworld-hard tasks=[hard]
run dit-metaworld-hard checkpoint=dit-metaworld-hard tasks=[hard]
run dit-digits case=dit-digits
run pi0-metaworld checkpoint=pi0-metaworld tasks=[suite]
run gr00t-metaworld checkpoint=gr00t-metaworld tasks=[suite]
run rdt-metaworld checkpoint=rdt-metaworld tasks=[suite]
# the hard-suite policies on DDIM-10 too, the sampler of configs/methods/seed_methods.yaml's closed loop
run dpt-metaworld-hard-ddim10 checkpoint=dpt-metaworld-hard tasks=[hard] sampler.kind=ddim sampler.steps=10
run dit-metaworld-hard-ddim10 checkpoint=dit-metaworld-hard tasks=[hard] sampler.kind=ddim sampler.steps=10
