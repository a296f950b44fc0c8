"""The cluster layer: profiles, executors, planning, submission and status of synhpc's batch jobs on SLURM.

The library (:mod:`synhpc`) knows nothing of clusters and the batch jobs (:mod:`jobs`) only what they run and how
they resume; everything that talks to SLURM (sbatch through submitit, sacct, squeue, scontrol, scancel) lives here.
This folder also ships the cluster profiles (``profiles/*.yaml``), plain sbatch templates (``templates/``) and the
single-node test cluster (``cluster.sh``, ``conf/``).

Usage::

    from slurm.profile import load_profile
    from slurm.submit import submit_pipeline
    jobs = submit_pipeline(load_config("configs/microns.yaml"), load_profile("hyak", ["account=mylab"]))
"""
