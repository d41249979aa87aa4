"""Compute providers: the Slurm and Kubernetes clusters a team already has, to which runs are sent as
scheduler jobs (config: the operator's providers.yaml; slurm: Slurm's own commands; kubernetes: its
official client; backends: one interface over both; dispatch: the web server's loop that submits, watches
and cancels)."""
