"""Compute providers: the Slurm clusters a team already has, to which runs are sent as scheduler jobs
(config: the operator's providers.yaml; slurm: Slurm's own commands; dispatch: the web server's loop that
submits, watches and cancels)."""
