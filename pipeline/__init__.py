"""AlexNet on Ray: the library the jobs in jobs/ call, laid out by what runs where.

    config, errors, model, step, schedules, metrics, storage, outputs, redaction
                 shared by every wing and process: pure Python / PyTorch, no Ray, no MLflow
    data/        ImageNet layouts, Parquet shards, CPU and on-device transforms, colour statistics,
                 the sample, and preparation (driver + Ray Data tasks)
    train/       the training job: driver (sequence, preflight checks), the run's lifecycle, fitting
                 (TorchTrainer), the Ray Train worker's loop, ingest, checkpoints, registration
    tracking/    MLflow: the driver's client, a train worker's run logger, the registry and its
                 promotion rules, the team's server
    scoring/     a trained model served to batch jobs: resolved and checked once (driver), loaded and
                 scored in model actors; evaluation and batch inference
    cluster/     joining a Ray cluster or starting a local one, the plan against its resources, the
                 watchdog that says what a run waits for
    experiments/ the paper's Figure 1 (ReLU against tanh)

Wings import the shared modules and each other in one direction only (cluster < data < tracking
< train < scoring < experiments): tests/test_layout.py checks it.
"""
