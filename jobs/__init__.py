"""Batch jobs: one module per kind of job (what it runs, what it needs, how it resumes), launched through submitit."""
