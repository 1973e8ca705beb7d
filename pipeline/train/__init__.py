"""The training job.

driver       (driver process) the sequence: inputs checked, Ray joined, the run begun, fit,
             the best checkpoint registered, the run closed
preflight    (driver) the checks before any cluster work: data, crop, GPUs, the plan against the
             cluster, local paths the workers must reach
run          (driver) the run's name, directory, record, resume and close
fit          (driver) the TorchTrainer, and what a failure past --max-failures says
worker       (every Ray Train worker) the epoch loop: DDP steps, validation, checkpoints
ingest       (driver builds, Ray Data tasks and workers run) the training and validation streams
reports      (driver) the lines rank 0 prints, kept whole in the driver's log
spec         what the driver hands the workers, and what a checkpoint says about itself
checkpoint   (workers write, driver and model actors read) checkpoint directories
registration (driver) the best checkpoint logged, registered and promoted
curves       (driver) the training curves beside the checkpoints and in the MLflow run
"""
