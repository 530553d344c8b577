"""Hydra discovers kdbench's cohort launcher here (launcher plugins must live in the `hydra_plugins` namespace
package): `hydra/launcher=cohort` trains a sweep's jobs in cohorts (kdbench.cohort), `cohort_slurm` submits one
Slurm job per cohort."""
