"""MLflow, where runs, metrics and models live.

mlflow_client (driver) which server, whether it answers, its login, the job's run from creation
              to close, what the workers are told of it
run_logger    (rank 0 of the train workers) each epoch into the driver's run, by id
registry      (driver, jobs/registry.py) the registered models, champion and challenger, the
              promotion lock
server        (its own process: jobs/mlflow_server.py) the team's MLflow server
"""
