"""AlexNet on Ray: data preparation, streaming augmentation, DDP training, MLflow tracking."""
