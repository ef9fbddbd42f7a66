"""The `simcot` command line, DeepSpeed configs, recipes, hostfile and SLURM scripts."""
