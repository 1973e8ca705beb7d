"""A trained model scoring images for batch jobs (jobs/evaluate.py, jobs/infer.py).

loading      (driver) a model resolved once and its files checked; (model actors) loaded once
             from the checked bytes, probabilities per batch
model_files  what a registered version may hold, and how its program is loaded
evaluation   top-1 and top-5 error on prepared validation shards (centre crop, 10 crops)
inference    one Parquet row per image of a bucket or folder
pool         (driver) the model actors: how many, and on GPUs or CPUs
"""
