"""The law layer for HTCondor: ``HTCondorWorkflow`` and its job script (``workflow.py``, ``job.sh``).

What a running job reads about itself (its ClassAd, scratch directory) is in
:mod:`ckpt_tasks.jobenv`.
"""
