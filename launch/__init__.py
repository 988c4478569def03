"""Launchers that start ``pretrain.train.main()`` on other machines.

``python -m launch.slurm`` submits training jobs to Slurm through submitit (or runs them through
submitit's local executor with ``--local``); ``launch.task.TrainTask`` is what each task runs.
"""
